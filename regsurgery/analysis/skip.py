"""Which residual branches can be skipped (not run) for dropped samples, and why not.

A branch can be cut out of its block graph when its intermediate values are not used outside it
(shape reads excepted) and it does not modify its inputs in place; row mode also needs a branch
that treats samples independently. See :mod:`regsurgery.ops.skip` for the op itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture.fx import (
    CONTAINER,
    example_from_spec,
    get_submodule,
    is_library_module,
    module_of,
    qualified,
    tensor_inputs,
    trace_block,
)
from ..capture.model import ModelCapture
from ..ops.drop import _check_mode
from .residual import _MAX_PROJECTION_CHAIN, ResidualSite, _Dataflow, _is_add

__all__ = ["skip_blocker", "branch_parts", "BranchParts", "NotSkippable", "optional_input"]


# ----------------------------------------------------------------------------------------------
# branch extraction
# ----------------------------------------------------------------------------------------------
class NotSkippable(ValueError):
    """The branch of a site cannot be cut out of its block graph (the message says why)."""


@dataclass
class BranchParts:
    add: fx.Node
    anchor: fx.Node  # the branch operand of the add
    shortcut: fx.Node
    source: fx.Node  # the value the branch is computed from
    body: list[fx.Node]  # graph order: the paths source -> anchor and what hangs off them only
    kept: set[fx.Node]  # body nodes also used outside (shape reads): stay in the block graph too
    attrs: list[fx.Node]  # get_attr inputs: copied into the branch
    extras: list[fx.Node]  # other inputs from outside the branch, graph order
    flow: _Dataflow = field(repr=False)


_CALL_OPS = ("call_module", "call_function", "call_method")
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SHAPE_METHODS = {"size", "dim"}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior}


def _is_shape_node(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """A metadata read of a tensor (``x.shape``, ``x.size(1)``, ``B * N``): cheap and pure, so it
    may stay in the block graph and be recomputed in the branch."""
    if node in memo:
        return memo[node]
    result = False
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        result = node.args[1] in _SHAPE_ATTRS
    elif node.op == "call_method" and node.target in _SHAPE_METHODS:
        result = True
    elif node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        inputs = tensor_inputs(node)
        result = bool(inputs) and all(_is_shape_node(i, memo) for i in inputs)
    memo[node] = result
    return result


def _source_of(shortcut: fx.Node, anchor: fx.Node, flow: _Dataflow) -> Optional[fx.Node]:
    """The shortcut itself (identity) or the ancestor of the branch its projection chain starts at
    (the same walk as residual detection, without the weight limits)."""
    ancestors = flow.ancestors[anchor]
    if shortcut in ancestors:
        return shortcut
    node = shortcut
    for _ in range(_MAX_PROJECTION_CHAIN):
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        inputs = [i for i in tensor_inputs(node) if flow.from_value[i]]
        if len(inputs) != 1:
            return None
        node = inputs[0]
        if node in ancestors:
            return node
    return None


def _tail(graph: fx.Graph, body: set[fx.Node]) -> set[fx.Node]:
    """Nodes that hang off the branch and feed nothing else: unused shape reads (``_, H, W, _ =
    x.shape``) and run-time guards of a specialized trace. They run with the branch."""
    depends: set[fx.Node] = set()
    for node in graph.nodes:
        if node not in body and any(i in body or i in depends for i in tensor_inputs(node)):
            depends.add(node)
    tail: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node in depends and node.op in _CALL_OPS and all(u in tail for u in node.users):
            tail.add(node)
    return tail


def branch_parts(graph: fx.Graph, anchor: fx.Node, add: fx.Node) -> BranchParts:
    operands = _is_add(add)
    if operands is None:
        raise NotSkippable(f"node {add.name!r} is not a plain two-operand add")
    # Ops inserted after the branch output (DropBlock after the last conv+norm) belong to it.
    while anchor not in operands:
        inserted = [u for u in anchor.users
                    if u.op == "call_module" and str(u.target).startswith(f"{CONTAINER}.")]
        if len(inserted) != 1 or len(anchor.users) != 1:
            raise NotSkippable(f"the add {add.name!r} does not read the branch {anchor.name!r}")
        anchor = inserted[0]
    shortcut = operands[1] if operands[0] is anchor else operands[0]
    flow = _Dataflow(graph)
    source = _source_of(shortcut, anchor, flow)
    if source is None:
        raise NotSkippable(f"no value the branch {anchor.name!r} is computed from reaches the shortcut")
    others = [u.name for u in anchor.users if u is not add]
    if others:
        raise NotSkippable(f"the branch output {anchor.name!r} is also used by {others[0]!r}")
    body_set = set(flow.between(source, anchor))
    body_set |= _tail(graph, body_set)
    body = sorted(body_set, key=flow.order.__getitem__)
    memo: dict[fx.Node, bool] = {}
    kept: set[fx.Node] = set()
    for node in body:
        if node is anchor:
            continue
        outside = [u for u in node.users if u not in body_set]
        if not outside:
            continue
        if not _is_shape_node(node, memo):
            raise NotSkippable(
                f"branch node {node.name!r} is also used outside the branch (by {outside[0].name!r})"
            )
        kept.add(node)
        kept |= {a for a in flow.ancestors[node] if a in body_set}
    bad = [n.name for n in kept if not _is_shape_node(n, memo)]
    if bad:
        raise NotSkippable(f"branch node {bad[0]!r} feeds a value used outside the branch")
    inputs: dict[fx.Node, None] = {}
    for node in body:
        for i in tensor_inputs(node):
            if i not in body_set and i is not source:
                inputs[i] = None
        if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("_") \
                or node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and first not in body_set:
                raise NotSkippable(f"branch node {node.name!r} modifies {first.name!r} in place")
    ordered = sorted(inputs, key=flow.order.__getitem__)
    late = [n.name for n in ordered if flow.order[n] > flow.order[add]]
    if late:
        raise NotSkippable(f"the branch reads {late[0]!r}, which is computed after the add")
    return BranchParts(
        add=add, anchor=anchor, shortcut=shortcut, source=source, body=body, kept=kept,
        attrs=[n for n in ordered if n.op == "get_attr"],
        extras=[n for n in ordered if n.op != "get_attr"], flow=flow,
    )


def optional_input(node: fx.Node) -> bool:
    """A block input with a non-tensor default (``attn_mask=None``, ``is_causal=False``)."""
    return node.op == "placeholder" and len(node.args) == 1 and not isinstance(node.args[0], torch.Tensor)


# ----------------------------------------------------------------------------------------------
# plan time: can this site skip?
# ----------------------------------------------------------------------------------------------
_REDUCTIONS = {"sum", "mean", "std", "var", "std_mean", "var_mean", "max", "min", "amax", "amin",
               "prod", "norm", "logsumexp", "median", "nansum", "nanmean", "count_nonzero", "all",
               "any", "argmax", "argmin", "aminmax"}
_BATCH_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm}


def _batch_norm_in(module: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(relative name, module) of a norm that uses batch statistics in train mode, or None."""
    for name, m in module.named_modules():
        cls = type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or ("BatchNorm" in cls and "Frozen" not in cls):
            return name, m
    return None


def _sequence_first_in(module: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """A layer that mixes along dim 0 because its batch is dim 1 (``batch_first=False``)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and not getattr(m, "batch_first", True):
            return name, m
    return None


def _reduction_dims(node: fx.Node) -> Any:
    args = node.args[1:]  # the tensor is args[0] for both torch.sum(x, ...) and x.sum(...)
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    if "axis" in node.kwargs:
        return node.kwargs["axis"]
    return args[0] if args else None


def _cross_sample_op(node: fx.Node) -> Optional[str]:
    """Why a call mixes samples (batch norm, a reduction over all elements or dim 0), else None."""
    if node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS:
        return "batch_norm"
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function" and getattr(node.target, "__module__", "") in ("torch", "torch._tensor"):
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_function" and isinstance(node.target, type(torch.sum)):
        name = getattr(node.target, "__name__", "")
    else:
        return None
    if name not in _REDUCTIONS:
        return None
    dims = _reduction_dims(node)
    if dims is None:
        return f"{name} over all elements"
    if isinstance(dims, int) and not isinstance(dims, bool) and dims == 0:
        return f"{name} over dim 0"
    if isinstance(dims, (tuple, list)) and 0 in dims:
        return f"{name} over dim 0"
    return None


def _inner_cross_sample(module: nn.Module, where: str) -> Optional[str]:
    """Scan a custom leaf module's own code (traced through, library layers kept) for a
    cross-sample call. A module that does not trace is trusted (documented)."""
    try:
        graph = trace_block(module, where, policy="library").graph
    except Exception:  # untraceable custom code: nothing to scan
        return None
    for node in graph.nodes:
        why = _cross_sample_op(node)
        if why is not None:
            return f"branch calls {why} ({qualified(where, node.name)}): cross-sample"
    return None


def _row_blocker(block: nn.Module, scope: str, parts: BranchParts) -> Optional[str]:
    for node in parts.body:
        if node.op == "call_module":
            m = module_of(node, block)
            if m is None:
                continue
            where = qualified(scope, str(node.target))
            found = _batch_norm_in(m)
            if found is not None:
                name, bn = found
                return (f"branch has train-mode {type(bn).__name__} ({qualified(where, name)}): "
                        "batch statistics are cross-sample")
            found = _sequence_first_in(m)
            if found is not None:
                name, seq = found
                return (f"branch has {type(seq).__name__} with batch_first=False "
                        f"({qualified(where, name)}): it mixes along dim 0")
            if not is_library_module(m):
                why = _inner_cross_sample(m, where)
                if why is not None:
                    return why
        why = _cross_sample_op(node)
        if why is not None:
            return f"branch calls {why} ({qualified(scope, node.name)}): cross-sample"
    for extra in parts.extras:
        if not parts.flow.from_value[extra] or optional_input(extra):
            continue  # parameters / constants; optional inputs are checked at run time
        return (f"branch reads {extra.name!r}, a per-sample value other than its source "
                f"{parts.source.name!r}: row mode cannot gather it")
    return None


def _inplace_module_blocker(block: nn.Module, parts: BranchParts) -> Optional[str]:
    body = set(parts.body)
    for node in parts.body:
        m = module_of(node, block)
        if m is not None and getattr(m, "inplace", False) is True:
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and first not in body:
                return f"branch node {node.name!r} modifies {first.name!r} in place"
    return None


def skip_blocker(
    model: nn.Module, site: ResidualSite, mode: str, capture: Optional[ModelCapture] = None
) -> Optional[str]:
    """None if the branch of ``site`` can be skipped in ``mode``, else a short reason.

    Both modes need a branch that can be cut out of its block: its intermediate values are not
    used outside it (shape reads excepted) and it does not modify its inputs in place. Batch mode
    can then skip any branch (a dropped block does not run that step, BatchNorm included, as in the
    paper). Row mode also needs a per-sample-independent branch: no BatchNorm-like module (timm
    ``BatchNormAct2d`` / ``ConvNormAct`` included, inside custom leaves too), no batch norm
    function or reduction over all elements / dim 0, no ``batch_first=False`` sequence layer, and
    no per-sample input other than its source (parameters, buffers, constants and optional inputs
    whose default is not a tensor are fine; the latter are checked at run time). Custom modules
    that do not trace are trusted to be per-sample.
    """
    _check_mode(mode)
    block = get_submodule(model, site.scope)
    if capture is not None:
        graph = capture.block(site.scope, site.trace_policy).graph
    else:
        spec = getattr(site, "trace_example", None)  # blocks traced specialized on example inputs
        example = example_from_spec(spec) if spec else None
        graph = trace_block(block, site.scope, policy=site.trace_policy, example=example).graph
    nodes = {n.name: n for n in graph.nodes}
    if site.branch not in nodes or site.add not in nodes:
        return f"the block graph has no node {site.branch!r} / {site.add!r} (model changed since analysis?)"
    try:
        parts = branch_parts(graph, nodes[site.branch], nodes[site.add])
    except NotSkippable as exc:
        return str(exc)
    why = _inplace_module_blocker(block, parts)
    if why is None and mode == "row":
        why = _row_blocker(block, site.scope, parts)
    return why
