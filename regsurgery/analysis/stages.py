"""Conv stages: feature maps grouped by spatial reduction, found by running the model.

DropBlock (Ghiasi, Lin, Le, NeurIPS 2018, arXiv 1810.12890) is applied per *stage*: the paper
puts it in ResNet-50's groups 3 and 4, the maps at stride 16 and 32 (14x14 and 7x7 at 224 px),
and the block size is limited by the map size. A stage here is the set of 4-D feature maps with
one spatial reduction ``r`` relative to the input::

    r = H_in / h = W_in / w          (stride 2, 4, 8, 16, 32, ...)

Shapes come from forward hooks on every module during an eval-mode, no-grad forward on an
example input (:func:`record_module_shapes`), run a second time on the input upsampled 2x
when the model accepts it (4x the pixels: the cost of this analysis is about five forwards at
the example size). A module's output decides its stage, so a stride-2 block belongs to the
stage it produces, not the one it reads; this is also where its residual add happens. Maps
computed inside a downsampling block before its stride (Bottleneck conv1, the expansion of an
inverted residual) are in the stage of their own reduction but marked ``interior_of`` that
block; a stage's ``channels`` and ``size`` are those of its last map that is not.

Layout decision for a 4-D output ``(N, d1, d2, d3)`` of an input ``(N, C, H, W)``:

* when a second forward on the input upsampled 2x succeeds (most CNNs), the dims that change
  are the spatial ones: ``d2, d3`` -> NCHW, ``d1, d2`` -> channels-last NHWC (ConvNeXt's and
  Swin's permuted blocks), none -> a fixed-size map (global pooling, squeeze-excite ``1x1``,
  ``AdaptiveAvgPool2d((7, 7))``), which is not a stage map. ``r`` is then also correct for
  valid-padding nets (Inception: ``r = dH_in / dh``);
* when the model only accepts one input size (ViT, Swin), shapes alone decide: NCHW if
  ``(d2, d3)`` give one integer reduction, NHWC if only ``(d1, d2)`` do, NCHW if both do (the
  map is then reported as ambiguous), ``1x1`` maps are taken as globally pooled, and nothing
  4-D inside a tokens -> tokens module (attention matrices) is taken as a map.

3-D outputs ``(N, L, C)`` are token sequences (ViT, Swin attention): not conv stages, reported
in :class:`FeatureLayout`, never guessed into a stage. Outputs whose batch dim differs from
the input's (Swin windows, attention heads) are reported as ``other``.

Stages are all distinct reductions, indexed by increasing reduction (execution order on an
encoder; PVT's spatial-reduction attention computes a stride-32 map inside the stride-4 stage
and must not make it stage 2). The stem's
stride-2 maps form a stage of their own, as in timm's ``feature_info`` (``act1`` at reduction 2
for ResNet), so stage ``k`` is timm's ``feature_info[k - 1]`` on every timm CNN checked in the
tests; a stride-1 stem (CIFAR nets) gives a stage with reduction 1. Maps of a decoder (U-Net,
FPN) join the encoder stage of the same reduction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.examples import (
    ModuleCall,
    as_args,
    describe_args,
    expected_hint,
    infer_example_input,
    record_module_shapes,
    run_recorded,
)
from ..capture.fx import require_module
from .residual import ResidualSite, find_residual_sites

__all__ = [
    "ModuleCall",
    "FeatureMap",
    "ConvStage",
    "FeatureLayout",
    "infer_example_input",
    "record_module_shapes",
    "describe_feature_layout",
    "find_conv_stages",
]

#: Prefix tokens (class, register, distillation tokens) allowed when guessing a token grid.
_MAX_PREFIX_TOKENS = 16


# ----------------------------------------------------------------------------- records


@dataclass
class FeatureMap:
    """How one module call's output was classified.

    kind: ``"map"`` (a spatial 4-D map; ``layout`` NCHW or NHWC), ``"tokens"`` (3-D sequence),
    ``"fixed"`` (4-D but its size does not follow the input: pooled), ``"other"``.
    ``reduction``/``size``/``channels`` are set for maps (and ``reduction`` for tokens when a
    token grid ``(H/r) * (W/r)`` plus ``prefix`` tokens matches the length). ``interior_of``
    names the downsampling block a map is computed inside, before its stride (the expansion
    conv of an inverted residual, conv1 of a Bottleneck): such a map is in its reduction's
    stage but is not that stage's output.
    """

    name: str
    type_name: str
    call_index: int
    shape: tuple[int, ...]
    kind: str
    layout: Optional[str] = None
    reduction: Optional[int] = None
    size: Optional[tuple[int, int]] = None
    channels: Optional[int] = None
    prefix: Optional[int] = None
    note: str = ""
    interior_of: Optional[str] = None
    reductions: Optional[tuple[int, ...]] = None  # per spatial dim, for 3-D maps (N, C, D, H, W)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shape"] = list(self.shape)
        if self.size is not None:
            d["size"] = list(self.size)
        return d


@dataclass
class ConvStage:
    """The feature maps of one spatial reduction.

    index:     1-based, by increasing reduction: the execution order of an encoder.
    reduction: input size / map size (the stride of the stage).
    channels:  channels of the stage's last map (its output); ``widths`` lists every channel
               count seen in the stage, in order.
    size:      ``(h, w)`` of the stage's last map at the example input.
    layout:    ``"NCHW"``, ``"NHWC"`` (every map channels-last: Swin) or ``"mixed"`` (NCHW
               blocks with channels-last internals: ConvNeXt); ``channels_last`` names the
               scopes whose maps here are NHWC. DropBlock2d expects NCHW.
    scopes:    qualified names of the modules (not the root) whose output is a map of this
               stage, in the order outputs were produced; a module called at two reductions
               (a reused ReLU in a stride-2 block) is in both stages.
    sites:     residual sites (:class:`regsurgery.analysis.ResidualSite`) whose scope
               module's first output is a map of this stage.
    """

    index: int
    reduction: int
    channels: int
    size: tuple[int, int]
    layout: str
    scopes: list[str] = field(default_factory=list)
    sites: list[ResidualSite] = field(default_factory=list)
    channels_last: list[str] = field(default_factory=list)
    widths: tuple[int, ...] = ()
    dims: int = 2  # spatial dims of the maps: 2 (N, C, H, W) or 3 (N, C, D, H, W)
    reductions: tuple[int, ...] = ()  # per spatial dim (3-D maps: depth, height, width)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "dims": self.dims,
            "reductions": list(self.reductions),
            "reduction": self.reduction,
            "channels": self.channels,
            "size": list(self.size),
            "layout": self.layout,
            "scopes": list(self.scopes),
            "sites": [_site_summary(s) for s in self.sites],
            "channels_last": list(self.channels_last),
            "widths": list(self.widths),
        }


def _site_summary(site: Any) -> dict[str, Any]:
    return {k: getattr(site, k, None) for k in ("index", "scope", "depth", "kind")}


@dataclass
class FeatureLayout:
    """Everything shape recording found: the conv stages and what is not a conv stage.

    ``two_sizes`` tells whether a second forward at twice the input size confirmed which dims
    are spatial; when False, ``notes`` says why and the layout rests on one shape per output.
    """

    input_shape: tuple[int, ...]
    stages: list[ConvStage]
    maps: list[FeatureMap]
    two_sizes: bool
    notes: list[str] = field(default_factory=list)
    sites_outside: list[ResidualSite] = field(default_factory=list)

    @property
    def tokens(self) -> list[FeatureMap]:
        """Token-sequence outputs (3-D): ViT blocks, Swin window attention."""
        return [m for m in self.maps if m.kind == "tokens"]

    @property
    def channels_last(self) -> list[FeatureMap]:
        """Channels-last (NHWC) maps: Swin stages, ConvNeXt block internals."""
        return [m for m in self.maps if m.kind == "map" and m.layout == "NHWC"]

    @property
    def fixed(self) -> list[FeatureMap]:
        """4-D outputs whose size does not follow the input (pooled)."""
        return [m for m in self.maps if m.kind == "fixed"]

    @property
    def ambiguous(self) -> list[FeatureMap]:
        """Maps that fit both NCHW and NHWC on one input size (taken as NCHW)."""
        return [m for m in self.maps if "ambiguous" in m.note]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "two_sizes": self.two_sizes,
            "stages": [s.to_dict() for s in self.stages],
            "tokens": [m.to_dict() for m in self.tokens],
            "channels_last": [m.to_dict() for m in self.channels_last],
            "fixed": [m.to_dict() for m in self.fixed],
            "ambiguous": [m.to_dict() for m in self.ambiguous],
            "sites_outside": [_site_summary(s) for s in self.sites_outside],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A short human-readable table (for ``regsurgery inspect``)."""
        lines = [f"input {tuple(self.input_shape)}"]
        for s in self.stages:
            lines.append(
                f"stage {s.index}: reduction {'x'.join(map(str, s.reductions)) if s.dims == 3 else s.reduction}, "
                f"{s.channels} ch, {'x'.join(map(str, s.size))}, "
                f"{s.layout}, {len(s.scopes)} modules, {len(s.sites)} residual sites"
            )
        if not self.stages:
            lines.append("no conv stages")
        tokens = self.tokens
        if tokens:
            lines.append(f"token sequences: {len(tokens)} outputs, e.g. {tokens[0].name} {tokens[0].shape}")
        nhwc = self.channels_last
        if nhwc:
            lines.append(f"channels-last maps: {len(nhwc)} outputs, e.g. {nhwc[0].name} {nhwc[0].shape}")
        if self.sites_outside:
            lines.append(f"residual sites outside conv stages: {len(self.sites_outside)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- classification


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fits(h: int, w: int, H: int, W: int, r: int) -> bool:
    # Padded stride-r convs give ceil(H / r), valid ones floor(H / r).
    return h in (H // r, _cdiv(H, r)) and w in (W // r, _cdiv(W, r))


def _reduction_one_size(h: int, w: int, H: int, W: int) -> Optional[int]:
    """The integer reduction r with h, w = H/r, W/r (floor or ceil), from one size; else None."""
    if h < 1 or w < 1 or h > H or w > W:
        return None
    if H % h == 0 and W % w == 0 and H // h == W // w:
        return H // h
    r = 1
    while r <= max(H, W):
        if _fits(h, w, H, W, r):
            return r
        r *= 2
    return None


def _snap(r: float) -> int:
    """Nearest power of two when within 15% (strides are nearly always powers of two)."""
    p = 2 ** round(math.log2(r))
    return int(p) if abs(r / p - 1) <= 0.15 else max(1, round(r))


def _reduction_two_sizes(
    hw1: tuple[int, int], hw2: tuple[int, int], in1: tuple[int, int], in2: tuple[int, int]
) -> tuple[Optional[int], str]:
    """Reduction from the growth of a map between two input sizes: r = d(input) / d(map)."""
    (h1, w1), (h2, w2), (H1, W1), (H2, W2) = hw1, hw2, in1, in2
    r = _reduction_one_size(h1, w1, H1, W1)
    if r is not None and _fits(h2, w2, H2, W2, r):
        return r, ""
    dh, dw = h2 - h1, w2 - w1
    if dh <= 0 or dw <= 0:
        return None, "does not grow with the input"
    rh, rw = (H2 - H1) / dh, (W2 - W1) / dw
    if abs(math.log(rh / rw)) > math.log(1.25):
        return None, f"height and width reductions differ ({rh:.2f} vs {rw:.2f})"
    r_est = math.sqrt(rh * rw)
    if r_est < 0.9:
        return None, "larger than the input (upsampled)"
    return _snap(r_est), f"inexact sizes, reduction {r_est:.2f} taken as {_snap(r_est)}"


def _token_grid(length: int, H: int, W: int) -> tuple[Optional[int], Optional[int]]:
    """(reduction, prefix tokens) with length = (H/r)*(W/r) + prefix, the fewest prefix tokens."""
    best: tuple[Optional[int], Optional[int]] = (None, None)
    for r in range(1, min(H, W) + 1):
        if H % r or W % r:
            continue
        prefix = length - (H // r) * (W // r)
        if 0 <= prefix <= _MAX_PREFIX_TOKENS and (best[1] is None or prefix < best[1]):
            best = (r, prefix)
    return best


def _classify(
    call: ModuleCall,
    other: Optional[ModuleCall],
    batch: int,
    in1: tuple[int, int],
    in2: Optional[tuple[int, int]],
    token_parent: Optional[str] = None,
) -> Optional[FeatureMap]:
    shape = call.output_shape
    if shape is None or len(shape) not in (3, 4):
        return None
    fm = FeatureMap(call.name, call.type_name, call.call_index, shape, kind="other")
    if shape[0] != batch:
        fm.note = f"batch dim {shape[0]} is not the input's {batch} (windows or heads)"
        return fm
    shape2 = other.output_shape if other is not None else None
    two = in2 is not None and shape2 is not None and len(shape2) == len(shape)
    H, W = in1
    if len(shape) == 3:
        fm.kind = "tokens"
        if two and shape2 is not None and shape2[1] == shape[1] and shape2[2] != shape[2]:
            fm.note = "the last dim follows the input: (N, C, L) sequence"
            return fm
        fm.reduction, fm.prefix = _token_grid(shape[1], H, W)
        return fm
    d1, d2, d3 = shape[1:]
    if two:
        assert shape2 is not None and in2 is not None
        changed = [i for i in (1, 2, 3) if shape2[i] != shape[i]]
        if not changed:
            fm.kind = "fixed"
            fm.note = "size does not follow the input (pooled)"
            return fm
        if changed == [2, 3]:
            layout, hw1, hw2, ch = "NCHW", (d2, d3), (shape2[2], shape2[3]), d1
        elif changed == [1, 2]:
            layout, hw1, hw2, ch = "NHWC", (d1, d2), (shape2[1], shape2[2]), d3
        else:
            fm.note = f"dims {changed} follow the input: neither NCHW nor NHWC"
            return fm
        r, note = _reduction_two_sizes(hw1, hw2, in1, in2)
        if r is None:
            fm.note = note
            return fm
        fm.kind, fm.layout, fm.reduction, fm.size, fm.channels, fm.note = (
            "map", layout, r, hw1, ch, note
        )
        return fm
    # One input size: shapes alone decide.
    if token_parent is not None:
        # An attention matrix (B, heads, N, N) can look like a map; inside a tokens -> tokens
        # module nothing 4-D is taken as a map unless a second input size shows it is one.
        fm.note = f"inside token module {token_parent or '<root>'}"
        return fm
    if (d2 == d3 == 1 or d1 == d2 == 1) and (H > 1 or W > 1):
        fm.kind = "fixed"
        fm.note = "1x1 map taken as pooled (one input size only)"
        return fm
    r_nchw = _reduction_one_size(d2, d3, H, W)
    r_nhwc = _reduction_one_size(d1, d2, H, W)
    if r_nchw is not None:
        fm.kind, fm.layout, fm.reduction, fm.size, fm.channels = "map", "NCHW", r_nchw, (d2, d3), d1
        if r_nhwc is not None:
            fm.note = f"ambiguous: also fits NHWC at reduction {r_nhwc}; taken as NCHW"
    elif r_nhwc is not None:
        fm.kind, fm.layout, fm.reduction, fm.size, fm.channels = "map", "NHWC", r_nhwc, (d1, d2), d3
    else:
        fm.note = "no integer reduction of the input size"
    return fm


def _image_arg(args: tuple[Any, ...]) -> Optional[int]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point():
            return i
    return None


def _volume_arg(args: tuple[Any, ...]) -> Optional[int]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() == 5 and a.is_floating_point():
            return i
    return None


def _dim_reduction(d: int, D: int) -> Optional[int]:
    """The integer reduction r with d = D / r (floor or ceil) along one dim; else None."""
    if d < 1 or d > D:
        return None
    if D % d == 0:
        return D // d
    r = 1
    while r <= D:
        if d in (D // r, _cdiv(D, r)):
            return r
        r *= 2
    return None


def _classify_3d(call: ModuleCall, batch: int, vol: tuple[int, int, int]) -> Optional[FeatureMap]:
    """A 5-D output of a volume input (N, C, D, H, W): a 3-D map when every spatial dim is the
    input's divided by an integer (channels first; channels-last when only dims 1-3 fit)."""
    shape = call.output_shape
    if shape is None or len(shape) != 5:
        return None
    fm = FeatureMap(call.name, call.type_name, call.call_index, shape, kind="other")
    if shape[0] != batch:
        fm.note = f"batch dim {shape[0]} is not the input's {batch} (windows or heads)"
        return fm
    first = [_dim_reduction(d, D) for d, D in zip(shape[2:], vol)]
    last = [_dim_reduction(d, D) for d, D in zip(shape[1:4], vol)]
    if all(r is not None for r in first):
        layout, rs, size, ch = "NCHW", tuple(first), tuple(shape[2:]), shape[1]
    elif all(r is not None for r in last):
        layout, rs, size, ch = "NHWC", tuple(last), tuple(shape[1:4]), shape[4]
    else:
        fm.note = "no integer reduction of the input volume"
        return fm
    if all(d == 1 for d in size) and any(D > 1 for D in vol):
        fm.kind, fm.note = "fixed", "1x1x1 map taken as pooled"
        return fm
    fm.kind, fm.layout, fm.reductions, fm.reduction = "map", layout, rs, max(rs)  # type: ignore[assignment, type-var]
    fm.size, fm.channels = size, int(ch)  # type: ignore[assignment]
    return fm


def _describe_volume_layout(model: nn.Module, args: tuple[Any, ...], pos: int, sites: Optional[Iterable[Any]],
                            example_inputs: Any) -> FeatureLayout:
    """Conv stages of a 3-D conv net: maps grouped by their reduction in every spatial dim."""
    vol = args[pos]
    batch, in_dhw = int(vol.shape[0]), tuple(int(d) for d in vol.shape[2:])
    calls = record_module_shapes(model, args)
    maps = [fm for fm in (_classify_3d(c, batch, in_dhw) for c in calls) if fm is not None]  # type: ignore[arg-type]
    stages = _group(maps)
    for st in stages:
        st.dims = 3
    sites_list = _find_sites(model, example_inputs) if sites is None else list(sites)
    outside = _assign_sites(stages, maps, sites_list)
    return FeatureLayout(
        input_shape=tuple(int(s) for s in vol.shape), stages=stages, maps=maps, two_sizes=False,
        notes=["3-D maps (N, C, D, H, W): layouts decided from one shape per output"],
        sites_outside=outside,
    )


# ----------------------------------------------------------------------------- stages


def _find_sites(model: nn.Module, example_inputs: Any) -> list[Any]:
    return list(find_residual_sites(model, example_inputs))


def describe_feature_layout(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    sites: Optional[Iterable[Any]] = None,
    two_sizes: bool = True,
) -> FeatureLayout:
    """Conv stages plus what is not a conv stage (token sequences, channels-last, pooled maps).

    ``example_inputs``: a Tensor or tuple of forward arguments holding an image ``(N, C, H, W)``;
    None infers one (:func:`infer_example_input`). ``sites``: residual sites to distribute over
    the stages; None finds them with :func:`regsurgery.analysis.find_residual_sites`.
    ``two_sizes``: also run the input upsampled 2x (4x the pixels) to observe which dims are
    spatial; False skips it (huge inputs) and decides from one shape per output. The model is
    not modified (hooks removed, training flags restored).
    """
    require_module(model)
    inferred = example_inputs is None
    args = (infer_example_input(model),) if inferred else as_args(example_inputs, model)
    pos = _image_arg(args)
    if pos is None and _volume_arg(args) is not None:
        return _describe_volume_layout(model, args, _volume_arg(args), sites,  # type: ignore[arg-type]
                                       None if inferred else example_inputs)
    if pos is None and any(isinstance(a, torch.Tensor) and a.dim() == 3 and a.is_floating_point() for a in args):
        raise ValueError(
            f"conv stages need an image input (N, C, H, W) or a volume (N, C, D, H, W) among the "
            f"forward arguments of {type(model).__name__}, got {describe_args(args)}; "
            f"{expected_hint(model)}. If that is a 1-D map (N, C, L) (audio, a signal): it has no 2-D "
            "or 3-D blocks to drop, so DropBlock does not apply (use stochastic depth instead)"
        )
    if pos is None:
        raise ValueError(
            f"conv stages need an image input (N, C, H, W) among the forward arguments of "
            f"{type(model).__name__}, got {describe_args(args)}; {expected_hint(model)}"
        )
    image = args[pos]
    batch, in1 = int(image.shape[0]), (int(image.shape[2]), int(image.shape[3]))
    calls = record_module_shapes(model, args)
    notes: list[str] = []

    # Second forward at twice the size: which dims follow the input is then observed, not guessed.
    in2: Optional[tuple[int, int]] = None
    paired: dict[tuple[str, int], ModuleCall] = {}
    if two_sizes:
        # One sample is enough to see which dims grow (dims 1-3 only are compared), unless other
        # arguments may have to match the batch.
        big = F.interpolate(image[:1] if len(args) == 1 else image, scale_factor=2.0, mode="nearest")
        try:
            calls2 = run_recorded(model, (*args[:pos], big, *args[pos + 1 :]))
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            notes.append(
                f"the model rejects a second input size ({type(exc).__name__}: {first_line}); "
                "layouts decided from one shape per output, 1x1 maps taken as pooled"
            )
        else:
            in2 = (int(big.shape[2]), int(big.shape[3]))
            paired = {(c.name, c.call_index): c for c in calls2}
        del big
    else:
        notes.append("one input size only (two_sizes=False): 1x1 maps taken as pooled")

    maps = _classify_calls(calls, paired, batch, in1, in2)
    inexact = [m for m in maps if m.kind == "map" and m.note.startswith("inexact")]
    if inexact:
        notes.append(f"{len(inexact)} maps have sizes that are not input/r exactly (valid padding)")

    stages = _group(maps)
    sites_list = _find_sites(model, None if inferred else example_inputs) if sites is None else list(sites)
    outside = _assign_sites(stages, maps, sites_list)
    return FeatureLayout(
        input_shape=tuple(int(s) for s in image.shape),
        stages=stages,
        maps=maps,
        two_sizes=in2 is not None,
        notes=notes,
        sites_outside=outside,
    )


def _ancestors(call: ModuleCall, by_start: dict[int, ModuleCall]) -> Iterable[ModuleCall]:
    """Enclosing calls, innermost first, without the outermost one (the model itself)."""
    p = call.parent
    while p is not None:
        a = by_start[p]
        if a.parent is None:
            return
        yield a
        p = a.parent


def _classify_calls(
    calls: list[ModuleCall],
    paired: dict[tuple[str, int], ModuleCall],
    batch: int,
    in1: tuple[int, int],
    in2: Optional[tuple[int, int]],
) -> list[FeatureMap]:
    by_start = {c.start: c for c in calls}
    out: dict[int, FeatureMap] = {}
    for c in calls:
        other = paired.get((c.name, c.call_index))
        token_parent = None
        if other is None:
            for a in _ancestors(c, by_start):
                if len(a.input_shape or ()) == 3 and len(a.output_shape or ()) == 3:
                    token_parent = a.name
                    break
        fm = _classify(c, other, batch, in1, in2, token_parent)
        if fm is not None:
            out[c.start] = fm
    # Reductions of the maps in each call's subtree (children complete before their parent).
    subtree: dict[int, set[int]] = {}
    for c in calls:
        own = subtree.setdefault(c.start, set())
        fm = out.get(c.start)
        if fm is not None and fm.kind == "map" and fm.reduction is not None:
            own.add(fm.reduction)
        if c.parent is not None:
            subtree.setdefault(c.parent, set()).update(own)
    # A downsampling block holds maps at exactly two reductions, its input's and its output's;
    # a multi-stage container (timm's `blocks`, torchvision's `features`) holds more.
    for c in calls:
        fm = out.get(c.start)
        if fm is None or fm.kind != "map":
            continue
        for a in _ancestors(c, by_start):
            afm = out.get(a.start)
            if afm is not None and afm.kind == "map" and afm.reduction != fm.reduction:
                if subtree[a.start] == {fm.reduction, afm.reduction}:
                    fm.interior_of = a.name
                break
    return [out[c.start] for c in calls if c.start in out]


def _group(maps: list[FeatureMap]) -> list[ConvStage]:
    by_r: dict[tuple[int, ...], list[FeatureMap]] = {}
    for m in maps:
        if m.kind == "map" and m.name != "":  # the root is the whole model, not a stage module
            assert m.reduction is not None
            by_r.setdefault(_stage_key(m), []).append(m)
    stages = []
    # By reduction, which is execution order on an encoder; a deep map produced early (PVT's
    # spatial-reduction attention: a stride-8 conv on the stride-4 stage) does not reorder stages.
    # 3-D maps: by their reduction in every spatial dim (ordered by the total reduction).
    for index, key in enumerate(sorted(by_r, key=lambda k: (math.prod(k), k)), start=1):
        r = max(key)
        ms = by_r[key]
        # The stage's output: its last map not computed inside the next downsampling block.
        exterior = [m for m in ms if m.interior_of is None]
        last = (exterior or ms)[-1]
        assert last.size is not None and last.channels is not None
        layouts = {m.layout for m in ms}
        layout = layouts.pop() if len(layouts) == 1 else "mixed"
        stages.append(
            ConvStage(
                index=index,
                reduction=r,
                channels=last.channels,
                size=last.size,
                layout=str(layout),
                scopes=list(dict.fromkeys(m.name for m in ms)),
                channels_last=list(dict.fromkeys(m.name for m in ms if m.layout == "NHWC")),
                widths=tuple(dict.fromkeys(int(m.channels) for m in ms if m.channels is not None)),
                dims=len(last.size),
                reductions=key if len(key) > 1 else (r, r),
            )
        )
    return stages


def _stage_key(m: FeatureMap) -> tuple[int, ...]:
    return tuple(m.reductions) if m.reductions else (int(m.reduction),)  # type: ignore[arg-type]


def _assign_sites(stages: list[ConvStage], maps: list[FeatureMap], sites: list[Any]) -> list[Any]:
    """Put each site in the stage of its scope module's first output; return the rest."""
    first: dict[str, FeatureMap] = {}
    for m in maps:
        first.setdefault(m.name, m)
    stage_of = {(s.reductions if s.dims == 3 else (s.reduction,)): s for s in stages}
    outside = []
    for site in sites:
        fm = first.get(str(getattr(site, "scope", "")))
        stage = stage_of.get(_stage_key(fm)) if fm is not None and fm.kind == "map" else None
        if stage is None:
            outside.append(site)
        else:
            stage.sites.append(site)
    return outside


def find_conv_stages(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    sites: Optional[Iterable[Any]] = None,
    two_sizes: bool = True,
) -> list[ConvStage]:
    """The conv stages of ``model``: its 4-D feature maps grouped by spatial reduction.

    See the module docstring for the rules and :func:`describe_feature_layout` for what is not
    a conv stage (token sequences, channels-last maps, pooled maps) and why; ``sites`` and
    ``two_sizes`` as there.
    """
    return describe_feature_layout(model, example_inputs, sites=sites, two_sizes=two_sizes).stages
