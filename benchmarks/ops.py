"""Benchmark regsurgery's DropBlock / DropPath against timm and torchvision, in one run.

1. Realized / requested drop rate of DropBlock for H in {7, 14, 28, 56}, block_size in
   {1, 2, 3, 5, 7}, p in {0.05, 0.1, 0.2}: the fraction of zeroed units measured on
   ``ones(N, 1, H, H)`` (about ``--units`` units per cell), with its standard error from the
   spread of the per-sample fractions (samples are independent).
2. Forward+backward (and forward-only) time of the same ops on the issue's inputs, timed in an
   interleaved loop (every round runs every candidate once, in rotating order): median time per
   call, and the median over rounds of the per-round ratios regsurgery / timm and
   regsurgery / torchvision.

Run: ``OMP_NUM_THREADS=1 python benchmarks/ops.py`` (``--quick`` for a smaller run).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from timm.layers import drop_block_2d as timm_drop_block
from timm.layers import drop_path as timm_drop_path
from torchvision.ops import drop_block2d as tv_drop_block
from torchvision.ops import stochastic_depth as tv_stochastic_depth

import regsurgery
from regsurgery.ops import drop_block2d, drop_path

GRID_H = (7, 14, 28, 56)
GRID_BS = (1, 2, 3, 5, 7)
GRID_P = (0.05, 0.1, 0.2)

DropFn = Callable[[torch.Tensor, float, int], torch.Tensor]

LIBS: Dict[str, DropFn] = {
    "regsurgery": lambda x, p, bs: drop_block2d(x, p, bs),
    "timm": lambda x, p, bs: timm_drop_block(x, p, bs),
    "torchvision": lambda x, p, bs: tv_drop_block(x, p, bs),
}


def realized(fn: DropFn, H: int, bs: int, p: float, units: int) -> Optional[Tuple[float, float]]:
    """(realized fraction, standard error) or None when the library rejects the arguments."""
    n = max(256, units // (H * H))
    chunk = max(1, 2_000_000 // (H * H))
    fracs: List[torch.Tensor] = []
    done = 0
    try:
        while done < n:
            m = min(chunk, n - done)
            out = fn(torch.ones(m, 1, H, H), p, bs)
            fracs.append((out == 0).flatten(1).double().mean(1))
            done += m
    except ValueError:  # torchvision rejects even block sizes
        return None
    f = torch.cat(fracs)
    return f.mean().item(), f.std().item() / math.sqrt(n)


def rate_table(units: int) -> None:
    torch.manual_seed(0)
    print(f"\n## Realized / requested drop rate (about {units / 1e6:.0f}M units per cell; "
          "+- is 1 standard error of the ratio)\n")
    print("| H | block | p | regsurgery | timm 1.0 | torchvision |")
    print("|---|---|---|---|---|---|")
    worst = {name: (1.0, None) for name in LIBS}
    for H in GRID_H:
        for bs in GRID_BS:
            for p in GRID_P:
                cells = []
                for name, fn in LIBS.items():
                    r = realized(fn, H, bs, p, units)
                    if r is None:
                        cells.append("n/a (even)")
                        continue
                    ratio, se = r[0] / p, r[1] / p
                    cells.append(f"{ratio:.3f} +- {se:.3f}")
                    if abs(ratio - 1) > abs(worst[name][0] - 1):
                        worst[name] = (ratio, (H, bs, p))
                print(f"| {H} | {bs} | {p} | " + " | ".join(cells) + " |")
    print()
    for name, (ratio, where) in worst.items():
        print(f"worst realized/requested {name}: {ratio:.3f} at (H, block, p) = {where}")


def time_ops(cands: Dict[str, Callable[[torch.Tensor], torch.Tensor]], shape: Tuple[int, ...],
             rounds: int, backward: bool) -> Dict[str, List[float]]:
    """Seconds per call of each candidate, one entry per round, interleaved.

    Every round runs every candidate once, in an order rotated round by round, so machine
    load drifts and allocator effects hit all candidates alike; ratios are taken per round.
    """
    x = torch.randn(shape, requires_grad=backward)
    grad = torch.randn(shape)
    names = list(cands)
    times: Dict[str, List[float]] = {k: [] for k in names}

    def once(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        x.grad = None
        t0 = time.perf_counter()
        if backward:
            f(x).backward(grad)
        else:
            with torch.no_grad():
                f(x)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up (allocator, caches)
        for k in names:
            once(cands[k])
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            times[k].append(once(cands[k]))
    return times


def _ratio(times: Dict[str, List[float]], a: str, b: str) -> float:
    """Median over rounds of the per-round time ratio a / b."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def speed_table(rounds_small: int, rounds_large: int) -> None:
    print(f"\n## Time, CPU, torch.get_num_threads() = {torch.get_num_threads()} "
          "(median ms per call; ratios are medians of per-round ratios)\n")
    p = 0.1
    cases = [
        ("DropBlock bs=7 shared mask", (64, 256, 14, 14), rounds_small, {
            "regsurgery": lambda x: drop_block2d(x, p, 7),
            "timm": lambda x: timm_drop_block(x, p, 7),
            "torchvision": lambda x: tv_drop_block(x, p, 7),  # per-channel masks
            "x * 1.0": lambda x: x * 1.0,
        }),
        ("DropBlock bs=7 per-channel", (64, 256, 14, 14), rounds_small, {
            "regsurgery": lambda x: drop_block2d(x, p, 7, per_channel=True),
            "timm": lambda x: timm_drop_block(x, p, 7, couple_channels=False),
            "torchvision": lambda x: tv_drop_block(x, p, 7),
        }),
        ("DropBlock bs=3 shared mask", (32, 64, 56, 56), rounds_small, {
            "regsurgery": lambda x: drop_block2d(x, p, 3),
            "timm": lambda x: timm_drop_block(x, p, 3),
            "torchvision": lambda x: tv_drop_block(x, p, 3),
            "x * 1.0": lambda x: x * 1.0,
        }),
        ("DropPath row", (256, 197, 768), rounds_large, {
            "regsurgery": lambda x: drop_path(x, p),
            "timm": lambda x: timm_drop_path(x, p, True),
            "torchvision": lambda x: tv_stochastic_depth(x, p, "row"),
            "x * 1.0": lambda x: x * 1.0,
        }),
    ]
    print("| op | input | pass | regsurgery ms | timm ms | torchvision ms | x*1.0 ms "
          "| rs/timm | rs/torchvision |")
    print("|---|---|---|---|---|---|---|---|---|")
    for title, shape, rounds, cands in cases:
        for backward in (True, False):
            t = time_ops(cands, shape, rounds, backward)
            ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            base = f"{ms['x * 1.0']:.2f}" if "x * 1.0" in ms else "-"
            print(f"| {title} | {tuple(shape)} | {'fwd+bwd' if backward else 'fwd'} "
                  f"| {ms['regsurgery']:.2f} | {ms['timm']:.2f} | {ms['torchvision']:.2f} | {base} "
                  f"| {_ratio(t, 'regsurgery', 'timm'):.3f} "
                  f"| {_ratio(t, 'regsurgery', 'torchvision'):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer units and rounds")
    parser.add_argument("--units", type=int, default=None, help="units per rate-table cell")
    parser.add_argument("--skip-rates", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    units = args.units or (1_000_000 if args.quick else 4_000_000)
    import timm
    import torchvision

    print(f"regsurgery {regsurgery.__version__}, torch {torch.__version__}, "
          f"timm {timm.__version__}, torchvision {torchvision.__version__}")
    if not args.skip_rates:
        rate_table(units)
    if not args.skip_speed:
        speed_table(15 if args.quick else 60, 5 if args.quick else 25)


if __name__ == "__main__":
    main()
