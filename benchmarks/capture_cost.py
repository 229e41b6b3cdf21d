"""What patching costs against one plain capture of the same model.

For each model, in one run: the median time of ``torch.fx.symbolic_trace(model)`` (the baseline a
user would pay to capture the model once) and of ``apply_stochastic_depth(copy, rate=0.1)`` on a
fresh deep copy (analysis + plan + rewrite, the whole public call). Prints the ratio per model and
the median ratio (issue 13 asks for a median <= 2x, none above 3x).

    OMP_NUM_THREADS=1 python benchmarks/capture_cost.py [--models resnet50,convnext_tiny] [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import timm
import torch

import regsurgery

DEFAULT_MODELS = ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224",
                  "vit_small_patch16_224", "efficientnet_b0"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    ratios = []
    print(f"{'model':34s} {'symbolic_trace':>14s} {'apply_sd':>10s} {'ratio':>7s}")
    for name in args.models.split(","):
        model = timm.create_model(name, pretrained=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Interleaved, so that a load change on the machine hits both sides alike.
            base_t, cost_t = [], []
            for _ in range(args.repeat):
                fresh = copy.deepcopy(model)
                base_t.append(_timed(lambda m=model: torch.fx.symbolic_trace(m)))
                cost_t.append(_timed(lambda m=fresh: regsurgery.apply_stochastic_depth(m, rate=0.1)))
            base, cost = statistics.median(base_t), statistics.median(cost_t)
        ratio = cost / base
        ratios.append(ratio)
        print(f"{name:34s} {base * 1e3:12.1f}ms {cost * 1e3:8.1f}ms {ratio:6.2f}x", flush=True)
    print(f"median ratio {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x "
          f"(apply_stochastic_depth / symbolic_trace, same run)")


if __name__ == "__main__":
    main()
