"""Hidden layers of MLPs, for Dropout: a pure function of block-local fx graphs.

Dropout (Srivastava et al., 2014) goes on the output of a hidden fully-connected layer, after its
activation and before the next fully-connected layer; never on the network input, never on the
logits. Found from the dataflow of each block's graph:

* a *dense* layer: a linear (``nn.Linear``, ``F.linear``) or a 1x1 convolution (timm ``Mlp`` with
  ``use_conv``, ConvNeXt-style pointwise MLPs);
* an *activation*: a parameter-free node that is element-wise and not linear: probed on a small
  tensor (``f(flip(x)) == flip(f(x))`` and ``f(2x) != 2 f(x)``), so no activation is recognised by
  its name;
* a *hidden site*: dense -> activation -> (pass-through: identity, norm, dropout)* -> dense.
  A dropout module already on that path (timm ``Mlp.drop1``) is an existing slot whose rate a plan
  sets instead of inserting a second dropout.

The *head* site is the input of the final classifier: the dense layer whose output is the
model's output (found in the root graph, descending into the child that produces the output).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..capture.fx import (
    BlockGraph,
    TraceFailure,
    iter_block_graphs,
    module_of,
    qualified,
    require_module,
)

__all__ = ["MlpSite", "find_mlp_sites", "find_head_site", "is_dense_node", "is_activation_node"]

_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd, nn.LayerNorm, nn.modules.batchnorm._NormBase,
                 nn.GroupNorm)


@dataclass
class MlpSite:
    """One place for a Dropout.

    scope:    the block whose forward holds the site (``""`` is the root).
    anchor:   the node whose value is dropped (the activation, or the classifier's input).
    user:     the node reading it that the dropout goes before (None: every use).
    role:     ``"hidden"`` (after an MLP activation) or ``"head"`` (input of the classifier).
    dense_in / dense_out: the dense nodes before and after (``dense_in`` None for the head).
    existing: qualified name of a dropout module already there (its rate is set), else None.
    policy:   the leaf policy the block was traced with (the rewrite traces it the same way).
    """

    scope: str
    anchor: str
    user: Optional[str]
    role: str
    dense_in: Optional[str]
    dense_out: str
    existing: Optional[str] = None
    policy: Optional[str] = None
    index: int = 0


def is_dense_node(node: fx.Node, root: nn.Module) -> bool:
    """A fully-connected layer: linear, or a convolution whose kernel is 1 everywhere."""
    if node.op == "call_function":
        return node.target is F.linear
    m = module_of(node, root)
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) == 1


def _probe(fn) -> bool:
    """Is ``fn`` element-wise and non-linear on a float tensor? Anything that raises is not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=gen)
    z = torch.randn(3, 8, generator=gen)
    try:
        with torch.no_grad():
            y = fn(x)
            y_flip = fn(x.flip(-1).contiguous())
            y_z, y_sum = fn(z), fn(x + z)
    except Exception:
        return False
    if not all(isinstance(t, torch.Tensor) for t in (y, y_flip, y_z, y_sum)) or y.shape != x.shape:
        return False
    if not torch.allclose(y_flip, y.flip(-1), rtol=1e-5, atol=1e-6):
        return False
    # Not additive (identity, a scale, a sign flip are): ReLU is homogeneous but not additive.
    return not torch.allclose(y_sum, y + y_z, rtol=1e-4, atol=1e-5)


_probe_cache: dict[object, bool] = {}  # functions / methods with their constant arguments
_module_probes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_activation_node(node: fx.Node, root: nn.Module) -> bool:
    """A parameter-free, element-wise, non-linear function of exactly one tensor."""
    tensors = [a for a in node.all_input_nodes if a.op != "get_attr"]
    if len(tensors) != 1 or not node.args or node.args[0] is not tensors[0]:
        return False
    if node.op == "call_module":
        m = module_of(node, root)
        if m is None or any(True for _ in m.parameters()) or isinstance(m, nn.modules.dropout._DropoutNd):
            return False
        if m not in _module_probes:
            flags = [(c, c.training) for c in m.modules()]
            try:
                m.eval()
                _module_probes[m] = _probe(m)
            finally:
                for c, flag in flags:
                    c.training = flag
        return _module_probes[m]
    if node.op not in ("call_function", "call_method"):
        return False
    if any(isinstance(a, fx.Node) for a in node.args[1:]) or any(
            isinstance(v, fx.Node) for v in node.kwargs.values()):
        return False
    if "inplace" in node.kwargs and node.kwargs["inplace"]:
        kwargs = dict(node.kwargs, inplace=False)
    else:
        kwargs = dict(node.kwargs)
    rest = node.args[1:]
    key = (node.op, node.target, repr(rest), repr(sorted(kwargs.items())))
    if key not in _probe_cache:
        if node.op == "call_function":
            target: Any = node.target
            _probe_cache[key] = _probe(lambda x: target(x, *rest, **kwargs))
        else:
            name = str(node.target)
            _probe_cache[key] = not name.endswith("_") and _probe(lambda x: getattr(x, name)(*rest, **kwargs))
    return _probe_cache[key]


def _pass_through(node: fx.Node, root: nn.Module) -> bool:
    m = module_of(node, root)
    return m is not None and isinstance(m, _PASS_THROUGH)


def _is_dropout_slot(node: fx.Node, root: nn.Module) -> bool:
    m = module_of(node, root)
    return m is not None and isinstance(m, nn.modules.dropout._DropoutNd) and type(m) in (
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def analyse_mlp_block(block: BlockGraph) -> list[MlpSite]:
    """Hidden-activation sites of one block graph."""
    root = block.module
    sites: list[MlpSite] = []
    for node in block.graph.nodes:
        if not is_dense_node(node, root) or len(node.users) != 1:
            continue
        act = next(iter(node.users))
        if not is_activation_node(act, root):
            continue
        cur, existing = act, None
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if is_dense_node(nxt, root):
                sites.append(MlpSite(
                    scope=block.scope, anchor=act.name, user=None, role="hidden", dense_in=node.name,
                    dense_out=nxt.name, existing=existing, policy=block.policy))
                break
            if not _pass_through(nxt, root):
                break
            if existing is None and _is_dropout_slot(nxt, root):
                existing = qualified(block.scope, str(nxt.target))
            cur = nxt
    return sites


def find_mlp_sites(
    model_or_blocks: Union[nn.Module, Iterable[Union[BlockGraph, TraceFailure]]],
) -> list[MlpSite]:
    """Every hidden MLP activation of a model (or of given block graphs), in graph order."""
    if isinstance(model_or_blocks, nn.Module):
        items: Iterable[Union[BlockGraph, TraceFailure]] = iter_block_graphs(require_module(model_or_blocks), chains=True)
    else:
        items = model_or_blocks
    sites: list[MlpSite] = []
    for item in items:
        if isinstance(item, BlockGraph):
            for site in analyse_mlp_block(item):
                site.index = len(sites)
                sites.append(site)
    return sites


def _output_value(graph: fx.Graph) -> Optional[fx.Node]:
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    value = out.args[0]
    return value if isinstance(value, fx.Node) else None


def find_head_site(
    blocks: Iterable[Union[BlockGraph, TraceFailure]],
) -> Optional[MlpSite]:
    """The input of the final classifier: the dense node that produces the model's output.

    Starts at the root graph and descends into the child module that produces the output until
    the producing node is a dense layer. None when the output is not produced by one (a model
    that does not trace, a head that pools or normalizes last).
    """
    graphs = {b.scope: b for b in blocks if isinstance(b, BlockGraph)}
    scope = ""
    for _ in range(64):
        block = graphs.get(scope)
        if block is None:
            return None
        value = _output_value(block.graph)
        # Pass-through leaves after the classifier (an Identity) do not change what produced it.
        while value is not None and _pass_through(value, block.module) and value.args and isinstance(
                value.args[0], fx.Node):
            value = value.args[0]
        if value is None:
            return None
        if is_dense_node(value, block.module):
            source = value.args[0] if value.args and isinstance(value.args[0], fx.Node) else None
            if source is None or source.op == "placeholder" and scope == "":
                return None  # a single linear model: its input is the network input
            existing = None
            if _is_dropout_slot(source, block.module):
                existing = qualified(scope, str(source.target))
            return MlpSite(scope=scope, anchor=source.name, user=value.name, role="head", dense_in=None,
                           dense_out=value.name, existing=existing, policy=block.policy)
        if value.op != "call_module":
            return None
        scope = qualified(scope, str(value.target))
    return None
