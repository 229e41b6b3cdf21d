"""Stochastic depth that skips the dropped branches instead of multiplying them by zero.

Paper: Deep Networks with Stochastic Depth, Huang et al., ECCV 2016
(https://arxiv.org/abs/1603.09382). A residual site computes ``out = s + f(x)``; stochastic
depth trains it as::

    out = s + m * f(x) / (1 - p),    m ~ Bernoulli(1 - p)

Masking (timm, torchvision, :class:`regsurgery.DropPath`) computes ``f(x)`` for every sample and
multiplies the dropped ones by zero: it saves nothing. The paper skipped a dropped block for the
whole mini-batch and trained about 25% faster at ``p_L = 0.5`` with linear decay (expected depth
``3L/4``). DINOv2 runs its residual branches on the kept rows only. Here the fx rewrite does this
for any model:

* the branch subgraph of each site (the nodes on the paths from the value the branch is computed
  from, its *source*, to the add) is cut out of the block's train-mode graph and compiled into
  its own function ``branch(block, source, *extras)``;
* the add becomes one call ``SkipDropPath(shortcut, source, *extras)``;
* ``mode="batch"``: one draw per step; dropped -> ``s`` (the branch does not run), kept ->
  ``s + f(x) / (1 - p)``;
* ``mode="row"``: one draw per sample; ``idx`` = kept rows;
  ``out = s.index_add(0, idx, f(x[idx]) * m[idx] / (1 - p))`` (gather, branch, scatter-add).
  This equals masking only when ``f`` treats samples independently: a branch with train-mode
  BatchNorm or another cross-sample op keeps masking at that site (:func:`skip_blocker` says why).

The keep mask is drawn exactly as :func:`regsurgery.ops.drop_path` draws it (same RNG call, same
number of values, same dtype), so with the same seed masking and skipping make the same decisions
and, for per-sample-independent branches without random ops of their own, give the same outputs
and gradients (up to the summation order of a smaller batch). ``E[out] = s + f(x)`` either way.
"""

from __future__ import annotations

import functools
import itertools
import linecache
import operator
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .analysis import _MAX_PROJECTION_CHAIN, ResidualSite, _Dataflow, _is_add
from .ops import DropPath, _check_mode, _check_p, _mask_dtype
from .plan import PlannedOp
from .tracing import (
    example_from_spec,
    get_submodule,
    is_library_module,
    module_of,
    qualified,
    tensor_inputs,
    trace_block,
)

__all__ = [
    "skip_drop_path",
    "SkipDropPath",
    "skip_blocker",
    "make_skip_module",
    "insert_skip",
    "bind_skip_module",
]

CONTAINER = "regsurgery"  # rewrite.CONTAINER (not imported: rewrite imports this module)
_META = "regsurgery_skip"  # node.meta key: the extracted branch, from insert_skip to bind_skip_module
_counter = itertools.count()


# ----------------------------------------------------------------------------------------------
# functional op
# ----------------------------------------------------------------------------------------------
def _draw(shortcut: torch.Tensor, p: float, mode: str, scale_by_keep: bool,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    """The keep mask of :func:`regsurgery.ops.drop_path`: same call, shape, dtype and scaling."""
    keep = 1.0 - p
    shape = (shortcut.shape[0],) + (1,) * (shortcut.dim() - 1) if mode == "row" else (1,) * shortcut.dim()
    mask = torch.rand(shape, dtype=_mask_dtype(shortcut), device=shortcut.device, generator=generator).lt_(keep)
    if scale_by_keep and keep > 0.0:
        mask = mask.div_(keep)
    return mask


def _scatter_add(shortcut: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``shortcut`` with ``rows`` added at batch positions ``idx``, out of place; dtype and shape
    as ``shortcut + full_branch`` would have (type promotion, broadcasting)."""
    dtype = torch.promote_types(shortcut.dtype, rows.dtype)
    shape = torch.broadcast_shapes(shortcut.shape, (shortcut.shape[0],) + tuple(rows.shape[1:]))
    base = shortcut.to(dtype)
    if tuple(base.shape) != tuple(shape):
        base = base.expand(shape)
    rows = rows.to(dtype)
    if tuple(rows.shape[1:]) != tuple(shape[1:]):
        rows = rows.expand((rows.shape[0],) + tuple(shape[1:]))
    return base.index_add(0, idx, rows)


def skip_drop_path(
    shortcut: torch.Tensor,
    source: torch.Tensor,
    branch: Callable[..., torch.Tensor],
    p: float,
    training: bool = True,
    mode: str = "row",
    scale_by_keep: bool = True,
    extras: Sequence[Any] = (),
    generator: Optional[torch.Generator] = None,
    row_safe: bool = True,
) -> torch.Tensor:
    """``shortcut + m * branch(source, *extras) / (1 - p)``, running ``branch`` only where ``m = 1``.

    ``m ~ Bernoulli(1 - p)`` is drawn as :func:`regsurgery.ops.drop_path` draws it: one per
    sample (``mode="row"``) or one per batch (``mode="batch"``, the paper). Batch mode runs the
    branch on the whole batch or not at all; row mode runs it on ``source[idx]`` for the kept rows
    ``idx`` and scatter-adds the result into ``shortcut``, which is correct only if ``branch``
    treats the rows of ``source`` (dim 0) independently. ``row_safe=False`` computes the full
    branch and masks it instead (same draws, same result, no saving). Not training or ``p == 0``:
    ``shortcut + branch(source)``. ``p == 1``: ``shortcut`` (a copy: callers may modify it in place).

    Under ``torch.compile`` the host decision (``nonzero`` / ``item``) is a graph break. Dynamo
    caches the code after it per code object, so one call site per distinct ``branch`` is best:
    :class:`SkipDropPath` gives every site its own copy of this function.

    Args:
        shortcut: the other operand of the residual add, batch first.
        source: the value the branch is computed from (batch first, same batch size).
        branch: callable ``branch(source, *extras) -> tensor`` broadcastable to ``shortcut``.
        p: drop probability in [0, 1].
        training: apply stochastic depth; when False the plain residual sum is returned.
        mode: ``"row"`` or ``"batch"``.
        scale_by_keep: divide survivors by ``1 - p`` so the expectation is kept.
        extras: further (batch-independent in row mode) arguments of ``branch``.
        generator: optional ``torch.Generator`` (on ``shortcut``'s device) for the draws.
        row_safe: row mode may gather (the branch is per-sample independent).
    """
    _check_p(p)
    _check_mode(mode)
    if not training or p == 0.0:
        return shortcut + branch(source, *extras)
    mask = _draw(shortcut, p, mode, scale_by_keep, generator)
    if mode == "batch":
        # One host decision per step: the point is not to launch the branch at all.
        if mask.item() == 0.0:
            return shortcut.clone()
        y = branch(source, *extras)
        return shortcut + y * mask.to(y.dtype)
    batch = shortcut.shape[0]
    if not row_safe or source.dim() == 0 or source.shape[0] != batch:
        y = branch(source, *extras)
        return shortcut + y * mask.to(y.dtype)
    idx = mask.view(-1).nonzero().view(-1)  # data-dependent size: a graph break under torch.compile
    kept = idx.numel()
    if kept == 0:
        return shortcut.clone()
    if kept == batch:  # nothing to save: skip the gather / scatter
        y = branch(source, *extras)
        return shortcut + y * mask.to(y.dtype)
    y = branch(source.index_select(0, idx), *extras)
    y = y * mask.index_select(0, idx).to(y.dtype)
    return _scatter_add(shortcut, idx, y)


def _code_copy(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own. torch.compile (dynamo) caches compiled frames, and the
    resume functions after a graph break, per code object: one copy per site keeps each site's
    guards (its branch) from evicting the others' (recompile_limit is 8)."""
    code = fn.__code__
    name = f"{code.co_name}__{label}"
    changes: dict[str, Any] = {"co_name": name}
    if hasattr(code, "co_qualname"):
        changes["co_qualname"] = f"{code.co_qualname}__{label}"
    new = types.FunctionType(code.replace(**changes), fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__ = fn.__doc__
    return new


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
class SkipDropPath(DropPath):
    """Stochastic depth that skips dropped residual branches; see :func:`skip_drop_path`.

    Replaces a residual add ``shortcut + branch(source)`` in a patched block's train-mode graph:
    ``forward(shortcut, source, *extras)``. The branch is the block's own subgraph compiled into a
    function of ``(block, source, *extras)`` (:func:`bind_skip_module`); the owning block is held
    as a plain attribute (not a submodule: ``state_dict`` and ``named_modules`` stay unchanged, and
    ``copy.deepcopy`` of the model maps it to the copied block).

    Args:
        p: drop probability in [0, 1]; a plain attribute that schedules may reassign.
        mode: ``"row"`` (branch on the kept samples only) or ``"batch"`` (skip for the whole batch).
        scale_by_keep: divide survivors by ``1 - p``.
    """

    def __init__(self, p: float = 0.1, mode: str = "row", scale_by_keep: bool = True) -> None:
        super().__init__(p, mode, scale_by_keep)
        self._branch_fn: Optional[Callable[..., torch.Tensor]] = None
        self._checked_extras: tuple[int, ...] = ()
        self.branch_nodes: tuple[str, ...] = ()
        self.branch_code = ""
        self._impl: Callable[..., torch.Tensor] = skip_drop_path  # a per-site copy once bound
        object.__setattr__(self, "_owner", None)  # never a registered submodule

    # bind_skip_module installs a per-site copy of this method as the instance's ``forward``.
    def forward(self, shortcut: torch.Tensor, source: torch.Tensor, *extras: Any) -> torch.Tensor:  # type: ignore[override]
        fn = self._branch_fn
        owner = self._owner
        if fn is None or owner is None:
            raise RuntimeError(
                "SkipDropPath has no branch: it is created by apply_stochastic_depth(..., "
                "skip_dropped=True) and bound to its block; re-apply the plan instead of building one"
            )
        branch = functools.partial(fn, owner)
        # An optional input (default None) given a tensor at run time may be per-sample: mask.
        row_safe = not any(isinstance(extras[i], torch.Tensor) for i in self._checked_extras)
        return self._impl(shortcut, source, branch, self.p, self.training, self.mode,
                          self.scale_by_keep, extras, None, row_safe)

    def __getstate__(self) -> dict[str, Any]:
        # The compiled branch and the per-site forward are generated code (they do not pickle);
        # the owning block re-binds them when it regenerates its train forward after unpickling.
        state = super().__getstate__()
        for key in ("forward", "_branch_fn", "_impl"):
            state.pop(key, None)
        state["_branch_fn"], state["_impl"] = None, skip_drop_path
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> SkipDropPath:
        # Deepcopy keeps the bound branch (the copy's forward is rebound to the copy, its owner
        # mapped to the copied block); only pickling drops the generated code.
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        nodes = "->".join(self.branch_nodes)
        return f"{super().extra_repr()}, skip=True, branch={nodes}"


def make_skip_module(op: PlannedOp) -> SkipDropPath:
    """The module of a ``drop_path`` op with ``params["skip"]`` (called by ``rewrite._make_module``)."""
    return SkipDropPath(float(op.params.get("p", 0.0)), mode=op.params.get("mode", "row"),
                        scale_by_keep=bool(op.params.get("scale_by_keep", True)))


# ----------------------------------------------------------------------------------------------
# branch extraction
# ----------------------------------------------------------------------------------------------
class _NotSkippable(ValueError):
    """The branch of a site cannot be cut out of its block graph (the message says why)."""


@dataclass
class _BranchParts:
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


def _branch_parts(graph: fx.Graph, anchor: fx.Node, add: fx.Node) -> _BranchParts:
    operands = _is_add(add)
    if operands is None:
        raise _NotSkippable(f"node {add.name!r} is not a plain two-operand add")
    # Ops inserted after the branch output (DropBlock after the last conv+norm) belong to it.
    while anchor not in operands:
        inserted = [u for u in anchor.users
                    if u.op == "call_module" and str(u.target).startswith(f"{CONTAINER}.")]
        if len(inserted) != 1 or len(anchor.users) != 1:
            raise _NotSkippable(f"the add {add.name!r} does not read the branch {anchor.name!r}")
        anchor = inserted[0]
    shortcut = operands[1] if operands[0] is anchor else operands[0]
    flow = _Dataflow(graph)
    source = _source_of(shortcut, anchor, flow)
    if source is None:
        raise _NotSkippable(f"no value the branch {anchor.name!r} is computed from reaches the shortcut")
    others = [u.name for u in anchor.users if u is not add]
    if others:
        raise _NotSkippable(f"the branch output {anchor.name!r} is also used by {others[0]!r}")
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
            raise _NotSkippable(
                f"branch node {node.name!r} is also used outside the branch (by {outside[0].name!r})"
            )
        kept.add(node)
        kept |= {a for a in flow.ancestors[node] if a in body_set}
    bad = [n.name for n in kept if not _is_shape_node(n, memo)]
    if bad:
        raise _NotSkippable(f"branch node {bad[0]!r} feeds a value used outside the branch")
    inputs: dict[fx.Node, None] = {}
    for node in body:
        for i in tensor_inputs(node):
            if i not in body_set and i is not source:
                inputs[i] = None
        if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("_") \
                or node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and first not in body_set:
                raise _NotSkippable(f"branch node {node.name!r} modifies {first.name!r} in place")
    ordered = sorted(inputs, key=flow.order.__getitem__)
    late = [n.name for n in ordered if flow.order[n] > flow.order[add]]
    if late:
        raise _NotSkippable(f"the branch reads {late[0]!r}, which is computed after the add")
    return _BranchParts(
        add=add, anchor=anchor, shortcut=shortcut, source=source, body=body, kept=kept,
        attrs=[n for n in ordered if n.op == "get_attr"],
        extras=[n for n in ordered if n.op != "get_attr"], flow=flow,
    )


def _optional_input(node: fx.Node) -> bool:
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


def _row_blocker(block: nn.Module, scope: str, parts: _BranchParts) -> Optional[str]:
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
        if not parts.flow.from_value[extra] or _optional_input(extra):
            continue  # parameters / constants; optional inputs are checked at run time
        return (f"branch reads {extra.name!r}, a per-sample value other than its source "
                f"{parts.source.name!r}: row mode cannot gather it")
    return None


def _inplace_module_blocker(block: nn.Module, parts: _BranchParts) -> Optional[str]:
    body = set(parts.body)
    for node in parts.body:
        m = module_of(node, block)
        if m is not None and getattr(m, "inplace", False) is True:
            first = node.args[0] if node.args else None
            if isinstance(first, fx.Node) and first not in body:
                return f"branch node {node.name!r} modifies {first.name!r} in place"
    return None


def skip_blocker(model: nn.Module, site: ResidualSite, mode: str) -> Optional[str]:
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
    spec = getattr(site, "trace_example", None)  # blocks traced specialized on example inputs
    example = example_from_spec(spec) if spec else None
    graph = trace_block(block, site.scope, policy=site.trace_policy, example=example).graph
    nodes = {n.name: n for n in graph.nodes}
    if site.branch not in nodes or site.add not in nodes:
        return f"the block graph has no node {site.branch!r} / {site.add!r} (model changed since analysis?)"
    try:
        parts = _branch_parts(graph, nodes[site.branch], nodes[site.add])
    except _NotSkippable as exc:
        return str(exc)
    why = _inplace_module_blocker(block, parts)
    if why is None and mode == "row":
        why = _row_blocker(block, site.scope, parts)
    return why


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
        parts = _branch_parts(graph, anchor, user)
    except _NotSkippable as exc:
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
        checked=tuple(i for i, e in enumerate(parts.extras) if _optional_input(e)),
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
    code = graph.python_code(root_module="self")
    filename = f"<regsurgery skip branch {label} #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx-generated code
    return namespace["forward"], code.src


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
    label = f"site{next(_counter)}"
    module._impl = _code_copy(skip_drop_path, label)
    # Instance-level forward (like patched blocks): a bound method, so deepcopy rebinds it.
    module.__dict__["forward"] = types.MethodType(_code_copy(SkipDropPath.forward, label), module)
    # The owner is a plain attribute: registering it would make a module cycle (state_dict,
    # named_modules, train() recursion); deepcopy of the model maps it to the copied block.
    object.__setattr__(module, "_owner", block)
