"""Skip-mode insertion: cut a residual branch out of a block graph and bind it to SkipDropPath.

The analysis of what can be cut is :mod:`regsurgery.analysis.skip`; the op is
:mod:`regsurgery.ops.skip`.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from ..analysis.skip import NotSkippable, branch_parts, optional_input
from ..ops.skip import SkipDropPath, code_copy, skip_drop_path
from ..plan import DropPathParams, PlannedOp
from .codegen import compile_graph

__all__ = ["make_skip_module", "insert_skip", "bind_skip_module"]

_META = "regsurgery_skip"  # node.meta key: the extracted branch, from insert_skip to bind_skip_module
_counter = itertools.count()


def make_skip_module(op: PlannedOp) -> SkipDropPath:
    """The module of a ``drop_path`` op with ``params.skip`` (called by ``rewrite._make_module``)."""
    params = op.params
    assert isinstance(params, DropPathParams)
    return SkipDropPath(float(params.p), mode=params.mode, scale_by_keep=bool(params.scale_by_keep))



# ----------------------------------------------------------------------------------------------
# rewrite time
# ----------------------------------------------------------------------------------------------
@dataclass
class _SkipInfo:
    key: tuple
    graph: fx.Graph
    checked: tuple[int, ...]
    nodes: tuple[str, ...]


def insert_skip(graph: fx.Graph, target: str, op: PlannedOp, anchor: fx.Node, user: fx.Node) -> fx.Node:
    """Turn the residual add ``user`` into ``target(shortcut, source, *extras)``, in place.

    The branch (nodes from the source to ``anchor``) moves into a graph of its own, kept in the new
    node's ``meta`` for :func:`bind_skip_module`; its nodes leave the block graph, except shape
    reads that other nodes still need. Returns the new node.
    """
    try:
        parts = branch_parts(graph, anchor, user)
    except NotSkippable as exc:
        raise ValueError(
            f"skip_dropped site {op.scope or '<root>'}:{op.user}: {exc}; plan it without "
            "skip_dropped (or re-plan on this model: the planner falls back to masking)"
        ) from None
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {parts.source: sub.placeholder(parts.source.name)}
    for extra in parts.extras:
        env[extra] = sub.placeholder(extra.name)
    for attr in parts.attrs:
        env[attr] = sub.node_copy(attr)
    for node in parts.body:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[parts.anchor])
    sub.lint()
    with graph.inserting_before(user):
        new = graph.call_module(target, (parts.shortcut, parts.source, *parts.extras))
    new.meta[_META] = _SkipInfo(
        key=op.key, graph=sub,
        checked=tuple(i for i, e in enumerate(parts.extras) if optional_input(e)),
        nodes=tuple(n.name for n in parts.body),
    )
    user.replace_all_uses_with(new)
    graph.erase_node(user)
    # Explicit erasure: call_module nodes are not dead code to eliminate_dead_code.
    for node in reversed(parts.body):
        if node not in parts.kept and not node.users:
            graph.erase_node(node)
    for attr in parts.attrs:
        if not attr.users:
            graph.erase_node(attr)
    return new


def _compile_branch(graph: fx.Graph, label: str) -> tuple[Callable[..., torch.Tensor], str]:
    return compile_graph(graph, f"skip branch {label}")


def _branch_params(block: nn.Module, graph: fx.Graph) -> tuple[str, ...]:
    """Names (relative to ``block``) of the parameters the branch graph uses."""
    names: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            prefix = str(node.target)
            try:
                sub = block.get_submodule(prefix)
            except AttributeError:  # a regularizer of this plan, not installed yet: no parameters
                continue
            names += [f"{prefix}.{n}" for n, _ in sub.named_parameters()]
        elif node.op == "get_attr":
            target = str(node.target)
            mod_path, _, attr = target.rpartition(".")
            owner = block.get_submodule(mod_path) if mod_path else block
            if isinstance(getattr(owner, attr, None), nn.Parameter):
                names.append(target)
    return tuple(dict.fromkeys(names))


def bind_skip_module(module: nn.Module, block: nn.Module, graph: fx.Graph, op: PlannedOp) -> None:
    """Give ``module`` its compiled branch ``fn(block, source, *extras)`` and its owning block."""
    if not isinstance(module, SkipDropPath):
        raise TypeError(
            f"site {op.scope or '<root>'}:{op.user} is planned with skip_dropped but holds a "
            f"{type(module).__name__} from an earlier plan; strip(model) and apply the plan again"
        )
    info: Optional[_SkipInfo] = None
    for node in graph.nodes:
        candidate = node.meta.get(_META)
        if candidate is not None and candidate.key == op.key:
            info = candidate
            break
    if info is None:
        raise ValueError(f"no skip call for site {op.scope or '<root>'}:{op.user} in the rewritten graph")
    fn, src = _compile_branch(info.graph, f"{op.scope or 'root'}:{op.user}")
    module._branch_fn = fn
    module._checked_extras = info.checked
    module.branch_nodes = info.nodes
    module.branch_code = src
    module.branch_params = _branch_params(block, info.graph)
    label = f"site{next(_counter)}"
    module._impl = code_copy(skip_drop_path, label)
    # Instance-level forward (like patched blocks): a bound method, so deepcopy rebinds it.
    module.__dict__["forward"] = types.MethodType(code_copy(SkipDropPath.forward, label), module)
    # The owner is a plain attribute: registering it would make a module cycle (state_dict,
    # named_modules, train() recursion); deepcopy of the model maps it to the copied block.
    object.__setattr__(module, "_owner", block)
