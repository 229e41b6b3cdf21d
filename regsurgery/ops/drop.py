"""DropPath (stochastic depth) and DropBlock, with an exactly calibrated DropBlock rate.

Papers:
    Deep Networks with Stochastic Depth, Huang et al., ECCV 2016 (https://arxiv.org/abs/1603.09382)
    DropBlock: A regularization method for convolutional networks, Ghiasi, Lin, Le, NeurIPS 2018
    (https://arxiv.org/abs/1810.12890)

Every op is a function plus a thin module subclassing :class:`RegularizerModule`. The modules
keep their rate in a plain float attribute ``p`` that schedules may reassign between steps; they
are the identity in eval mode, so an eval-mode export contains no random nodes.

DropBlock rate calibration. Seeds are drawn with rate ``gamma`` only where a whole
``k x k`` block fits: valid seed ``s`` zeroes ``[s, s + k - 1]`` per dimension, i.e. the block
centred at ``s + (k - 1) / 2``, which lies fully inside the map for odd and even ``k``.
A unit covered by ``c`` valid seed positions survives with probability ``(1 - gamma)^c``, so the
realized drop fraction of a map is exactly::

    f(gamma) = 1 - mean over units u of (1 - gamma)^c(u)

The paper's ``gamma = p / k^2 * HW / ((H-k+1)(W-k+1))`` ignores overlapping blocks and edges, so
its realized fraction differs from ``p`` (timm 1.0.31 realizes 9x the requested rate on a 7x7
map). Here ``f(gamma) = p`` is solved instead. ``f`` is increasing and concave on [0, 1] with
``f(0) = 0`` and ``f(1) = 1``, so Newton's method started at ``gamma = p / f'(0)`` (below the
root) climbs monotonically to it. The counts ``c(u)`` factor over dimensions, which keeps the
solve to a few dozen distinct exponents even for large maps.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RateTypeError",
    "check_rate",
    "RegularizerModule",
    "drop_path",
    "DropPath",
    "drop_block2d",
    "drop_block3d",
    "DropBlock2d",
    "DropBlock3d",
    "calibrate_gamma",
    "expected_drop_fraction",
]

# Newton steps unrolled in the traced (torch.compile) gamma solve: from gamma = p / f'(0) the
# iteration reaches 1e-9 relative accuracy in <= 13 steps for p <= 0.999 on maps up to 112 and
# blocks up to 11; more steps only repeat the root.
_TRACED_NEWTON_STEPS = 16
_CACHE_SIZE = 4096


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
class RateTypeError(TypeError, ValueError):
    """A rate that is not a real number (a bool, a string, None): both a TypeError and, as rates
    always raised, a ValueError."""


def check_rate(name: str, value: Any, *, echo_name: bool = False, convert: bool = True) -> Any:
    """The one rate check of regsurgery: a real number in [0, 1] (NaN refused).

    ``bool`` and ``str`` (and anything not a real number) raise :class:`RateTypeError` (a
    ``TypeError`` and a ``ValueError``) naming ``name``; a number outside [0, 1] a ``ValueError``.
    Returns ``float(value)``, or ``value`` itself with ``convert=False`` (under torch.compile a
    symbolic float must not be converted: that would specialize on every new rate).
    """
    # Plain comparisons only, and the message built only on failure: formatting a symbolic float
    # would specialize on it (one recompile per rate under torch.compile).
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        shown = f"{name}={value!r}" if echo_name else repr(value)
        raise RateTypeError(f"{name} must be a real number in [0, 1], got {shown} "
                            f"({type(value).__name__}, not a number)")
    if not (0.0 <= value <= 1.0):  # type: ignore[operator]  # also rejects NaN
        shown = f"{name}={value!r}" if echo_name else repr(value)
        raise ValueError(f"{name} must be in [0, 1], got {shown}")
    return float(value) if convert else value


def _check_p(p: Any, name: str = "p") -> None:
    # Plain comparisons only: under torch.compile ``p`` may be a symbolic float.
    check_rate(name, p, echo_name=True, convert=False)


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"block_size must be an integer >= 1, got block_size={block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got block_size={block_size!r}")
    return int(block_size)


def _check_mode(mode: Any) -> None:
    if mode not in ("row", "batch"):
        raise ValueError(f"mode must be 'row' or 'batch', got mode={mode!r}")


def _check_floating(x: torch.Tensor, fn: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a floating-point tensor, got dtype={x.dtype}")


def _mask_dtype(x: torch.Tensor) -> torch.dtype:
    # Random draws and mask arithmetic in float32 (float64 for double inputs): a bfloat16 uniform
    # has 8 mantissa bits, too coarse for seed rates around 1e-3.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# DropBlock gamma calibration
# ----------------------------------------------------------------------------------------------
def _coverage_1d(length: int, k: int) -> Dict[int, int]:
    """Histogram {c: number of positions} of how many valid seeds cover each position.

    Valid seeds are s in [0, length - k]; seed s covers [s, s + k - 1]. Position i is covered
    by s in [max(0, i - k + 1), min(i, length - k)], i.e. min(i + 1, k, length - k + 1, length - i).
    """
    hist: Dict[int, int] = {}
    for i in range(length):
        c = min(i + 1, k, length - k + 1, length - i)
        hist[c] = hist.get(c, 0) + 1
    return hist


def _coverage_histogram(
    spatial: Tuple[int, ...], kernel: Tuple[int, ...]
) -> Tuple[Tuple[int, float], ...]:
    """((c, fraction of units covered by exactly c valid seeds), ...) for an n-D map.

    The number of covering seeds factors over dimensions (a seed covers a unit iff it does so in
    every dimension), so the joint histogram is the product of the 1-D ones.
    """
    items = [(1, 1.0)]
    for length, k in zip(spatial, kernel):
        h = _coverage_1d(length, k)
        items = [(c0 * c, w0 * n / length) for c0, w0 in items for c, n in h.items()]
    merged: Dict[int, float] = {}
    for c, w in items:
        merged[c] = merged.get(c, 0.0) + w
    return tuple(sorted(merged.items()))


_cached_histogram = functools.lru_cache(maxsize=_CACHE_SIZE)(_coverage_histogram)


def _fraction(hist: Tuple[Tuple[int, float], ...], gamma: float) -> float:
    q = 1.0 - gamma
    return 1.0 - sum(w * q**c for c, w in hist)


def _solve_gamma(hist: Tuple[Tuple[int, float], ...], p: float) -> float:
    """Solve f(gamma) = p by Newton from below (f concave increasing, see module docstring)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    gamma = p / sum(w * c for c, w in hist)  # f'(0) = mean coverage
    for _ in range(100):
        q = 1.0 - gamma
        f = 1.0 - sum(w * q**c for c, w in hist)
        df = sum(w * c * q ** (c - 1) for c, w in hist)
        step = (p - f) / df
        gamma = min(gamma + step, 1.0)
        if step <= 1e-15 * gamma:  # monotone climb; a non-positive step is rounding noise
            break
    return gamma


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_gamma(spatial: Tuple[int, ...], kernel: Tuple[int, ...], p: float) -> float:
    return _solve_gamma(_cached_histogram(spatial, kernel), p)


def _traced_gamma(
    spatial: Tuple[int, ...], kernel: Tuple[int, ...], p: Any, device: torch.device
) -> torch.Tensor:
    """The same Newton solve as tensor ops with a fixed step count, for torch.compile.

    Python control flow on ``p`` would specialize the compiled graph on its value and recompile
    whenever a schedule changes the rate; tensor arithmetic keeps ``p`` a graph input.
    """
    hist = _coverage_histogram(spatial, kernel)  # shape-only: constant-folded while tracing
    c = torch.tensor([h[0] for h in hist], dtype=torch.float32, device=device)
    w = torch.tensor([h[1] for h in hist], dtype=torch.float32, device=device)
    mean_cov = sum(h[0] * h[1] for h in hist)
    # ``p`` only ever enters as ``tensor + python_scalar``: ``torch.full((), p)`` or
    # ``p - tensor`` would make torch.compile specialize on its value.
    keep = 1.0 - p
    gamma = torch.zeros((), dtype=torch.float32, device=device) + p / mean_cov
    for _ in range(_TRACED_NEWTON_STEPS):
        qc1 = (1.0 - gamma) ** (c - 1.0)
        survive = (w * (1.0 - gamma) * qc1).sum()  # 1 - f(gamma)
        df = (w * c * qc1).sum()
        gamma = (gamma + (survive - keep) / df).clamp(0.0, 1.0)
    return gamma


def _kernel(spatial: Sequence[int], block_size: int) -> Tuple[int, ...]:
    return tuple(min(block_size, s) for s in spatial)  # a block larger than the map is clipped


def calibrate_gamma(spatial_size: Sequence[int], block_size: int, p: float) -> float:
    """Seed rate that makes DropBlock zero exactly a fraction ``p`` of the map in expectation.

    Args:
        spatial_size: map size, ``(H, W)`` or ``(D, H, W)``.
        block_size: block edge; clipped to each dimension of the map.
        p: requested fraction of zeroed units, in [0, 1].

    Returns:
        ``gamma`` with ``expected_drop_fraction(spatial_size, block_size, gamma) == p`` (to
        float64 rounding). Results are cached by ``(spatial_size, clipped block, p)``.
    """
    _check_p(p)
    block_size = _check_block_size(block_size)
    spatial = tuple(int(s) for s in spatial_size)
    if not spatial or min(spatial) < 1:
        raise ValueError(f"spatial_size must be positive sizes, got spatial_size={spatial_size!r}")
    return _cached_gamma(spatial, _kernel(spatial, block_size), float(p))


def expected_drop_fraction(spatial_size: Sequence[int], block_size: int, gamma: float) -> float:
    """Exact expected fraction of units DropBlock zeroes for seed rate ``gamma``.

    ``1 - mean_u (1 - gamma)^c(u)`` where ``c(u)`` counts the valid seed positions whose block
    covers unit ``u`` (seeds only where a whole, clipped block fits).
    """
    _check_p(gamma, "gamma")
    block_size = _check_block_size(block_size)
    spatial = tuple(int(s) for s in spatial_size)
    if not spatial or min(spatial) < 1:
        raise ValueError(f"spatial_size must be positive sizes, got spatial_size={spatial_size!r}")
    return _fraction(_cached_histogram(spatial, _kernel(spatial, block_size)), float(gamma))


# ----------------------------------------------------------------------------------------------
# functional ops
# ----------------------------------------------------------------------------------------------
def _window_max(t: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Sliding max of width ``k`` (stride 1, no padding) along ``dim``.

    Doubling windows (max of two shifted copies, width 1 -> 2 -> 4 ...) then one overlapping
    combine: ceil(log2 k) elementwise maxima. CPU ``max_pool2d`` is 5-50x slower on these
    single-channel masks (0.44 ms vs 0.06 ms at (64, 1, 20, 20), k = 7).
    """
    span = 1
    while 2 * span <= k:
        n = t.size(dim) - span
        t = torch.maximum(t.narrow(dim, 0, n), t.narrow(dim, span, n))
        span *= 2
    if span < k:  # width-span windows at i and i + k - span cover [i, i + k - 1] exactly
        n = t.size(dim) - (k - span)
        t = torch.maximum(t.narrow(dim, 0, n), t.narrow(dim, k - span, n))
    return t


def _uniform(
    shape: Tuple[Any, ...], dtype: torch.dtype, device: torch.device, generator: Optional[torch.Generator]
) -> torch.Tensor:
    # The generator overload of torch.rand takes no symbolic sizes: passing generator=None
    # breaks torch.compile once the batch dimension becomes dynamic.
    if generator is None:
        return torch.rand(shape, dtype=dtype, device=device)
    return torch.rand(shape, dtype=dtype, device=device, generator=generator)


def _grow_blocks(seeds: torch.Tensor, kernel: Tuple[int, ...]) -> torch.Tensor:
    """Turn a seed map over the valid region into the map of dropped units (1 = dropped).

    Seed ``s`` zeroes ``[s, s + k - 1]`` in every dim: pad ``k - 1`` zeros on both sides and
    take a stride-1 sliding max. Exact for odd and even ``k`` (no asymmetric max-pool padding to
    fix up), and every block lies fully inside the map.
    """
    pad = []
    for k in reversed(kernel):
        pad += [k - 1, k - 1]
    blocks = F.pad(seeds, pad)
    for d, k in enumerate(kernel):
        blocks = _window_max(blocks, d + 2, k)
    return blocks


def drop_path(
    x: torch.Tensor,
    p: float,
    training: bool = True,
    mode: str = "row",
    scale_by_keep: bool = True,
    generator: Optional[torch.Generator] = None,
    batch_dim: int = 0,
) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop whole residual branches.

    ``out = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``; one ``m`` per sample
    (``mode="row"``, mask shape ``(B, 1, ..., 1)``, as timm and torchvision) or one for the
    whole batch (``mode="batch"``, as the paper). ``E[out] = x``. Identity when not training or
    ``p == 0``; ``p == 1`` returns zeros (no division by zero). Gradients reach only kept samples.

    Args:
        x: branch output, batch first, any floating dtype and device.
        p: drop probability in [0, 1].
        training: apply the op; when False return ``x`` unchanged.
        mode: ``"row"`` or ``"batch"``.
        scale_by_keep: divide survivors by ``1 - p`` so the expectation is kept.
        generator: optional ``torch.Generator`` (on ``x``'s device) for reproducible draws.
        batch_dim: the dimension that indexes samples (1 for sequence-first ``(S, B, D)``).
    """
    _check_p(p)
    _check_mode(mode)
    if x.dim() < 1:
        raise ValueError(f"drop_path: x needs a batch dimension, got a 0-d tensor (shape {tuple(x.shape)})")
    _check_floating(x, "drop_path")
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    if mode == "row":
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if batch_dim % x.dim() != 0:
            shape = tuple(n if d == batch_dim % x.dim() else 1 for d, n in enumerate(x.shape))
    else:
        shape = (1,) * x.dim()
    # rand < keep rather than bernoulli_(keep): the latter specializes a compiled graph on the
    # value of p, so a rate schedule would recompile every step.
    mask = _uniform(shape, _mask_dtype(x), x.device, generator).lt_(keep)
    if scale_by_keep:
        # max() instead of an `if keep > 0` branch: a compiled graph would guard on it. At
        # p == 1 the mask is all zeros and stays so.
        mask = mask.div_(max(keep, 1e-30))
    return x * mask.to(x.dtype)


def _drop_block(
    x: torch.Tensor,
    p: float,
    block_size: int,
    training: bool,
    per_channel: bool,
    generator: Optional[torch.Generator],
    ndim: int,
    fn: str,
) -> torch.Tensor:
    _check_p(p)
    block_size = _check_block_size(block_size)
    if x.dim() != ndim + 2:
        layout = "(N, C, H, W)" if ndim == 2 else "(N, C, D, H, W)"
        raise ValueError(
            f"{fn}: x must be {ndim + 2}-D {layout}, got {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    _check_floating(x, fn)
    if not training or p == 0.0 or x.numel() == 0:
        return x

    spatial = tuple(x.shape[2:])
    kernel = _kernel(spatial, block_size)
    valid = tuple(s - k + 1 for s, k in zip(spatial, kernel))
    seed_shape = (x.shape[0], x.shape[1] if per_channel else 1) + valid
    if torch.compiler.is_compiling():
        gamma: Any = _traced_gamma(spatial, kernel, p, x.device)
    else:
        gamma = _cached_gamma(spatial, kernel, float(p))

    dtype = _mask_dtype(x)
    seeds = _uniform(seed_shape, dtype, x.device, generator).lt_(gamma)
    blocks = _grow_blocks(seeds, kernel)
    keep = blocks.neg_().add_(1.0)
    # Rescale survivors by count so the mean is kept; an all-dropped mask stays all zeros.
    scale = keep.numel() / keep.sum().clamp_min(1.0)
    return x * keep.mul_(scale).to(x.dtype)


def drop_block2d(
    x: torch.Tensor,
    p: float,
    block_size: int = 7,
    training: bool = True,
    per_channel: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DropBlock (Ghiasi et al., 2018) on ``(N, C, H, W)`` maps, with a calibrated seed rate.

    Seeds ~ Bernoulli(gamma) are drawn where a whole ``k x k`` block fits
    (``k = min(block_size, H)`` by ``min(block_size, W)``), each grown into its block; the
    survivors are multiplied by ``numel(mask) / sum(mask)``. ``gamma`` is solved (and cached) so
    that the expected fraction of zeroed units is exactly ``p`` for this ``(H, W, k)``; see
    :func:`calibrate_gamma`. One mask ``(N, 1, H, W)`` is shared by all channels (the paper)
    unless ``per_channel=True`` (``(N, C, H, W)``). Identity when not training or ``p == 0``;
    ``p == 1`` returns zeros.

    Args:
        x: input ``(N, C, H, W)``, any floating dtype and device.
        p: fraction of units to drop, in [0, 1].
        block_size: block edge (>= 1, odd or even); clipped to the map.
        training: apply the op; when False return ``x`` unchanged.
        per_channel: independent mask per channel instead of one shared mask.
        generator: optional ``torch.Generator`` (on ``x``'s device) for reproducible draws.
    """
    return _drop_block(x, p, block_size, training, per_channel, generator, 2, "drop_block2d")


def drop_block3d(
    x: torch.Tensor,
    p: float,
    block_size: int = 7,
    training: bool = True,
    per_channel: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DropBlock on ``(N, C, D, H, W)`` maps (video / volumes): cubic blocks, calibrated rate.

    Same contract as :func:`drop_block2d` with ``k x k x k`` blocks clipped per dimension.
    """
    return _drop_block(x, p, block_size, training, per_channel, generator, 3, "drop_block3d")


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class RegularizerModule(nn.Module):
    """Base class of every regsurgery regularizer.

    Tracing treats instances as ``torch.fx`` leaves (the train/eval decision happens at run
    time), ``strip`` and rate schedules find them by this type. Subclasses keep their rate in the
    plain float attribute ``p``.
    """

    p: float


class DropPath(RegularizerModule):
    """Stochastic depth on a residual branch; see :func:`drop_path`.

    Args:
        p: drop probability in [0, 1]; a plain attribute that schedules may reassign.
        mode: ``"row"`` (one draw per sample) or ``"batch"`` (one draw per batch).
        scale_by_keep: divide survivors by ``1 - p``.
        batch_dim: the dimension that indexes samples (0, or 1 for sequence-first tensors).
    """

    def __init__(self, p: float = 0.1, mode: str = "row", scale_by_keep: bool = True, batch_dim: int = 0) -> None:
        super().__init__()
        _check_p(p)
        _check_mode(mode)
        self.p = float(p)
        self.mode = mode
        self.scale_by_keep = scale_by_keep
        self.batch_dim = int(batch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return drop_path(x, self.p, True, self.mode, self.scale_by_keep, batch_dim=getattr(self, "batch_dim", 0))

    def extra_repr(self) -> str:
        extra = f", batch_dim={self.batch_dim}" if getattr(self, "batch_dim", 0) else ""
        return f"p={self.p:.4g}, mode={self.mode!r}, scale_by_keep={self.scale_by_keep}{extra}"


class _DropBlockNd(RegularizerModule):
    _fn = staticmethod(drop_block2d)

    def __init__(self, p: float = 0.1, block_size: int = 7, per_channel: bool = False) -> None:
        super().__init__()
        _check_p(p)
        self.p = float(p)
        self.block_size = _check_block_size(block_size)
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return self._fn(x, self.p, self.block_size, True, self.per_channel)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}, block_size={self.block_size}, per_channel={self.per_channel}"


class DropBlock2d(_DropBlockNd):
    """DropBlock on ``(N, C, H, W)`` with a calibrated rate; see :func:`drop_block2d`.

    Args:
        p: fraction of units to drop, in [0, 1]; a plain attribute that schedules may reassign
            (the paper ramps keep_prob from 1 to 0.9 over training).
        block_size: block edge, clipped to the map (paper: 7).
        per_channel: one mask per channel instead of one shared by all channels.
    """

    _fn = staticmethod(drop_block2d)


class DropBlock3d(_DropBlockNd):
    """DropBlock on ``(N, C, D, H, W)`` with a calibrated rate; see :func:`drop_block3d`."""

    _fn = staticmethod(drop_block3d)

