"""torch.compile on patched models (train and eval, fullgraph) and torch.export on stripped ones.

``backend="aot_eager"`` traces exactly what inductor would get (dynamo + AOT autograd) without a
C++ build; its random ops draw from the global RNG in eager order, so a seeded compiled train
step must equal the seeded eager step bitwise. That also rules out the pitfall of a compiled
model replaying one frozen drop decision every step (pytorch#95425). One inductor run on a tiny
block checks the real backend: its RNG differs from eager, so the check there is structural
(each sample's branch is either dropped or scaled by 1/(1-p)) and statistical.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_reduced, model_reduction
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from regsurgery import (
    DropBlock2d,
    DropPath,
    apply_dropblock,
    apply_stochastic_depth,
    inserted_modules,
    strip,
)
from regsurgery.io.examples_models import BasicBlock

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_cnn() -> nn.Module:
    """Stem, an identity BasicBlock, a downsampling BasicBlock (conv1x1 + BN projection), head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8), BasicBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def patched_cnn() -> nn.Module:
    model = small_cnn()
    apply_stochastic_depth(model, rate=0.5, schedule="uniform")
    apply_dropblock(model, rate=0.3, block_size=3, stages=(-1,), example_inputs=X[:2])
    kinds = {type(m) for m in inserted_modules(model).values()}
    assert kinds == {DropPath, DropBlock2d}
    return model


class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): per-sample independent (skip mode may run kept rows only)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def seeded(fn, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn(x)


def test_compile_fullgraph_train_and_eval_match_eager():
    model = patched_cnn()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)  # a graph break raises

    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(X), model(X))  # eval: bitwise the (original) eval forward
        assert torch.equal(compiled(X), strip(copy.deepcopy(model))(X))

    model.train()
    outs = []
    for seed in (1, 2, 3):
        eager = seeded(model, X, seed)
        comp = seeded(compiled, X, seed)
        assert torch.equal(comp, eager), f"seed {seed}: the compiled train step differs from eager"
        outs.append(comp)
    # fresh decisions every step, not one frozen at compile time
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    outs[0].square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    # One graph per mode; switching back and forth reuses them.
    assert counter.frame_count == 2
    for mode in (False, True, False, True):
        model.train(mode)
        with torch.set_grad_enabled(mode):  # grad mode is guarded too: keep each mode's own
            compiled(X)
    assert counter.frame_count == 2, "train()/eval() switches recompiled"

    # A schedule moves ``p`` between steps: after one recompile that makes the rate dynamic,
    # further changes reuse the graph, and the graph uses the new rate (bitwise = eager).
    mods = list(inserted_modules(model).values())
    for step, p in enumerate((0.1, 0.2, 0.35, 0.05, 0.45)):
        for m in mods:
            m.p = p
        assert torch.equal(seeded(compiled, X, step), seeded(model, X, step)), p
    assert counter.frame_count <= 3, f"{counter.frame_count - 2} recompiles for 5 rates"


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_compile_skip_mode_keeps_live_decisions(mode):
    """Skip mode makes a host decision (which rows / whether to run the branch): a graph break by
    design, so no fullgraph; compiled steps must still draw new decisions each step."""
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock(), MLPBlock())
    apply_stochastic_depth(model, rate=0.5, mode=mode, schedule="uniform", skip_dropped=True)
    model.train()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for seed in range(4):
        with torch.no_grad():
            comp = seeded(compiled, x, seed)
            assert torch.equal(comp, seeded(model, x, seed)), f"seed {seed}"
        outs.append(comp)
    assert len({tuple(o.flatten().tolist()) for o in outs}) > 1


@pytest.mark.slow
def test_inductor_tiny_block():
    """The real backend, on one block (its C++ build takes ~25 s on a loaded core)."""
    torch.manual_seed(0)
    block = MLPBlock()
    apply_stochastic_depth(block, rate=0.5)
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    n = 400
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(2))
    block.eval()
    with torch.no_grad():
        reduction, depth = model_reduction(block, x)  # inductor fuses and reorders the sums
        assert_close_reduced(compiled(x), block(x), reduction, depth)
        block.train()
        torch.manual_seed(0)
        y = compiled(x)
        f = block.branch(x)
    delta = y - x  # = m * f / (1 - p) per row, m in {0, 1}
    dropped = delta.abs().amax(1) == 0
    assert_close_reduced(delta[~dropped], 2 * f[~dropped], reduction, depth)
    # kept rows ~ Binomial(400, 0.5): mean 200, sd 10; 5 sigma
    kept = int((~dropped).sum())
    assert abs(kept - n / 2) <= 5 * math.sqrt(n * 0.25), kept


def test_export_stripped_and_patched_eval():
    model = patched_cnn()
    model.train()
    with torch.no_grad():
        model(X)  # a train step first: running statistics moved, inserted modules exercised
    stripped = strip(copy.deepcopy(model)).eval()
    ep = torch.export.export(stripped, (X,))
    with torch.no_grad():
        assert torch.equal(ep.module()(X), stripped(X))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(("rand" in t or "bernoulli" in t or "dropout" in t) for t in targets), targets
    # A patched model in eval mode runs the class forward: it exports to the same graph.
    patched_eval = copy.deepcopy(model).eval()
    ep2 = torch.export.export(patched_eval, (X,))
    with torch.no_grad():
        assert torch.equal(ep2.module()(X), stripped(X))
    assert [n.target for n in ep2.graph.nodes] == [n.target for n in ep.graph.nodes]
