"""Block-local tracing with torch.fx.

regsurgery never traces a model as a whole to patch it. Each module that has a
forward of its own is traced *alone*, with every submodule it calls kept as an
opaque ``call_module`` leaf. The residual add a block performs is in the block's
own forward, so that graph is all analysis and rewriting need, and:

- a model whose top level does not trace (data-dependent control flow) still
  has its blocks traced and patched;
- children are never inlined, so their ``self.training`` branches (BatchNorm,
  BN+activation, dropout) stay decided at run time and their hooks still run;
- buffers stay attributes (``proxy_buffer_attributes=True``) instead of being
  folded into ``_tensor_constant`` copies.

When a block's forward calls something that cannot be a leaf (a child returning
a tuple that the block unpacks, a module that is not registered under it), the
block is traced again with only library modules as leaves; what still fails is
reported as a :class:`TraceFailure`, never raised.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch.fx as fx
from torch import nn

__all__ = [
    "BlockGraph",
    "TraceFailure",
    "BlockTracer",
    "trace_block",
    "iter_block_graphs",
    "is_library_module",
    "is_drop_path_slot",
]

#: Leaf policies, tried in this order. "children": every submodule is a leaf.
#: "library": only torch.nn built-ins, norms and known no-trace modules are leaves.
POLICIES = ("children", "library")


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm absent or changed: nothing to add
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


def _regularizer_types() -> tuple[type, ...]:
    from . import ops  # late: ops is optional while the package is being built

    base = getattr(ops, "RegularizerModule", None)
    return (base,) if base is not None else ()


def is_drop_path_slot(module: nn.Module) -> bool:
    """True for an existing stochastic-depth module: regsurgery's, timm's, torchvision's or alike."""
    if isinstance(module, _regularizer_types()):
        return type(module).__name__ == "DropPath"
    name = type(module).__name__
    return name in ("DropPath", "StochasticDepth") or name.endswith("DropPath")


def is_library_module(module: nn.Module) -> bool:
    """Modules that are leaves when their parent is traced: built-in layers, norms,
    regularizers, BN+activation modules and modules registered as no-trace (timm)."""
    if _is_builtin_module(module):
        return True
    notrace_modules, _ = _timm_notrace()
    return bool(notrace_modules) and isinstance(module, notrace_modules)


def _is_builtin_module(module: nn.Module) -> bool:
    """Modules that hold no residual add of interest and are never traced on their own."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if isinstance(module, (*_regularizer_types(), nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)):
        return True
    mod = type(module).__module__ or ""
    if mod.startswith(("torch.nn", "torch.ao.nn", "torchvision.ops")):
        return True
    if is_drop_path_slot(module):
        return True
    # BN+activation modules (timm BatchNormAct2d is a _NormBase subclass; others by name): tracing
    # through them freezes their train/eval branch and drops num_batches_tracked updates.
    return "BatchNorm" in type(module).__name__ or "NormAct" in type(module).__name__


class BlockTracer(fx.Tracer):
    """Traces one module's own forward; which submodules stay leaves depends on ``policy``."""

    def __init__(self, policy: str = "children") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        _, notrace_functions = _timm_notrace()
        super().__init__(autowrap_modules=(math,), autowrap_functions=notrace_functions)
        self.policy = policy
        # Buffers as get_attr nodes, not frozen constants (maxvit, swin relative-position tables).
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.policy == "children":
            return True
        return is_library_module(m)

    # Record, for every node, the module whose forward created it (as torchvision's feature
    # extraction tracer does): with the "library" policy custom children are inlined, and only
    # the block's own nodes (scope "") are its own residual adds.
    _scope: str = ""

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        outer = self._scope
        self._scope = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scope = outer

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["regsurgery_scope"] = self._scope
        return node


@dataclass
class BlockGraph:
    """The fx graph of one module's own forward, traced in train mode."""

    scope: str
    module: nn.Module
    graph: fx.Graph
    policy: str

    def node(self, name: str) -> fx.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the graph of scope {self.scope!r}")


@dataclass
class TraceFailure:
    """A module whose own forward could not be traced: its adds are not analysed or patched."""

    scope: str
    type_name: str
    reason: str


@contextlib.contextmanager
def _training_flags(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily set every module's training flag; restore each one's own afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in saved:
            m.training = training
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def trace_block(module: nn.Module, scope: str = "", policy: Optional[str] = None) -> BlockGraph:
    """Trace ``module``'s own (class) forward in train mode.

    ``policy=None`` tries each leaf policy in :data:`POLICIES` order and keeps the first that
    works, so the same module always gets the same graph (and the same node names): a Plan
    refers to nodes by name. Raises the last tracing error if no policy works.
    """
    policies = POLICIES if policy is None else (policy,)
    last_error: Optional[BaseException] = None
    for pol in policies:
        tracer = BlockTracer(pol)
        try:
            with _training_flags(module, True):
                graph = tracer.trace(module)
        except Exception as exc:  # fx raises many types: TraceError, TypeError, NameError, ...
            last_error = exc
            continue
        return BlockGraph(scope=scope, module=module, graph=graph, policy=pol)
    assert last_error is not None
    raise last_error


def _has_own_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def iter_block_graphs(model: nn.Module) -> Iterator[BlockGraph | TraceFailure]:
    """Trace every module of ``model`` that has its own forward, in registration order.

    Built-in modules (``torch.nn`` layers, norms, regularizers) are skipped: they perform no
    residual adds of interest. Modules registered as no-trace are still tried on their own (they
    are only leaves for their parents). A module registered under two names is traced once.
    """
    for scope, module in model.named_modules():
        if _is_builtin_module(module) or not _has_own_forward(module):
            continue
        try:
            yield trace_block(module, scope)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            yield TraceFailure(scope=scope, type_name=type(module).__name__, reason=reason)


def qualified(scope: str, name: str) -> str:
    """Join a scope and a relative module path."""
    return f"{scope}.{name}" if scope and name else (scope or name)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model if path == "" else model.get_submodule(path)


def module_of(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    """The module a ``call_module`` node calls, relative to the traced block."""
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def own_node(node: fx.Node) -> bool:
    """Was this node created by the traced block's own forward (not an inlined child's)?"""
    return node.meta.get("regsurgery_scope", "") == ""


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, in order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))

