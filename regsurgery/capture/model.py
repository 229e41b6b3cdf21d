"""One capture per block: every module of a model with a forward of its own, captured once.

:func:`capture_model` traces each block alone (children as leaves, see :mod:`.fx`), retraces the
blocks that fail on control flow specialized on their arguments from one real forward, and keeps
the results in a :class:`ModelCapture`. Analysis (residual sites, skip analysis, DropBlock anchors,
layer depths) and rewrite read graphs from it instead of tracing again; rewrite takes a *copy* of
a block's graph (node names are kept, and a Plan refers to nodes by name), so the capture itself is
never mutated.

A capture is the interface a second backend (example-driven, torch.export) produces too: a
:class:`~.fx.BlockGraph` per scope whose nodes are ``placeholder`` / ``call_module`` (children) /
``call_function`` / ``call_method`` / ``get_attr`` / ``output``, in train mode.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch.fx as fx
from torch import nn

from .examples import infer_example_input
from .fx import (
    BlockGraph,
    TraceFailure,
    capture_block_inputs,
    example_from_spec,
    get_submodule,
    iter_block_graphs,
    trace_block,
)
from .inline import (
    inline_example,
    inline_failures,
    inline_leaves,
    inline_optional_args,
    is_inline_policy,
    trace_inline,
)
from .session import tracing_session

__all__ = ["ModelCapture", "capture_model", "copy_graph", "specialize_failures"]

Item = Union[BlockGraph, TraceFailure]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep copy of ``graph`` with the same node names, types, metadata and code generator."""
    return copy.deepcopy(graph)


@dataclass
class ModelCapture:
    """The captured blocks of one model, in registration order, and the ones that failed."""

    model: nn.Module
    items: list[Item]
    _by_scope: dict[str, Item] = field(default_factory=dict, repr=False)
    _by_module: dict[int, BlockGraph] = field(default_factory=dict, repr=False)
    _failed: dict[int, Exception] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for item in self.items:
            self._by_scope.setdefault(item.scope, item)
            if isinstance(item, BlockGraph):
                self._by_module.setdefault(id(item.module), item)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def blocks(self) -> list[BlockGraph]:
        return [i for i in self.items if isinstance(i, BlockGraph)]

    @property
    def failures(self) -> list[TraceFailure]:
        return [i for i in self.items if isinstance(i, TraceFailure)]

    def block(self, scope: str, policy: Optional[str] = None) -> BlockGraph:
        """The capture of ``scope``; traced now (and kept) when it was not captured with ``policy``.

        A plan made on another capture of the same architecture names the policy it was made
        with; the same policy gives the same graph and node names.
        """
        item = self._by_scope.get(scope)
        if isinstance(item, BlockGraph) and (policy is None or item.policy == policy):
            return item
        module = get_submodule(self.model, scope)
        spec = item.example if isinstance(item, BlockGraph) else None
        if is_inline_policy(policy) or (policy is None and spec and "inline" in spec):
            if not spec or "inline" not in spec:
                raise ValueError(f"scope {scope!r} was captured inline on example arguments; pass them")
            real = getattr(item, "inline_args", None)  # the recorded call, when in memory
            args, kwargs = real or inline_example(spec, module)
            block = trace_inline(module, scope, args, kwargs,
                                 leaves=tuple(inline_leaves(policy or "inline")), spec=spec)
            self._by_scope[scope] = block
            return block
        block = trace_block(module, scope, policy=policy,
                            example=example_from_spec(spec, module) if spec else None)
        block.example = spec
        self._by_scope[scope] = block
        return block

    def graph_of(self, module: nn.Module) -> Optional[fx.Graph]:
        """The unspecialized graph of ``module``'s own forward, captured now if it was not yet
        (children the analysis looks into but that hold no residual add of their own); None for a
        block only captured specialized on its arguments. Raises what tracing raises."""
        item = self._by_module.get(id(module))
        if item is None:
            failed = self._failed.get(id(module))
            if failed is not None:
                raise failed
            try:
                item = trace_block(module)
            except Exception as exc:  # remembered: a module that does not trace is asked about often
                self._failed[id(module)] = exc
                raise
            self._by_module[id(module)] = item
        if item.example is not None:
            return None
        return item.graph


def specialize_failures(model: nn.Module, items: list[Item], example_inputs: Any) -> list[Item]:
    """Retrace blocks that failed on control flow, specialized on example arguments."""
    failed = [i.scope for i in items if isinstance(i, TraceFailure) and "control flow" in i.reason]
    if not failed:
        return items
    try:
        if example_inputs is None:
            x = infer_example_input(model)
            # batch 2, so no decision is specialized on a batch of one
            example_inputs = x.expand(2, *x.shape[1:]).clone() if x.shape[0] == 1 else x
        specs = capture_block_inputs(model, failed, example_inputs)
    except Exception as exc:
        note = f"; a specialized trace needs example_inputs ({type(exc).__name__}: {str(exc)[:120]})"
        return [TraceFailure(i.scope, i.type_name, i.reason + note)
                if isinstance(i, TraceFailure) and i.scope in failed else i for i in items]
    out: list[Item] = []
    for item in items:
        spec = specs.get(item.scope) if isinstance(item, TraceFailure) else None
        if spec is None:
            if isinstance(item, TraceFailure) and item.scope in failed:
                item = TraceFailure(item.scope, item.type_name,
                                    item.reason + "; not called by the example forward")
            out.append(item)
            continue
        assert isinstance(item, TraceFailure)
        module = model if item.scope == "" else model.get_submodule(item.scope)
        try:
            block = trace_block(module, item.scope, example=example_from_spec(spec, module))
        except Exception as exc:
            out.append(TraceFailure(item.scope, item.type_name,
                                    f"{item.reason}; specialized trace: {type(exc).__name__}: {str(exc)[:120]}"))
            continue
        block.example = spec
        out.append(block)
    return out


def capture_model(model: nn.Module, example_inputs: Any = None) -> ModelCapture:
    """Capture every block of ``model`` once (see the module docstring)."""
    with tracing_session():
        items = specialize_failures(model, list(iter_block_graphs(model)), example_inputs)
        items = inline_failures(model, items, example_inputs)  # fallback: any failure left
        items = inline_optional_args(model, items, example_inputs)  # None arguments stay constants
    return ModelCapture(model=model, items=items)
