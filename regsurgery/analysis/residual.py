"""Residual-site detection: a pure function of block-local fx graphs.

A residual add merges a *branch* computed from a value ``v`` with ``v`` itself (identity
shortcut) or with a cheap projection of ``v`` (a 1x1 conv + norm, a pooling, a scale: the
downsampling path). The decision is made on the dataflow graph, never on names:

* identity: one operand ``s`` is an ancestor of the other operand ``t``;
* projection: one operand ``s`` is reached from an ancestor ``v`` of ``t`` through a chain of
  single-input nodes that holds at most one weighted layer (conv / linear).

The branch (the nodes on paths from the shortcut source to ``t``) must do real work: at least
two weighted layers on its longest chain, or one weighted layer with a normalization or a
learned scale (LayerScale) and no sum inside it that bypasses that layer. For a projection
shortcut the branch must also be deeper than the shortcut. This rejects the decoys seen in real models:

* position embeddings and attention biases/masks: the other operand is a parameter, a buffer or
  an unrelated input, never an ancestor;
* sums of attention terms and of parallel conv branches (RepVGG / MobileOne): siblings, not
  ancestor and descendant, and each parallel branch is a single weighted layer;
* conditional position encodings (``x + dwconv(x)``): a single weighted layer, no norm;
* reparameterizable one-layer blocks wrapped in a skip (FastViT's RepMixer
  ``x + s * (mixer(x) - norm(x))``): the one-layer branch holds a second, layer-free path;
* FPN-style merges: the branch upsamples.

"Weighted layer" counts leaf modules: a built-in conv / linear / attention is 1, a custom module
counts the conv and linear layers inside it (at least 1 if it holds any layer that computes).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture.fx import (
    BlockGraph,
    TraceFailure,
    is_drop_path_slot,
    is_library_module,
    module_of,
    own_node,
    qualified,
    require_module,
    tensor_inputs,
    trace_block,
)
from ..capture.inline import inline_policy, is_inline_policy, site_owner_scope
from ..capture.model import ModelCapture, capture_model
from ..capture.session import tracing_session
from ..ops.slots import rate_attr

__all__ = [
    "ResidualSite",
    "RejectedAdd",
    "SiteReport",
    "find_residual_sites",
    "analyse_block",
    "residual_report",
    "stack_depths",
]

_WEIGHTED_TYPES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.MultiheadAttention,
    nn.RNNBase,
)
_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_WEIGHTED_FUNCTIONS = {
    torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, operator.matmul,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.scaled_dot_product_attention,
}
_WEIGHTED_FUNCTIONS |= {torch.addmm, torch.addbmm}  # HF Conv1D (GPT-2): x @ W + b in one call
_WEIGHTED_METHODS = {"matmul", "bmm", "mm"}
_NORM_FUNCTIONS = {F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.normalize}
_UPSAMPLE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)  # type: ignore[assignment]
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS.add(F.rms_norm)

#: The projection chain of a shortcut may hold at most this many nodes.
_MAX_PROJECTION_CHAIN = 8


@dataclass
class ResidualSite:
    """One residual add in the forward of the module at ``scope``.

    ``index`` is the position of the site in the model (registration order of scopes, then
    graph order); ``depth`` is the block index schedules use (every site in one scope shares it,
    so both residuals of a transformer block get the same rate). Node names refer to the
    scope's train-mode block graph (see :func:`regsurgery.tracing.trace_block`).
    """

    scope: str
    index: int
    depth: int
    add: str
    branch: str
    shortcut: str
    branch_operand: int
    kind: str  # "identity" or "projection"
    branch_nodes: list[str] = field(default_factory=list)
    shortcut_nodes: list[str] = field(default_factory=list)
    branch_weight: float = 0.0
    existing: Optional[str] = None  # qualified name of an existing DropPath/StochasticDepth slot
    existing_attr: Optional[str] = None  # its rate attribute ("drop_prob" for timm, "p" otherwise)
    trace_policy: str = "children"
    trace_example: Optional[dict[str, Any]] = None  # example-argument spec of a specialized trace
    block: str = ""  # the block the site belongs to: its scope, or the stacked module its branch calls
    forced: bool = False  # rejected by the rules, put in by an ``include``/``force`` pattern

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class RejectedAdd:
    """An add of two data values that was considered as a residual site and rejected.

    ``rule`` is a short key (``no-shortcut``, ``shortcut``, ``upsample``, ``shallow-branch``,
    ``bypass``, ``projection-depth``), ``reason`` says it in words. ``key`` (``"scope:add"``)
    is what an ``include`` / ``force`` pattern names to put the add in anyway; that is only
    possible when one operand is computed from the other (``forceable``).
    """

    scope: str
    add: str
    rule: str
    reason: str
    branch_weight: float = 0.0
    candidate: Optional[ResidualSite] = field(default=None, repr=False)  # the site it would be

    @property
    def key(self) -> str:
        return f"{self.scope}:{self.add}"

    @property
    def forceable(self) -> bool:
        return self.candidate is not None

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "add": self.add, "rule": self.rule, "reason": self.reason,
                "branch_weight": self.branch_weight, "key": self.key, "forceable": self.forceable}


@dataclass
class SiteReport:
    """What detection found, what it rejected and why, and what it could not look at."""

    sites: list[ResidualSite]
    skipped: list[TraceFailure]
    blocks_traced: int
    rejected: list[RejectedAdd] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [vars(f) for f in self.skipped],
            "blocks_traced": self.blocks_traced,
            "rejected": [r.to_dict() for r in self.rejected],
        }

    def closest(self, limit: int = 5) -> list[RejectedAdd]:
        """The rejected adds nearest to being sites: forceable ones, deepest branch first."""
        ranked = sorted(self.rejected, key=lambda r: (not r.forceable, -r.branch_weight))
        return ranked[:limit]


# ----------------------------------------------------------------------------- node properties


def _is_activation(module: nn.Module) -> bool:
    mod = type(module).__module__
    return not isinstance(module, nn.MultiheadAttention) and (
        mod == "torch.nn.modules.activation" or mod.startswith("timm.layers.activations"))


def _computes(module: nn.Module) -> bool:
    """Does a module hold any layer that computes? Identities, dropouts, containers, norms and
    activations do not: a custom module of only a BN (FastViT's ``norm`` path of RepMixer) is a
    normalization, not a layer; a pooling (PoolFormer's mixer) is."""
    return any(
        m is not module
        and not isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd, nn.Sequential, nn.ModuleList))
        and not is_drop_path_slot(m)
        and not _is_norm_module(m)
        and not _is_activation(m)
        for m in module.modules()
    )


def _has_weighted_layer(module: nn.Module) -> bool:
    return any(isinstance(m, _WEIGHTED_TYPES) for m in module.modules())


def _is_norm_module(module: nn.Module) -> bool:
    # By name only for library modules without a layer (BatchNormAct2d, LayerNorm2d...): a
    # ConvNormAct is a conv that happens to normalize, not a normalization.
    return isinstance(module, _NORM_TYPES) or (
        is_library_module(module) and "Norm" in type(module).__name__ and not _has_weighted_layer(module)
    )


@dataclass(frozen=True)
class _NodeCost:
    weight: float
    norm: bool
    upsample: bool


_ZERO = _NodeCost(0.0, False, False)


class _Costs:
    """Cost of graph nodes: weighted layers on the node (and whether it normalizes / upsamples).

    A custom leaf module costs its *depth*: the longest chain of weighted layers through its own
    traced graph, computed recursively and memoized, so that a module of parallel convs
    (MobileOne, RepVGG) is one layer deep however many convs it holds.
    """

    def __init__(self, capture: Optional[ModelCapture] = None) -> None:
        self._depth: dict[int, float] = {}
        self._capture = capture
        # id(module) -> (net upsampling steps, normalizes a layer's output, merges parallel paths)
        self._flags: dict[int, tuple[int, bool, bool]] = {}

    def module_depth(self, module: nn.Module) -> float:
        key = id(module)
        if key not in self._depth:
            self._depth[key] = 0.0  # guards recursion through a module that calls itself
            self._flags[key] = (0, False, False)
            self._depth[key] = self._trace_depth(module)
        return self._depth[key]

    def module_flags(self, module: nn.Module) -> tuple[bool, bool]:
        """(upsamples, normalizes a layer's output) for a module called as one node. A module
        upsamples when it upsamples more often than it strides (a decoder's up-block); one that
        strides and upsamples back (a strided attention) keeps the resolution."""
        self.module_depth(module)
        net, normed, _ = self._flags[id(module)]
        return net > 0, normed

    def module_merges(self, module: nn.Module) -> bool:
        """Does a module merge parallel paths of its input (a sum, or a product of activations)?"""
        self.module_depth(module)
        return self._flags[id(module)][2]

    def _scale_steps(self, node: fx.Node, module: nn.Module) -> int:
        """+1 for an upsampling, -1 for a strided conv / pooling, a custom module's net count."""
        if self.node(node, module).upsample and node.op != "call_module":
            return 1
        m = module_of(node, module)
        if m is None or is_drop_path_slot(m):
            return 0
        if isinstance(m, (nn.Upsample, nn.modules.conv._ConvTransposeNd)):
            return 1
        if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
            stride = m.stride if isinstance(m.stride, (tuple, list)) else (m.stride,)
            return -1 if any(int(st or 1) > 1 for st in stride) else 0  # type: ignore[call-overload, arg-type]
        if next(m.children(), None) is None and not _has_weighted_layer(m):
            return 0
        self.module_depth(m)
        return self._flags[id(m)][0]

    def _trace_depth(self, module: nn.Module) -> float:
        # A custom module that computes with no weights (PoolFormer's pooling mixer) is one layer;
        # one with no children (a layer-scale multiplier) is a scale, not a layer.
        floor = 1.0 if _computes(module) else 0.0
        try:
            captured = self._capture.graph_of(module) if self._capture is not None else None
            graph = captured if captured is not None else trace_block(module).graph
        except Exception:  # untraceable: count its weighted layers, an upper bound of its depth
            weighted = sum(isinstance(m, _WEIGHTED_TYPES) for m in module.modules())
            ups = sum(isinstance(m, (nn.Upsample, nn.modules.conv._ConvTransposeNd)) for m in module.modules())
            self._flags[id(module)] = (ups, False, False)
            return max(float(weighted), floor)
        depth: dict[fx.Node, float] = {}
        net = 0
        merges = False
        # A norm fed by a layer, with no sum after it: a conv-norm(-act) chain (one nn.Sequential
        # subclass holding conv, norm and activation) normalizes its layer's output. A module that
        # sums parallel paths (MobileOne / RepVGG) is a reparameterizable layer, not a normed one.
        normed: dict[fx.Node, bool] = {}
        from_input: dict[fx.Node, bool] = {}
        for n in graph.nodes:
            ins = tensor_inputs(n)
            prior = [depth[i] for i in ins]
            cost = self.node(n, module)
            depth[n] = (max(prior) if prior else 0.0) + cost.weight
            net += self._scale_steps(n, module)
            is_sum = (n.op == "call_function" and n.target in _SUM_FUNCTIONS) or (
                n.op == "call_method" and n.target in _SUM_METHODS)
            is_product = ((n.op == "call_function" and n.target in _WEIGHTED_FUNCTIONS) or (
                n.op == "call_method" and n.target in _WEIGHTED_METHODS)) and not _applies_parameters(n)
            data = [i for i in ins if i.op != "get_attr"]
            from_input[n] = n.op == "placeholder" or any(from_input.get(i, False) for i in data)
            if (is_sum or is_product) and sum(from_input.get(i, False) for i in data) >= 2:
                merges = True
            m = module_of(n, module)
            if m is not None and not isinstance(m, _WEIGHTED_TYPES) and next(m.children(), None) is not None:
                merges = merges or self.module_merges(m)
            normed[n] = (not is_sum) and (
                (cost.norm and (cost.weight >= 1 or (bool(prior) and max(prior) >= 1)))
                or any(normed.get(i, False) for i in data))
            if n.op == "output":
                self._flags[id(module)] = (net, normed[n], merges)
                return max(depth[n], floor)
        self._flags[id(module)] = (net, False, merges)
        return floor

    def node(self, node: fx.Node, root: nn.Module) -> _NodeCost:
        if node.op == "call_module":
            m = module_of(node, root)
            if m is None or is_drop_path_slot(m):
                return _ZERO
            if isinstance(m, nn.Upsample):
                return _NodeCost(0.0, False, True)
            if isinstance(m, nn.MultiheadAttention):  # in-projection, then out-projection
                return _NodeCost(2.0, False, False)
            if isinstance(m, _WEIGHTED_TYPES):
                return _NodeCost(1.0, False, False)
            if _is_norm_module(m):
                return _NodeCost(0.0, True, False)
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                return _NodeCost(1.0, False, True)
            if is_library_module(m) and not isinstance(m, (nn.Sequential, nn.ModuleList)):
                # A no-trace composite (timm ConvNormAct) is as deep as the layers inside it.
                if not _has_weighted_layer(m):
                    return _ZERO
                up, normed = self.module_flags(m)
                return _NodeCost(self.module_depth(m), normed, up)
            # A norm inside a composite counts only when it normalizes a layer's output on a
            # single path (conv -> norm -> act); parallel paths summed inside the module
            # (RepMixer / MobileOne decoys) do not count as normalized. An upsampling inside
            # a wrapper module is still an upsampling (a decoder's ``self.up(x)``).
            up, normed = self.module_flags(m)
            return _NodeCost(self.module_depth(m), normed, up)
        if node.op == "call_function":
            if node.target in _WEIGHTED_FUNCTIONS:
                return _NodeCost(1.0 if _applies_parameters(node) else 0.0, False, False)
            if node.target in _NORM_FUNCTIONS:
                return _NodeCost(0.0, True, False)
            if node.target in _UPSAMPLE_FUNCTIONS:
                return _NodeCost(0.0, False, True)
        if node.op == "call_method" and node.target in _WEIGHTED_METHODS:
            return _NodeCost(1.0 if _applies_parameters(node) else 0.0, False, False)
        return _ZERO


def _applies_parameters(node: fx.Node) -> bool:
    """A matmul / linear / conv applies a layer only when an operand is a parameter; a product of
    two activations (attention logits, attention times values) is not a layer."""
    return any(i.op == "get_attr" for i in tensor_inputs(node))


def _is_add(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """The two tensor operands of an elementwise add, or None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if len(node.args) != 2 or set(node.kwargs) - {"out"}:
            return None  # torch.add(a, b, alpha=...) scales an operand: not a plain residual
        a, b = node.args
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        if len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
    else:
        return None
    if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b:
        return a, b
    return None


def _is_value(node: fx.Node) -> bool:
    """A node that carries data flowing into the block (not a parameter, buffer or constant)."""
    return node.op not in ("get_attr",)


# ----------------------------------------------------------------------------- graph helpers


_SIZE_ANNOTATION = re.compile(r"int|(torch\.)?Size|(typing\.)?(List|Tuple|list|tuple)\[int(, ?int)*(, ?\.\.\.)?\]")
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}


def _is_shape_like(n: fx.Node, inputs: list[fx.Node], known: dict[fx.Node, bool]) -> bool:
    """Does ``n`` hold a size (``x.shape[0]``, ``H * W``, an int argument) rather than data?"""
    if n.op == "placeholder":  # an argument annotated as a size (MViTv2's ``feat_size: List[int]``)
        if n.type is None:
            return False
        name = n.type.__name__ if isinstance(n.type, type) else str(n.type)
        return _SIZE_ANNOTATION.fullmatch(name) is not None
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
    if n.op == "call_method" and n.target in _SHAPE_METHODS:
        return True
    if n.op == "call_function" and inputs and n.target in (operator.getitem, operator.mul, operator.add,
                                                           operator.sub, operator.floordiv, math.prod):
        return all(known.get(i, False) for i in inputs)
    return False


class _Dataflow:
    """Ancestor sets (all inputs, and data inputs only) of every node of one graph, computed once."""

    def __init__(self, graph: fx.Graph) -> None:
        self.ancestors: dict[fx.Node, frozenset[fx.Node]] = {}
        self.data_ancestors: dict[fx.Node, frozenset[fx.Node]] = {}
        self.from_value: dict[fx.Node, bool] = {}
        self.order: dict[fx.Node, int] = {}
        self.shape_like: dict[fx.Node, bool] = {}  # sizes and ints derived from them, not data
        for n in graph.nodes:
            self.order[n] = len(self.order)
            inputs = tensor_inputs(n)
            self.shape_like[n] = _is_shape_like(n, inputs, self.shape_like)
            anc: set[fx.Node] = set(inputs)
            for i in inputs:
                anc |= self.ancestors[i]
            self.ancestors[n] = frozenset(anc)
            # Data ancestors: a value that only lends its size (``x.reshape(B, N - 1, -1)`` with
            # ``B, N`` from another tensor's shape) is not on the data path (TNT's outer tokens).
            data = [i for i in inputs if not self.shape_like[i]]
            data_anc: set[fx.Node] = set(data)
            for i in data:
                data_anc |= self.data_ancestors[i]
            self.data_ancestors[n] = frozenset(data_anc)
            # Does any placeholder reach this node? (a pure function of parameters does not)
            self.from_value[n] = n.op == "placeholder" or any(self.from_value[i] for i in inputs)

    def between(self, source: fx.Node, target: fx.Node) -> list[fx.Node]:
        """Nodes on some path source -> target in graph order, excluding source, including target."""
        inner = [n for n in self.ancestors[target] if source in self.ancestors[n]]
        return sorted(inner, key=self.order.__getitem__) + [target]


def _projection_chain(
    shortcut: fx.Node, branch: fx.Node, flow: _Dataflow, root: nn.Module, costs: _Costs,
    why: Optional[list[str]] = None,
) -> Optional[tuple[fx.Node, list[fx.Node], float, bool]]:
    """Walk from ``shortcut`` back through single-input nodes to an ancestor of ``branch``.

    Returns (source, chain nodes, chain weight, has a k x k layer) or None when no cheap chain
    reaches one; ``why`` then gets the reason.
    """
    chain: list[fx.Node] = []
    weight = 0.0
    kxk = False
    node = shortcut
    branch_ancestors = flow.data_ancestors[branch]
    why = why if why is not None else []
    for _ in range(_MAX_PROJECTION_CHAIN):
        value_inputs = [i for i in tensor_inputs(node) if flow.from_value[i] and not flow.shape_like[i]]
        if node.op != "call_module" and node.op != "call_function" and node.op != "call_method":
            why.append("neither operand is computed from the other (a parameter, a buffer or an unrelated input)")
            return None
        if len(value_inputs) != 1:
            why.append("neither operand is computed from the other through a single-input chain "
                       "(sibling paths merged)")
            return None
        if _is_slice_of_split(node):
            why.append("the other operand is another chunk of a split tensor (different data)")
            return None  # another chunk of a split tensor (Res2Net, EdgeNeXt): different data
        chain.append(node)
        cost = costs.node(node, root).weight
        weight += cost
        if weight > 1.0:
            why.append("the shortcut holds more than one weighted layer")
            return None
        kxk = kxk or bool(cost and not _is_pointwise(node, root))
        node = value_inputs[0]
        if node in branch_ancestors:
            return node, chain, weight, kxk
    why.append(f"no chain of at most {_MAX_PROJECTION_CHAIN} single-input nodes links the operands")
    return None


def _upsample_on_every_path(source: fx.Node, body: list[fx.Node], costs: list[_NodeCost]) -> bool:
    """Does every path source -> branch pass through an upsampling (an FPN / U-Net top-down
    merge)? An upsampled gate multiplied into the branch (a spatial attention map) does not."""
    up = {n for n, c in zip(body, costs) if c.upsample}
    if not up:
        return False
    clear = {source}
    for n in body:
        if n not in up and any(i in clear for i in tensor_inputs(n)):
            clear.add(n)
    return body[-1] not in clear


def _reads_around(source: fx.Node, branch: fx.Node, flow: _Dataflow) -> bool:
    """Does the branch read a data ancestor of the shortcut ``source`` through a path that avoids
    ``source``? In a residual ``s + f(s)`` the branch sees the block's data only through ``s``;
    ``q + proj(attn(q) * k)`` with ``q, k`` two projections of ``x`` reads ``x`` around ``q``."""
    above = {a for a in flow.data_ancestors[source]
             if a.op != "get_attr" and not flow.shape_like[a] and flow.from_value[a]}
    if not above:
        return False
    inside = flow.data_ancestors[branch]
    around: set[fx.Node] = set(above)
    for n in sorted(inside, key=flow.order.__getitem__):
        if n is source or n in around or flow.shape_like[n]:
            continue
        if any(i in around for i in tensor_inputs(n) if not flow.shape_like[i]):
            around.add(n)
    return any(i in around for i in tensor_inputs(branch) if i is not source and not flow.shape_like[i]) or (
        branch in around)


def _merges_paths(body: list[fx.Node], source: fx.Node, flow: _Dataflow, residual_adds: set[fx.Node],
                  root: nn.Module, costs: _Costs) -> bool:
    """Does the branch merge two paths from its source by a sum or a product of activations
    (attention logits, multi-branch sums)? A gate (``x * sigmoid(se(x))``) is one path scaled,
    a nested residual add is a block of its own: neither counts."""
    inside = set(body) | {source}
    for n in body:
        ins = [i for i in tensor_inputs(n) if i in inside and not flow.shape_like[i]]
        if len(ins) < 2 or n in residual_adds:
            continue
        is_sum = (n.op == "call_function" and n.target in _SUM_FUNCTIONS) or (
            n.op == "call_method" and n.target in _SUM_METHODS)
        is_product = (n.op == "call_function" and n.target in _WEIGHTED_FUNCTIONS) or (
            n.op == "call_method" and n.target in _WEIGHTED_METHODS)
        if is_sum or (is_product and not _applies_parameters(n)):
            return True
    return any(m is not None and costs.module_merges(m) for m in (module_of(n, root) for n in body))


_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split, torch.unbind, torch.functional.split}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes"}


def _is_slice_of_split(node: fx.Node) -> bool:
    """``parts[i]`` where ``parts`` comes from split / chunk / unbind."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return False
    return (src.op == "call_function" and src.target in _SPLIT_FUNCTIONS) or (
        src.op == "call_method" and src.target in _SPLIT_METHODS
    )


def _is_pointwise(node: fx.Node, root: nn.Module) -> bool:
    """A projection layer that mixes channels only: every conv in it is 1x1 (linears are)."""
    m = module_of(node, root)
    if m is None:
        return True  # a functional conv / linear: its kernel is an input, not known here
    convs = [c for c in m.modules() if isinstance(c, nn.modules.conv._ConvNd)]
    return all(math.prod(c.kernel_size) == 1 for c in convs)


def _existing_slot(branch: fx.Node, root: nn.Module, scope: str) -> tuple[Optional[str], Optional[str]]:
    """An existing DropPath / StochasticDepth module applied last on the branch (through scales)."""
    node = branch
    for _ in range(4):
        if node.op == "call_module":
            m = module_of(node, root)
            if m is not None and is_drop_path_slot(m):
                attr = rate_attr(m)
                return qualified(scope, str(node.target)), attr
        inputs = tensor_inputs(node)
        if not inputs:
            break
        # Step back through a layer-scale multiply or a scale module: the data input is the one
        # that is not a parameter.
        data = [i for i in inputs if i.op != "get_attr"]
        if len(data) != 1:
            break
        node = data[0]
    return None, None


def _chain_depths(
    source: fx.Node, body: list[fx.Node], costs: list[_NodeCost]
) -> tuple[dict[fx.Node, float], dict[fx.Node, float]]:
    """Weighted layers on the deepest and on the shallowest path source -> each branch node.

    The deepest path's count is the branch's sequential depth, so that parallel single-layer
    branches summed together (RepVGG) do not add up to a deep branch; the shallowest tells a path
    that goes around every layer (see :func:`_bypasses_layer`)."""
    cost = dict(zip(body, costs))
    longest: dict[fx.Node, float] = {source: 0.0}
    shortest: dict[fx.Node, float] = {source: 0.0}
    for n in body:
        ins = [i for i in tensor_inputs(n) if i in longest]
        longest[n] = (max(longest[i] for i in ins) if ins else 0.0) + cost[n].weight
        shortest[n] = (min(shortest[i] for i in ins) if ins else 0.0) + cost[n].weight
    return longest, shortest


_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}


def _is_learned_scale(node: fx.Node, root: nn.Module, costs: _Costs) -> bool:
    """A multiply by a parameter (``gamma * x``), or a scale module: a custom module with
    parameters, no children and no layer (timm LayerScale / LayerScale2d)."""
    if (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    ):
        return any(i.op == "get_attr" for i in tensor_inputs(node))
    m = module_of(node, root)
    if m is None or is_library_module(m) or next(m.children(), None) is not None:
        return False
    return next(m.parameters(), None) is not None and costs.module_depth(m) == 0


_SUM_FUNCTIONS = _ADD_FUNCTIONS | {operator.sub, operator.isub, torch.sub}
_SUM_METHODS = _ADD_METHODS | {"sub", "sub_"}


def _bypasses_layer(
    body: list[fx.Node], longest: dict[fx.Node, float], shortest: dict[fx.Node, float],
    residual_adds: set[fx.Node],
) -> bool:
    """Some sum in the branch adds a path through a weighted layer to a path around every layer.

    A one-layer branch is residual only without such a second shortcut inside it: parallel
    paths summed with a layer-free one (FastViT RepMixer's ``x + scale * (mixer(x) - norm(x))``,
    RepVGG's BN identity path, a conditional position encoding ``y + dwconv(y)``) make a
    reparameterizable block, not a residual branch. A sum that is itself a residual site (a
    residual block nested in the branch) does not count, nor do products (gates, inline SiLU).
    ``longest`` / ``shortest`` come from :func:`_chain_depths`.
    """
    for n in body:
        is_sum = (n.op == "call_function" and n.target in _SUM_FUNCTIONS) or (
            n.op == "call_method" and n.target in _SUM_METHODS)
        if not is_sum or n in residual_adds:
            continue
        ins = [i for i in tensor_inputs(n) if i in longest]
        if len(ins) >= 2 and any(longest[i] >= 1 for i in ins) and any(shortest[i] == 0 for i in ins):
            return True
    return False


def _classify_add(
    a: fx.Node, b: fx.Node, flow: _Dataflow, root: nn.Module, costs: _Costs,
    residual_adds: set[fx.Node], rejections: Optional[list[tuple[str, str, float, Optional[dict]]]] = None,
) -> Optional[dict[str, Any]]:
    """The residual reading of ``a + b`` (the deepest when both operands could be the branch),
    or None; ``rejections`` gets ``(rule, reason, branch weight, candidate or None)`` per operand order."""
    candidates = []
    rejections = rejections if rejections is not None else []

    def reject(rule: str, reason: str, weight: float = 0.0, cand: Optional[dict] = None) -> None:
        rejections.append((rule, reason, weight, cand))

    for branch_pos, (branch, shortcut) in enumerate(((a, b), (b, a))):
        if not (flow.from_value[branch] and flow.from_value[shortcut]):
            reject("no-shortcut", "an operand is computed from parameters only (an embedding, a bias)")
            continue
        if not _is_value(shortcut):
            reject("no-shortcut", f"operand {shortcut.name} is a parameter or buffer, not the block's input")
            continue
        kxk = False
        if shortcut in flow.data_ancestors[branch]:
            source, chain, chain_weight, kind = shortcut, [], 0.0, "identity"  # type: ignore[var-annotated]
        else:
            why: list[str] = []
            found = _projection_chain(shortcut, branch, flow, root, costs, why)
            if found is None:
                reject("no-shortcut", why[0] if why else "no shortcut path")
                continue
            source, chain, chain_weight, kxk = found
            kind = "projection"
        body = flow.between(source, branch)
        node_costs = [costs.node(n, root) for n in body]
        longest, shortest = _chain_depths(source, body, node_costs)
        weight = longest[body[-1]]
        norm = any(c.norm for c in node_costs)
        cand = dict(
            branch=branch, shortcut=shortcut, branch_operand=branch_pos, kind=kind,
            branch_nodes=[n.name for n in body], shortcut_nodes=[n.name for n in chain],
            branch_weight=weight,
        )
        if _upsample_on_every_path(source, body, node_costs):
            reject("upsample", "the branch upsamples: a top-down merge of a deeper path (FPN, U-Net "
                   "decoder), not a residual", weight, cand)
            continue  # FPN-style top-down merge
        if weight < 1:
            reject("shallow-branch", "the branch has no weighted layer", weight, cand)
            continue
        if kind == "identity" and _reads_around(source, branch, flow):
            reject("around-shortcut", "the branch also reads what the shortcut was computed from, "
                   "around it (a merge inside an attention: q + f(q, k(x))), so the shortcut is not "
                   "the stream the branch works on", weight, cand)
            continue
        if weight < 2:
            if _bypasses_layer(body, longest, shortest, residual_adds):
                reject("bypass", "a one-layer branch with a second, layer-free path summed inside it "
                       "(a reparameterizable block, not a residual branch)", weight, cand)
                continue
            if not (norm or any(_is_learned_scale(n, root, costs) for n in body)):
                reject("shallow-branch", "a one-layer branch without normalization or learned scale "
                       "(a conditional position encoding / plain conv add)", weight, cand)
                continue
        # A chain of scales and identities (PoolFormer's res_scale) is an identity shortcut in
        # disguise. Any other projection (a 1x1 conv, or a BN: RepVGG's identity branch) must
        # be shallower than a branch of at least two layers.
        disguised_identity = kind == "projection" and not any(
            c.weight or c.norm for c in (costs.node(n, root) for n in chain))
        if kind == "projection" and not disguised_identity and not (weight >= 2 and weight > chain_weight):
            reject("projection-depth", f"the projection shortcut ({chain_weight:g} layers) is not shallower "
                   f"than a branch of at least two layers ({weight:g})", weight, cand)
            continue
        # A k x k conv on the shortcut is a layer of its own: the add is a residual unit only when
        # the branch is one chain of layers; a branch that merges parallel paths (attention,
        # multi-branch sums) next to a k x k conv is two computations merged (EfficientFormerV2).
        if kxk and _merges_paths(body, source, flow, residual_adds, root, costs):
            reject("shortcut", "a k x k conv shortcut next to a branch that merges parallel paths "
                   "(attention): two computations merged, not a residual unit", weight, cand)
            continue
        candidates.append(cand)
    if not candidates:
        return None
    return max(candidates, key=lambda c: float(c["branch_weight"]))  # type: ignore[arg-type]


def _block_key(body: list[fx.Node], root: nn.Module) -> str:
    """The stacked module a branch runs, relative to the block: the deepest module that every
    module call of the branch lies in, when that module is an element of a container (a
    ``ModuleList`` / ``Sequential`` / ``ModuleDict``): ``for blk in self.blocks: x = x + blk(x)``
    makes each ``blocks.i`` a block of its own. ``""`` when the branch is the block's own work
    (a transformer block's attention and MLP residuals share the block)."""
    paths = []
    for n in body:
        if n.op != "call_module":
            continue
        m = module_of(n, root)
        if m is None or is_drop_path_slot(m):
            continue
        paths.append(str(n.target).split("."))
    if not paths:
        return ""
    prefix = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    # the deepest prefix that is a container element
    while prefix:
        parent_path = ".".join(prefix[:-1])
        try:
            parent = root if not parent_path else root.get_submodule(parent_path)
        except AttributeError:
            return ""
        stock_sequential = isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
        if isinstance(parent, (nn.ModuleList, nn.ModuleDict)) or stock_sequential:
            return ".".join(prefix)
        prefix = prefix[:-1]
    return ""


def analyse_block(
    block: BlockGraph, costs: Optional[_Costs] = None, rejected: Optional[list[RejectedAdd]] = None,
) -> list[ResidualSite]:
    """The residual adds in one block graph, in graph order (``index`` -1 and ``depth`` 0: the
    report numbers them).

    Only adds of the block's own forward count: with the "library" leaf policy the graph also
    holds inlined children, whose adds are found when those children are analysed themselves.
    ``rejected`` gets a :class:`RejectedAdd` for every own add of two data values that is not a
    site (shape arithmetic is not considered).
    """
    costs = costs or _Costs()
    flow = _Dataflow(block.graph)
    found = []
    # Every residual add of the graph, inlined children's included: a branch that nests a
    # residual block is still a single path (see _bypasses_layer).
    residual_adds: set[fx.Node] = set()
    for node in block.graph.nodes:
        operands = _is_add(node)
        if operands is None:
            continue
        reasons: list[tuple[str, str, float, Optional[dict]]] = []
        info = _classify_add(*operands, flow, block.module, costs, residual_adds, reasons)
        if info is None:
            if rejected is not None and own_node(node) and not flow.shape_like[node] and not any(
                    flow.shape_like[o] for o in operands):
                rejected.append(_rejection(block, node, reasons))
            continue
        residual_adds.add(node)
        if is_inline_policy(block.policy):
            # Inlined children: the add belongs to the innermost module holding it and its branch.
            if site_owner_scope(block.graph, node.name, [n for n in info["branch_nodes"]]) != "":
                continue
        elif not own_node(node):
            continue
        found.append(_site_info(block, node, info))
    return found


def _site_info(block: BlockGraph, node: fx.Node, info: dict[str, Any]) -> ResidualSite:
    """The site record of a classified add (``info``: the candidate :func:`_classify_add` built)."""
    existing, attr = _existing_slot(info["branch"], block.module, block.scope)
    key = _block_key([n for n in block.graph.nodes if n.name in set(info["branch_nodes"])], block.module)
    return ResidualSite(
        scope=block.scope, index=-1, depth=0, add=node.name, branch=info["branch"].name,
        shortcut=info["shortcut"].name, branch_operand=int(info["branch_operand"]), kind=str(info["kind"]),
        branch_nodes=list(info["branch_nodes"]), shortcut_nodes=list(info["shortcut_nodes"]),
        branch_weight=float(info["branch_weight"]), existing=existing, existing_attr=attr,
        trace_policy=block.policy, trace_example=block.example, block=qualified(block.scope, key),
    )


def _rejection(block: BlockGraph, node: fx.Node, reasons: list[tuple[str, str, float, Optional[dict]]]) -> RejectedAdd:
    """The most telling reason: one that got furthest (a candidate with the deepest branch)."""
    if not reasons:
        return RejectedAdd(block.scope, node.name, "no-shortcut", "no operand reading applies")
    rule, reason, weight, cand = max(reasons, key=lambda r: (r[3] is not None, r[2]))
    site = _site_info(block, node, cand) if cand is not None else None
    return RejectedAdd(block.scope, node.name, rule, reason, weight, site)


def residual_report(
    model_or_blocks: Union[nn.Module, ModelCapture, Iterable[Union[BlockGraph, TraceFailure]]],
    example_inputs: Optional[Any] = None,
    force: Union[None, str, Iterable[str]] = None,
) -> SiteReport:
    """All residual sites of a model, the adds rejected (with the rule and reason), and the
    modules that could not be traced.

    Blocks whose forward fails symbolic tracing on control flow are traced again specialized on
    their arguments from one real forward of ``example_inputs`` (inferred when possible, see
    :func:`regsurgery.stages.infer_example_input`); guards in the patched forward raise a clear
    error if another input would take another branch.

    ``force``: ``"scope:addnode"`` patterns (shell-style, see :attr:`RejectedAdd.key`) of rejected
    adds to take as sites anyway; they are marked ``forced=True``. A pattern that names no
    forceable rejected add is an error.

    Depths: sites of one block share a depth; blocks are numbered in module registration order,
    then in execution (graph) order inside one forward, so ``for blk in self.blocks:
    x = x + blk(x)`` gives each ``blocks.i`` its own, increasing depth.
    """
    if isinstance(model_or_blocks, (str, bytes)) or not isinstance(model_or_blocks, (nn.Module, Iterable)):
        require_module(model_or_blocks)
    capture: Optional[ModelCapture] = None
    if isinstance(model_or_blocks, nn.Module):
        capture = capture_model(model_or_blocks, example_inputs)
    elif isinstance(model_or_blocks, ModelCapture):
        capture = model_or_blocks
    items: list[Union[BlockGraph, TraceFailure]] = list(
        capture if capture is not None else model_or_blocks  # type: ignore[arg-type]
    )
    patterns = [force] if isinstance(force, str) else list(force or [])
    sites: list[ResidualSite] = []
    skipped: list[TraceFailure] = []
    rejected: list[RejectedAdd] = []
    traced = 0
    depth_of: dict[str, int] = {}
    costs = _Costs(capture)
    with tracing_session():  # children captured on demand share fx's patching
        found = _inline_aware_sites(items, capture, costs)
    used: set[str] = set()
    for item in items:
        if isinstance(item, TraceFailure):
            skipped.append(item)
            continue
        traced += 1
        block, infos, block_rejected = found[id(item)]
        forced = []
        for r in block_rejected:
            hits = [p for p in patterns if fnmatch.fnmatchcase(r.key, p)]
            if hits and r.forceable:
                used.update(hits)
                forced.append(r)
            else:
                rejected.append(r)
        if forced:
            order = {n.name: i for i, n in enumerate(block.graph.nodes)}
            infos = sorted([*infos, *(dataclasses.replace(r.candidate, forced=True) for r in forced
                                      if r.candidate is not None)],
                           key=lambda s: order[s.add])
        for info in infos:
            sites.append(dataclasses.replace(info, scope=item.scope, index=len(sites), depth=0))
    # Residual blocks inside a context generator beside the stream (GCViT's global-query
    # generator) do not do the stream's work: rejected, and forceable by name.
    side: set[str] = set()
    graphs = [item for item in items if not isinstance(item, TraceFailure)]
    by_scope: dict[str, list[ResidualSite]] = {}
    for site in sites:
        by_scope.setdefault(site.scope, []).append(site)
    streams = {g.scope: _stream_params(g, by_scope.get(g.scope, [])) for g in graphs}
    for g in graphs:
        side |= _side_children(g, streams)
    if side:
        off = _beside_stream(sites, side)
        for site in off:
            if any(fnmatch.fnmatchcase(f"{site.scope}:{site.add}", p) for p in patterns):
                used.update(p for p in patterns if fnmatch.fnmatchcase(f"{site.scope}:{site.add}", p))
                site.forced = True
                continue
            cand = dataclasses.replace(site)
            rejected.append(RejectedAdd(
                site.scope, site.add, "beside-stream",
                "the block's output feeds other blocks only as an extra argument or a gate (a context / "
                "query / gate generator), not the stream that continues", site.branch_weight, cand))
        dropped = {id(s) for s in off if not s.forced}
        kept = [s for s in sites if id(s) not in dropped]
        for i, s in enumerate(kept):
            s.index = i
        sites = kept
    # Sites of one block share a depth; blocks get depths in execution order.
    keys = _depth_keys(sites, capture)
    for site in sites:
        site.depth = depth_of.setdefault(keys[site.index], len(depth_of))
    unused = [p for p in patterns if p not in used]
    if unused:
        near = [r.key for r in rejected if r.forceable][:5]
        raise ValueError(
            f"force / include pattern(s) {unused} name no rejected add that could be a site "
            f"(one operand computed from the other); forceable adds: {near or 'none'}"
        )
    return SiteReport(sites=sites, skipped=skipped, blocks_traced=traced, rejected=rejected)


def _stream_params(block: BlockGraph, sites: list[ResidualSite]) -> Optional[tuple[set[int], set[str]]]:
    """Which arguments of ``block``'s forward carry its residual stream: the placeholders its
    sites' shortcuts are computed from, as (positions, names); None when it has no site."""
    if not sites:
        return None
    flow = _Dataflow(block.graph)
    by_name = {n.name: n for n in block.graph.nodes}
    placeholders = [n for n in block.graph.nodes if n.op == "placeholder"]
    shortcut_of = {site.add: site.shortcut for site in sites}
    carried: set[fx.Node] = set()
    for site in sites:
        node = by_name.get(site.shortcut)
        # Back along the stream: through earlier residual adds (to their shortcut) and
        # single-input ops (reshapes, norms, projections) to the argument it starts from.
        for _ in range(len(by_name)):
            if node is None or node.op == "placeholder":
                break
            if node.name in shortcut_of:
                node = by_name.get(shortcut_of[node.name])
                continue
            data = [i for i in tensor_inputs(node) if flow.from_value[i] and not flow.shape_like[i]]
            if len(data) != 1:
                carried |= {a for a in flow.data_ancestors[node] if a.op == "placeholder"}
                node = None
                break
            node = data[0]
        if node is None:
            continue
        carried.add(node)
    return ({i for i, p in enumerate(placeholders) if p in carried}, {str(p.target) for p in carried})


def _arg_nodes(arg: Any) -> list[fx.Node]:
    """The nodes in one call argument (a node, or nodes in a tuple / list)."""
    if isinstance(arg, fx.Node):
        return [arg]
    if isinstance(arg, (tuple, list)):
        return [x for a in arg for x in _arg_nodes(a)]
    return []


def _side_children(block: BlockGraph, streams: dict[str, Optional[tuple[set[int], set[str]]]]) -> set[str]:
    """Children of ``block`` whose output reaches the block's output only as an extra argument
    of another block (``q = self.global_block(x); x = blk(x, q)`` where ``blk``'s residuals
    carry ``x``, not ``q``) or as a gate computed from the stream (``x * attn(x)``): a context /
    query / gate generator beside the stream, not a stage of the stream that continues. A
    called block carries the arguments its own residual shortcuts come from (``streams``, by
    scope); a module without residual sites carries all of them. A child whose output reaches
    no output at all is not judged."""
    nodes = list(block.graph.nodes)
    flow = _Dataflow(block.graph)
    stream: set[fx.Node] = set()
    reaches: set[fx.Node] = set()
    for n in reversed(nodes):
        if n.op == "output":
            stream.add(n)
            reaches.add(n)
        if n not in reaches:
            continue
        ins = tensor_inputs(n)
        reaches.update(ins)
        if n not in stream:
            continue
        carried = streams.get(qualified(block.scope, str(n.target))) if n.op == "call_module" else None
        if carried is not None:
            positions, names = carried
            for i, a in enumerate(n.args):
                if i in positions:
                    stream.update(_arg_nodes(a))
            for k, a in n.kwargs.items():
                if k in names:
                    stream.update(_arg_nodes(a))
        elif ((n.op == "call_function" and n.target in _MUL_FUNCTIONS) or (
                n.op == "call_method" and n.target in _MUL_METHODS)) and len(ins) >= 2:
            # ``x * gate(x)``: the gate, computed from the other operand, scales the stream
            stream.update(i for i in ins if not any(o in flow.data_ancestors[i] for o in ins if o is not i))
        else:
            stream.update(ins)
    side = set()
    for n in nodes:
        if n.op == "call_module" and n in reaches and n not in stream:
            side.add(qualified(block.scope, str(n.target)))
    return side


def _beside_stream(sites: list[ResidualSite], side: set[str]) -> list[ResidualSite]:
    return [s for s in sites if any(s.scope == c or s.scope.startswith(c + ".") for c in side)]


def stack_depths(model: nn.Module, sites: list[ResidualSite]) -> tuple[list[int], int]:
    """Depth of each site counted in stacked blocks, the way timm and torchvision count them.

    The blocks of a stack are the site blocks plus every module at the same place in the module
    tree, residual or not: names that match a site block's name with each index replaced
    (``features.#.#``, ``blocks.#``), other than a built-in ``torch.nn`` layer. So an
    EfficientNet's non-residual blocks (a stride or width change) take a depth too.
    Returns (depth per site, number of depths).
    """
    def pattern(name: str) -> tuple[str, ...]:
        return tuple("#" if part.isdigit() else part for part in name.split("."))

    site_blocks = list(dict.fromkeys(s.block for s in sites))
    stacked = {pattern(b) for b in site_blocks if "#" in pattern(b)}
    blocks: list[str] = []
    for name, module in model.named_modules():
        if name in site_blocks:
            blocks.append(name)
        elif (pattern(name) in stacked and not type(module).__module__.startswith("torch.nn")
              and _has_weighted_layer(module) and not _is_norm_module(module)):
            blocks.append(name)
    # one depth per outermost block: a site block nested in a counted block shares its depth
    outer: list[str] = []
    for b in blocks:
        if not any(b.startswith(o + ".") for o in outer):
            outer.append(b)
    rank = {b: i for i, b in enumerate(outer)}

    def depth(block: str) -> int:
        for o in outer:
            if block == o or block.startswith(o + "."):
                return rank[o]
        return 0

    # blocks that appear only in execution order (a loop at one scope) keep their site order
    depths = [depth(s.block) for s in sites]
    return depths, len(outer)


def find_residual_sites(
    model: nn.Module, example_inputs: Optional[Any] = None
) -> list[ResidualSite]:
    """Find the residual adds of ``model`` from its dataflow graphs.

    Each module with a forward of its own is traced alone (block-local tracing, see
    :mod:`regsurgery.tracing`), so models that do not trace as a whole still get their blocks
    analysed; :func:`residual_report` also lists what could not be traced. Blocks that fail on
    control flow are traced specialized on their arguments from one forward of
    ``example_inputs`` (inferred from the model when possible). The model is not modified.
    """
    return residual_report(model, example_inputs).sites


def _inline_aware_sites(items: list, capture: Optional[ModelCapture], costs: _Costs) -> dict[int, tuple]:
    """Sites of every captured block, innermost blocks first. A block captured inline (children
    inlined, :mod:`regsurgery.capture.inline`) is captured again with its descendants that hold
    sites as leaves, so that its patched forward still calls their patched forwards."""
    blocks = [i for i in items if isinstance(i, BlockGraph)]
    out: dict[int, tuple] = {}
    with_sites: list[str] = []
    for item in sorted(blocks, key=lambda b: -len(b.scope.split(".")) if b.scope else 0):
        block = item
        if is_inline_policy(item.policy) and capture is not None:
            prefix = f"{item.scope}." if item.scope else ""
            inner = [s for s in with_sites if s.startswith(prefix) and s != item.scope]
            outer = [s for s in inner if not any(s.startswith(o + ".") for o in inner)]
            policy = inline_policy([s[len(prefix):] for s in outer])
            if policy != item.policy:
                block = capture.block(item.scope, policy)
        block_rejected: list[RejectedAdd] = []
        infos = analyse_block(block, costs, block_rejected)
        if infos:
            with_sites.append(item.scope)
        out[id(item)] = (block, infos, block_rejected)
    return out


def _depth_keys(sites: list[ResidualSite], capture: Optional[ModelCapture]) -> dict[int, str]:
    """The unit whose sites share a depth: the site's scope, or, where sites were captured inline,
    the innermost element of a ModuleList / Sequential around it that holds two or more sites (a
    transformer layer whose residuals sit in child modules: T5's ``block.N``, BERT's ``layer.N``)."""
    keys = {s.index: s.block or s.scope for s in sites}
    if capture is None:
        return keys
    containers = {name for name, m in capture.model.named_modules()
                  if isinstance(m, (nn.ModuleList, nn.Sequential))}
    if not any(is_inline_policy(s.trace_policy) for s in sites):
        return keys
    for site in sites:
        parts = site.scope.split(".") if site.scope else []
        for cut in range(len(parts), 0, -1):
            unit, parent = ".".join(parts[:cut]), ".".join(parts[:cut - 1])
            inside = [s for s in sites if s.scope == unit or s.scope.startswith(unit + ".")]
            if parent in containers and len(inside) >= 2 and any(is_inline_policy(s.trace_policy) for s in inside):
                keys[site.index] = unit
                break
    return keys
