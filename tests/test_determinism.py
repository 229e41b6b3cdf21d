"""Reproducibility: seeded runs reproduce the same masks; deterministic algorithms work.

The inserted regularizers draw from torch's global RNG (or an explicit ``generator`` in the
functional forms), so ``torch.manual_seed(s)`` before a step fixes every drop decision. Masks
are observed with forward hooks on the inserted modules (``regsurgery.inserted_modules``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import regsurgery
from regsurgery import (
    DropBlock2d,
    DropPath,
    apply_dropblock,
    apply_stochastic_depth,
    drop_block2d,
    drop_path,
    inserted_modules,
)
from regsurgery.io.examples_models import TinyResNet

BATCH = 8
X = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def patched_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet(num_classes=5, widths=(8, 16, 16, 16), depths=(2, 2, 1, 1))
    apply_stochastic_depth(model, rate=0.5, schedule="uniform")
    apply_dropblock(model, rate=0.3, block_size=3, example_inputs=X[:2])
    return model.train()


class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): per-sample independent, so skip mode can run kept rows only."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def token_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), *[MLPBlock() for _ in range(4)], nn.Linear(16, 3))


TOKENS = torch.randn(BATCH, 5, 6, generator=torch.Generator().manual_seed(1))


def record_masks(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One seeded train-mode forward; returns (output, per inserted module: which units it zeroed)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in inserted_modules(model).items():
        def hook(mod, args, out, name=name):
            # A unit the module zeroed is 0 in the output where the input was not.
            seen[name] = (out == 0) & (args[0] != 0)
        handles.append(module.register_forward_hook(hook))
    try:
        torch.manual_seed(seed)
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_same_seed_same_masks_and_outputs():
    model = patched_cnn()
    mods = inserted_modules(model)
    assert any(isinstance(m, DropPath) for m in mods.values())
    assert any(isinstance(m, DropBlock2d) for m in mods.values())
    out1, masks1 = record_masks(copy.deepcopy(model), X, seed=7)
    out2, masks2 = record_masks(copy.deepcopy(model), X, seed=7)
    assert masks1.keys() == masks2.keys() == mods.keys()
    assert all(torch.equal(masks1[k], masks2[k]) for k in masks1)
    assert torch.equal(out1, out2)
    # Something was dropped at all (else equality above would be vacuous).
    assert sum(int(m.sum()) for m in masks1.values()) > 0


def test_different_seeds_give_different_masks():
    model = patched_cnn()
    _, a = record_masks(copy.deepcopy(model), X, seed=1)
    _, b = record_masks(copy.deepcopy(model), X, seed=2)
    # Row-mode DropPath at p = 0.5 on every site: one fair coin per sample and site, so two seeds
    # agree on all 8 x 6 decisions with probability 2^-48; DropBlock masks differ as well.
    path_names = [k for k, m in inserted_modules(model).items() if isinstance(m, DropPath)]
    assert len(path_names) == 6
    keep_a = torch.stack([a[k].flatten(1).any(1) for k in path_names])
    keep_b = torch.stack([b[k].flatten(1).any(1) for k in path_names])
    assert not torch.equal(keep_a, keep_b)
    block_names = [k for k in a if k not in path_names]
    assert any(not torch.equal(a[k], b[k]) for k in block_names)


def test_patching_twice_gives_the_same_masks():
    """Masks depend on the seed only: two independently patched copies draw the same."""
    _, a = record_masks(patched_cnn(), X, seed=3)
    _, b = record_masks(patched_cnn(), X, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_mode_ignores_the_seed():
    model = patched_cnn().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        a = model(X)
    torch.manual_seed(1)
    with torch.no_grad():
        b = model(X)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn, x", [
    (lambda x, g: drop_path(x, 0.5, generator=g), torch.randn(64, 4, 3, 3)),
    (lambda x, g: drop_path(x, 0.5, mode="batch", generator=g), torch.randn(4, 4, 3, 3)),
    (lambda x, g: drop_block2d(x, 0.3, 3, generator=g), torch.randn(4, 4, 9, 9)),
    (lambda x, g: drop_block2d(x, 0.3, 3, per_channel=True, generator=g), torch.randn(4, 4, 9, 9)),
])
def test_functional_generator_reproduces_and_leaves_global_rng(fn, x):
    state = torch.get_rng_state()
    a = fn(x, torch.Generator().manual_seed(5))
    b = fn(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator only
    draws = {tuple((fn(x, torch.Generator().manual_seed(s)) == 0).flatten().tolist()) for s in range(8)}
    assert len(draws) > 1


def _seeded_step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    # None where a skipped branch's parameters took no part (skip mode, batch decision)
    return out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _deterministic_runs(model: nn.Module, x: torch.Tensor) -> None:
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        out1, g1 = _seeded_step(copy.deepcopy(model), x, 11)
        out2, g2 = _seeded_step(copy.deepcopy(model), x, 11)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert torch.equal(out1, out2)
    assert [g is None for g in g1] == [g is None for g in g2]
    assert any(g is not None for g in g1)
    assert all(a is None or torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_deterministic_algorithms_masking(mode):
    torch.manual_seed(0)
    model = TinyResNet(num_classes=5, widths=(8, 16, 16, 16), depths=(2, 2, 1, 1))
    apply_stochastic_depth(model, rate=0.5, mode=mode)
    apply_dropblock(model, rate=0.3, block_size=3, example_inputs=X[:2], per_channel=mode == "batch")
    _deterministic_runs(model.train(), X)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_deterministic_algorithms_skip_mode(mode):
    model = token_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LayerNorm branches: no site may fall back to masking
        apply_stochastic_depth(model, rate=0.5, mode=mode, skip_dropped=True)
    plan = regsurgery.plan_of(model)
    assert all(op.params.skip for op in plan.ops)
    _deterministic_runs(model.train(), TOKENS)


def test_deterministic_flag_restored():
    """The tests above restore the global flag (a leak would change every later test)."""
    assert not torch.are_deterministic_algorithms_enabled()
