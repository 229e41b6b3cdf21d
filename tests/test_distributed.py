"""DistributedDataParallel and FSDP on patched models: two CPU processes (gloo), a few SGD steps.

Each rank patches the same model *before* wrapping it (``docs/distributed.md``), seeds its RNG
differently (as a training script does, ``seed + rank``) and trains on its own data. Checked:

* parameters stay bitwise equal across ranks (DDP averages gradients, every rank updates alike);
* the drop decisions differ across ranks (observed with forward hooks on the inserted modules),
  and are equal when the ranks share a seed (legal, but every rank then drops the same branches);
* masking mode needs no ``find_unused_parameters``: every parameter gets a gradient every step;
* skip mode (dropped branches are not run) trains with ``find_unused_parameters=True``;
* FSDP2 (``fully_shard`` per block, then the root) trains the patched model the same way; in skip
  mode with one seed for all ranks (every rank skips the same branches).

The processes are started with the ``spawn`` context and joined with a timeout, so a hang in a
collective fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from regsurgery import apply_dropblock, apply_stochastic_depth, inserted_modules
from regsurgery.io.examples_models import BasicBlock

WORLD = 2
STEPS = 3
TIMEOUT_S = 120  # generous on a loaded CI core; a healthy run takes a few seconds per rank
BATCH = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8), BasicBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


class MLPBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def build(kind: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if kind in ("masking", "fsdp"):
        model = small_cnn()
        example = torch.randn(2, 3, 16, 16)
        apply_stochastic_depth(model, rate=0.5, schedule="uniform")
        apply_dropblock(model, rate=0.3, block_size=3, stages=(-1,), example_inputs=example)

        def data(rank: int, step: int) -> torch.Tensor:
            return torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(100 * rank + step))
    else:
        model = nn.Sequential(nn.Linear(6, 16), MLPBlock(), MLPBlock(), MLPBlock(), nn.Linear(16, 3))
        apply_stochastic_depth(model, rate=0.5, schedule="uniform", mode="batch", skip_dropped=True)

        def data(rank: int, step: int) -> torch.Tensor:
            return torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(100 * rank + step))
    return model, data


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (FSDP holds a DTensor shard per rank)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _train(rank: int, kind: str) -> dict[str, Any]:
    """One scenario on an initialized process group: patch, wrap, a few SGD steps, compare."""
    model, data = build(kind)  # patch first, then wrap
    modules = inserted_modules(model)
    decisions: list[torch.Tensor] = []

    def hook(mod, args, out):
        # per sample: did the module drop anything?
        if kind.endswith("skip"):  # SkipDropPath(shortcut, source, ...): dropped rows = shortcut
            dropped = (out == args[0]).flatten(1).all(1)
        else:  # DropPath / DropBlock: units zeroed where the input was not zero
            dropped = ((out == 0) & (args[0] != 0)).flatten(1).any(1)
        decisions.append(dropped)

    for m in modules.values():
        m.register_forward_hook(hook)
    keys = list(model.state_dict())
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    if kind.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard

        for block in model:  # the usual policy: one unit per residual block, then the root
            if isinstance(block, (BasicBlock, MLPBlock)):
                fully_shard(block)
        ddp = fully_shard(model)
    else:
        ddp = DDP(model, find_unused_parameters=(kind == "skip"))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    # The per-rank seed a training script sets. FSDP + skip mode: one seed for all ranks, so
    # every rank skips the same branches (FSDP cannot reduce gradients that exist on one rank
    # only: rank-dependent unused parameters crash or hang its collectives).
    torch.manual_seed(1234 + (0 if kind == "fsdp_skip" else rank))
    grads_everywhere = True
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = ddp(data(rank, step)).square().mean()
        loss.backward()
        grads_everywhere &= all(p.grad is not None for p in model.parameters())
        opt.step()
    rank_masks = torch.stack(decisions)

    flat = torch.cat([_full(p).detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    masks = [torch.empty_like(rank_masks) for _ in range(WORLD)]
    dist.all_gather(masks, rank_masks)

    # The same seed on every rank: the same decisions on every rank.
    decisions.clear()
    torch.manual_seed(0)
    with torch.no_grad():
        ddp(data(0, 0))
    same = torch.stack(decisions)
    same_all = [torch.empty_like(same) for _ in range(WORLD)]
    dist.all_gather(same_all, same)

    return {
        "n_modules": len(modules),
        "params_equal": all(torch.equal(gathered[0], g) for g in gathered[1:]),
        "params_moved": not torch.equal(flat, initial),
        "masks_differ": not torch.equal(masks[0], masks[1]),
        "drops": int(rank_masks.sum()),
        "same_seed_equal": torch.equal(same_all[0], same_all[1]),
        "grads_everywhere": grads_everywhere,
        "keys_unchanged": list(model.state_dict()) == keys,
    }


def _worker(rank: int, port: int, kinds: list[str], out_dir: str) -> None:
    """All scenarios in one pair of processes (spawning costs seconds per process)."""
    results: dict[str, Any] = {}
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        for kind in kinds:
            results[kind] = _train(rank, kind)
            dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        # Stop at the first failure: the other rank would wait in a collective (the parent's
        # timeout ends it).
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(kinds: list[str], out_dir: Path) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, kinds, str(out_dir)), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s (hang in a collective?)"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for rank, p in enumerate(procs):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} exited with code {p.exitcode} and wrote no result"
        res = torch.load(path, weights_only=True)
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
        assert p.exitcode == 0, f"rank {rank} exit code {p.exitcode}"
        results.append(res)
    return results


KINDS = ["masking", "skip", "fsdp", "fsdp_skip"]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    return run_ranks(KINDS, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks(kind, rank_results):
    """masking / skip: DDP; fsdp / fsdp_skip: FSDP2 ``fully_shard`` per residual block and at the
    root (fsdp_skip with one seed on every rank, see docs/distributed.md)."""
    results = [r[kind] for r in rank_results]
    for res in results:
        assert res["n_modules"] == (3 if kind.endswith("skip") else 5)
        assert res["keys_unchanged"]
        assert res["params_equal"], "parameters diverged across ranks"
        assert res["params_moved"], "SGD did not change the parameters"
        if kind == "fsdp_skip":
            assert not res["masks_differ"], "one seed on every rank must give the same decisions"
        else:
            assert res["masks_differ"], "both ranks drew the same decisions despite different seeds"
        assert res["drops"] > 0
        assert res["same_seed_equal"], "a shared seed gave different decisions per rank"
    if not kind.endswith("skip"):
        # masking: every parameter takes part every step (so find_unused_parameters=False works)
        assert all(res["grads_everywhere"] for res in results)


def test_inserted_modules_hold_no_state():
    """FSDP and DDP flatten / shard / broadcast parameters and buffers: the inserted modules have
    none, so wrapping policies and state_dict keys are unaffected."""
    for kind in ("masking", "skip"):
        model, _ = build(kind)
        modules = inserted_modules(model)
        assert modules
        for m in modules.values():
            assert list(m.parameters()) == [] and list(m.buffers()) == []
