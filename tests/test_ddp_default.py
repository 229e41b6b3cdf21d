"""DDP with its default ``find_unused_parameters=False`` on models whose training skips compute:
skip-mode stochastic depth (dropped branches are not run) and LayerDrop (skipped blocks are not
run). Two CPU processes (gloo), per-rank seeds, a few SGD steps.

A skipped branch or block gives its parameters exact zero gradients, so DDP's reducer sees every
parameter every step; the ranks must end with bitwise equal parameters, and each rank must have
really skipped something (counted with forward hooks on a layer inside each block).
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

from regsurgery import apply_layerdrop, apply_stochastic_depth

WORLD = 2
STEPS = 4
BATCH = 4
BLOCKS = 4
TIMEOUT_S = 120


class MLPBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([MLPBlock() for _ in range(BLOCKS)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, kind: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    if kind == "skip":
        apply_stochastic_depth(model, rate=0.5, schedule="uniform", mode="batch", skip_dropped=True)
    else:
        apply_layerdrop(model, rate=0.5, example_inputs=torch.randn(2, 6))
    runs = [0]
    for b in model.blocks:
        b.fc1.register_forward_hook(lambda m, a, o: runs.__setitem__(0, runs[0] + 1))
    ddp = DDP(model)  # the default: find_unused_parameters=False
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1234 + rank)  # per-rank seeds: the ranks skip different blocks
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(100 * rank + step))
        ddp(x).square().mean().backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    return {"params_equal": all(torch.equal(gathered[0], g) for g in gathered[1:]),
            "skipped": STEPS * BLOCKS - runs[0]}


def _worker(rank: int, port: int, kinds: list[str], out_dir: str) -> None:
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
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(kinds: list[str], out_dir: Path) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, kinds, str(out_dir)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
        assert not any(p.is_alive() for p in procs), f"ranks still running after {TIMEOUT_S} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for rank in range(WORLD):
        res = torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
        results.append(res)
    return results


KINDS = ["skip", "layerdrop"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    return _run(KINDS, tmp_path_factory.mktemp("ddp_default"))


@pytest.mark.parametrize("kind", KINDS)
def test_default_ddp_trains_in_sync(kind, results) -> None:
    for res in results:
        assert res[kind]["params_equal"], "parameters diverged across ranks"
        # P(no skip in STEPS * BLOCKS = 16 draws at p = 0.5) = 2**-16 per rank.
        assert res[kind]["skipped"] > 0
