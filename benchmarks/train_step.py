"""Train-step time of skip-mode stochastic depth, masking, timm's own DropPath and no DropPath.

Stochastic depth that multiplies dropped branches by zero (timm's ``drop_path_rate``, torchvision,
``apply_stochastic_depth`` in masking mode) saves nothing; the paper (Huang et al., ECCV 2016)
skipped dropped blocks and trained about 25% faster at p_L = 0.5 with linear decay.
``apply_stochastic_depth(..., skip_dropped=True)`` does that: batch mode skips a dropped branch for
the whole step, row mode runs it on the kept samples only.

Configurations per model (timm ``vit_small_patch16_224`` and ``resnet50`` by default, random
weights, the same for every configuration) and per linear rate r (deepest block r, first 0):

* ``unpatched``      the model with ``drop_path_rate=0``
* ``timm r``         timm's own ``drop_path_rate=r`` (masking)
* ``mask r``         ``apply_stochastic_depth(model, r)`` on the ``drop_path_rate=0`` model
* ``skip-row r``     ``apply_stochastic_depth(model, r, skip_dropped=True)``
* ``skip-batch r``   ``apply_stochastic_depth(model, r, mode="batch", skip_dropped=True)``

A train step is forward, cross-entropy, backward and an SGD step. Every configuration runs
``--steps`` steps per round, rounds are interleaved (the order rotates each round) and every
configuration reuses the same seeds per round (so masking and skipping make the same drop
decisions). The table gives the mean step time and the ratio of total times to ``unpatched`` and
to ``timm r``: what a training run pays, random skips included. ``mean p`` is the mean drop rate
over the residual sites (the fraction of branch work skip mode saves in expectation) and
``skipped`` the realized fraction of branch rows not computed in the timed steps; with few steps
it varies, batch mode most (one draw decides a whole block).

On CPU the clock is the process's CPU time (``--clock cpu``, one thread by default): other jobs on
a shared machine delay the wall clock, not the CPU time this process needs. On CUDA it is wall
time with synchronisation.

Targets (issue 6): skip mode at r = 0.5 at most 0.85x the unpatched step; masking at most 1.03x
timm's own.

``--mode layerdrop`` times LayerDrop instead (Fan et al., ICLR 2020; ``apply_layerdrop(model, r)``:
each block of each stack skipped for the whole step with probability r, nothing computed for it)
against the unpatched model; ``skipped`` is then the realized fraction of block calls skipped.
Target (issue 15): at r = 0.5 on a ViT at most 0.6x the unpatched step.

    python benchmarks/train_step.py --mode layerdrop --models vit_small_patch16_224 --rates 0.5

    python benchmarks/train_step.py --batch 2 --steps 4 --reps 5          # CPU
    python benchmarks/train_step.py --device cuda --batch 128 --amp       # GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from regsurgery import apply_layerdrop, apply_stochastic_depth, inserted_modules
from regsurgery.analysis.stacks import find_layer_stacks
from regsurgery.ops.skip import SkipDropPath


@dataclass
class Config:
    label: str
    model: nn.Module
    rate: Optional[float] = None
    mean_p: float = 0.0
    note: str = ""
    opt: Any = None
    times: list[float] = field(default_factory=list)  # per-step seconds, one entry per round
    rows: list[int] = field(default_factory=lambda: [0, 0])  # branch rows run, rows offered


def _count_rows(cfg: Config, batch: int) -> None:
    """Count the rows each skipping branch really runs on (realized skip fraction)."""
    for m in inserted_modules(cfg.model).values():
        if not isinstance(m, SkipDropPath):
            continue

        def counted(block: nn.Module, source: torch.Tensor, *extras: Any,
                    _fn: Any = m._branch_fn) -> torch.Tensor:
            cfg.rows[0] += source.shape[0]
            return _fn(block, source, *extras)

        def offered(module: nn.Module, args: Any) -> None:
            cfg.rows[1] += batch

        m._branch_fn = counted
        m.register_forward_pre_hook(offered)


def _timm_drop_rates(model: nn.Module) -> list[float]:
    rates = []
    for m in model.modules():
        if type(m).__name__ == "DropPath" and hasattr(m, "drop_prob"):
            rates.append(float(m.drop_prob))
    return rates


def _create(name: str, img_size: int, drop_path_rate: float) -> nn.Module:
    import timm

    try:  # ViTs need their input size; CNNs take any and reject the argument
        return timm.create_model(name, pretrained=False, drop_path_rate=drop_path_rate, img_size=img_size)
    except TypeError:
        return timm.create_model(name, pretrained=False, drop_path_rate=drop_path_rate)


def _count_blocks(cfg: Config) -> None:
    """Count block calls offered and run (a skipped block's children are never called)."""
    for stack in find_layer_stacks(cfg.model):
        container = cfg.model.get_submodule(stack.scope)
        for i in stack.droppable:
            block = container[i]
            first = next(block.children())
            block.register_forward_pre_hook(lambda m, a: cfg.rows.__setitem__(1, cfg.rows[1] + 1))
            first.register_forward_pre_hook(lambda m, a: cfg.rows.__setitem__(0, cfg.rows[0] + 1))


def build_layerdrop_configs(name: str, rates: list[float], device: torch.device, img_size: int) -> list[Config]:
    base = _create(name, img_size, 0.0)
    configs = [Config("unpatched", copy.deepcopy(base))]
    for r in rates:
        model = apply_layerdrop(copy.deepcopy(base), r)
        n = sum(1 for m in model.modules() if "_regsurgery_layerdrop" in m.__dict__)
        cfg = Config(f"layerdrop {r:g}", model, r, r, f"{n} blocks")
        _count_blocks(cfg)
        configs.append(cfg)
    for c in configs:
        c.model.to(device).train()
        c.opt = torch.optim.SGD(c.model.parameters(), lr=1e-4)
    return configs


def build_configs(name: str, rates: list[float], device: torch.device, img_size: int,
                  batch: int) -> list[Config]:
    base = _create(name, img_size, 0.0)
    state = base.state_dict()
    configs = [Config("unpatched", copy.deepcopy(base))]
    for r in rates:
        own = _create(name, img_size, r)
        own.load_state_dict(state)
        # timm puts DropPath modules only where its rate is > 0 (and two per transformer block).
        own_rates = _timm_drop_rates(own)
        configs.append(Config(f"timm {r:g}", own, r, note=f"{len(own_rates)} DropPath modules"))
        mask = apply_stochastic_depth(copy.deepcopy(base), r)
        ps = [m.p for m in inserted_modules(mask).values()]
        configs.append(Config(f"mask {r:g}", mask, r, statistics.mean(ps), f"{len(ps)} sites"))
        for mode in ("row", "batch"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                skip = apply_stochastic_depth(copy.deepcopy(base), r, mode=mode, skip_dropped=True)
            mods = list(inserted_modules(skip).values())
            n_skip = sum(isinstance(m, SkipDropPath) for m in mods)
            note = f"{n_skip}/{len(mods)} sites skip"
            if n_skip == 0:
                # Every site fell back to masking (BatchNorm in row mode): the same model as mask.
                configs.append(Config(f"skip-{mode} {r:g}", mask, r, statistics.mean(ps),
                                      note + " (all fall back: = mask, not timed)"))
                continue
            configs.append(Config(f"skip-{mode} {r:g}", skip, r,
                                  statistics.mean(m.p for m in mods), note))
    for c in configs:
        if c.label.startswith("skip") and "not timed" not in c.note:
            _count_rows(c, batch)
        c.model.to(device).train()
        c.opt = torch.optim.SGD(c.model.parameters(), lr=1e-4)
    return configs


def train_step(cfg: Config, x: torch.Tensor, y: torch.Tensor, amp: bool) -> None:
    cfg.opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = cfg.model(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    cfg.opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name: str, args: argparse.Namespace, device: torch.device) -> None:
    t0 = time.perf_counter()
    # CPU time of this process: other jobs on a shared machine delay the wall clock, not it.
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.mode == "layerdrop":
        configs = build_layerdrop_configs(name, args.rates, device, args.img_size)
    else:
        configs = build_configs(name, args.rates, device, args.img_size, args.batch)
    timed = [c for c in configs if "not timed" not in c.note]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    for c in timed:  # warm-up: allocator, kernels, first-call costs
        torch.manual_seed(0)
        for _ in range(args.warmup):
            train_step(c, x, y, args.amp)
        c.rows = [0, 0]
    _sync(device)
    for rep in range(args.reps):
        order = timed[rep % len(timed):] + timed[:rep % len(timed)]
        for c in order:
            torch.manual_seed(1000 + rep)  # the same drop decisions for mask and skip
            _sync(device)
            start = clock()
            for _ in range(args.steps):
                train_step(c, x, y, args.amp)
            _sync(device)
            c.times.append((clock() - start) / args.steps)
        print(f"  {name}: round {rep + 1}/{args.reps} done ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    by_label = {c.label: c for c in configs}
    for c in configs:
        if not c.times:  # an untimed fallback: the mask configuration's times
            c.times = by_label[f"mask {c.rate:g}"].times

    def ratio(c: Config, ref: Config) -> float:
        # Total time over all rounds: what a training run pays, random skips included.
        return sum(c.times) / sum(ref.times)

    base = by_label["unpatched"]
    print(f"\n{name}: batch {args.batch}, {args.img_size} px, {device.type}"
          f"{' bf16 autocast' if args.amp else ''}, {args.threads} threads, {args.clock} clock, {args.reps} rounds x "
          f"{args.steps} steps (setup+run {time.perf_counter() - t0:.0f} s)")
    print(f"{'config':<16}{'ms/step':>10}{'vs unpatched':>14}{'vs timm r':>11}{'mean p':>8}"
          f"{'skipped':>9}  note")
    for c in configs:
        own = by_label.get(f"timm {c.rate:g}") if c.rate is not None else None
        vs_own = f"{ratio(c, own):.3f}x" if own is not None and c is not own else ""
        vs_base = f"{ratio(c, base):.3f}x" if c is not base else ""
        mean_p = f"{c.mean_p:.3f}" if c.rate is not None and not c.label.startswith("timm") else ""
        skipped = f"{1 - c.rows[0] / c.rows[1]:.3f}" if c.rows[1] else ""
        print(f"{c.label:<16}{1000 * statistics.mean(c.times):>10.1f}{vs_base:>14}{vs_own:>11}"
              f"{mean_p:>8}{skipped:>9}  {c.note}", flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "resnet50"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.5])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per config per round")
    parser.add_argument("--reps", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="process CPU time (default on --device cpu: robust to other jobs on a "
                             "shared machine) or wall time (default on cuda)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--mode", choices=("stochastic-depth", "layerdrop"), default="stochastic-depth",
                        help="what to time against the unpatched model (default stochastic-depth)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; run with --device cpu")
    if args.clock is None:
        args.clock = "cpu" if device.type == "cpu" else "wall"
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time: use --clock wall with --device cuda")
    torch.set_num_threads(args.threads)
    for name in args.models:
        run(name, args, device)


if __name__ == "__main__":
    main()
