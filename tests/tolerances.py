"""Floating-point tolerances derived from the dtype and the size of the reductions compared.

Two computations of the same math that differ only in summation order (another matmul blocking,
a smaller batch, a fused kernel) agree to within the rounding error of their reductions: for a sum
of ``k`` terms the worst-case relative error is about ``k * eps``. Through ``depth`` stacked layers
(forward, and the backward pass that mirrors it) those errors add up. The bound below is that worst
case, so it holds on any machine and thread count, and it still fails on a real difference (a
dropped sample, a wrong scale) which is of the order of the values themselves.
"""

from __future__ import annotations

import torch
from torch import nn


def reduction_tolerance(dtype: torch.dtype, reduction: int, depth: int = 1) -> float:
    """Relative tolerance for results of ``depth`` chained reductions of ``reduction`` terms."""
    eps = torch.finfo(dtype).eps
    return 2.0 * eps * max(1, reduction) * max(1, depth)


def model_reduction(model: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    """(largest reduction, number of weighted layers) of a forward + backward of ``model``:
    fan-ins of its layers, and the rows a weight gradient sums over (all but the last input dim)."""
    fan_in = [1]
    layers = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fan_in.append(m.in_features)
            layers += 1
        elif isinstance(m, nn.modules.conv._ConvNd):
            fan_in.append(m.in_channels // m.groups * int(torch.tensor(m.kernel_size).prod()))
            layers += 1
        elif isinstance(m, nn.MultiheadAttention):
            fan_in.append(m.embed_dim)
            layers += 2
    for x in inputs:
        if x.dim() >= 2:
            fan_in.append(x.numel() // x.shape[-1])
    return max(fan_in), max(1, layers)


def assert_close_reduced(actual: torch.Tensor, expected: torch.Tensor, reduction: int, depth: int = 1,
                         msg: str = "") -> None:
    """``actual`` equals ``expected`` up to the rounding of the reductions that produced them;
    the absolute part is relative to the largest magnitude of ``expected``."""
    tol = reduction_tolerance(expected.dtype, reduction, depth)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30),
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
