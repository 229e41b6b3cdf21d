"""LayerDrop (Fan et al., ICLR 2020): stacks, skipping in training, compile, pruning, export."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import timm
import torch
from torch import nn

import regsurgery
from regsurgery import NoSitesError, apply_layerdrop, apply_stochastic_depth, prune_layers, strip
from regsurgery.analysis.stacks import find_layer_stacks
from regsurgery.api_layerdrop import keep_indices
from regsurgery.io.export import export_onnx


def tiny_vit(depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=depth,
                             embed_dim=16, num_heads=2, num_classes=3)


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class PostNorm(nn.Module):
    """norm(x + f(x)): the output is not the input plus a branch, so skipping it is unsound."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc(x))


class PreNorm(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class Flex(nn.Module):
    def __init__(self, residual: bool, d: int = 8) -> None:
        super().__init__()
        self.residual = residual
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x) if self.residual else self.fc(x)


def outputs_per_subset(model: nn.Module, depth: int) -> dict[tuple[int, ...], torch.Tensor]:
    """Eval outputs of the model with each subset of its blocks (1 = kept)."""
    blocks = list(model.blocks)
    refs = {}
    with torch.no_grad():
        for keep in itertools.product([0, 1], repeat=depth):
            model.blocks = nn.Sequential(*[b for b, k in zip(blocks, keep) if k])
            refs[keep] = model.eval()(X)
    model.blocks = nn.Sequential(*blocks)
    return refs


def test_stacks_found_by_shape_and_dataflow() -> None:
    [stack] = find_layer_stacks(tiny_vit())
    assert stack.scope == "blocks" and stack.droppable == [0, 1, 2, 3] and not stack.refused
    post = nn.Sequential(nn.Linear(4, 8), nn.Sequential(PostNorm(), PostNorm(), PostNorm()))
    [s] = find_layer_stacks(post, torch.randn(2, 4))
    assert s.droppable == [] and "not residual" in s.refused[0]
    with pytest.raises(NoSitesError, match="no stack of repeated residual blocks"):
        apply_layerdrop(post, 0.2, example_inputs=torch.randn(2, 4))
    widen = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])
    holder = nn.Sequential(*widen)
    [s] = find_layer_stacks(holder, torch.randn(2, 4))
    assert "differs from input shape" in s.refused[0]


def test_training_skips_whole_blocks_at_rate_and_eval_is_bitwise() -> None:
    model = tiny_vit()
    keys = list(model.state_dict())
    ref = model.eval()(X)
    assert apply_layerdrop(model, 0.5) is model
    assert type(model).__name__ == "VisionTransformer" and list(model.state_dict()) == keys
    assert torch.equal(model.eval()(X), ref)
    calls = []
    for i, b in enumerate(model.blocks):
        b.attn.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    model.train()
    torch.manual_seed(0)
    steps = 100
    for _ in range(steps):
        model(X)
    n = steps * 4
    skipped = 1 - len(calls) / n  # a skipped block runs nothing, its attention included
    assert abs(skipped - 0.5) <= 5 * math.sqrt(0.25 / n)
    strip(model)
    assert not regsurgery.is_patched(model) and "forward" not in model.blocks[0].__dict__
    assert torch.equal(model.eval()(X), ref)


def test_skipped_block_returns_input_and_zero_grads() -> None:
    model = nn.Sequential(PreNorm(), PreNorm(), PreNorm())
    x = torch.randn(3, 8)
    apply_layerdrop(model, 1.0, example_inputs=x)
    model.train()
    out = model(x.requires_grad_())
    assert torch.equal(out, x)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert torch.equal(x.grad, torch.ones_like(x))


def test_compiled_model_draws_anew_every_step() -> None:
    model = tiny_vit(depth=2)
    refs = outputs_per_subset(model, 2)
    apply_layerdrop(model, 0.5)
    compiled = torch.compile(model.train(), backend="eager")
    torch.manual_seed(0)
    seen = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for _ in range(8):
            out = compiled(X)
            match = [k for k, r in refs.items() if torch.allclose(out, r, rtol=1e-5, atol=1e-6)]
            assert match, "the compiled output is no subset of the blocks"
            seen.append(match[0])
    # 4 equally likely patterns: all 8 steps alike has probability 4 * 4**-8 < 1e-4.
    assert len(set(seen)) >= 2, seen


def test_composes_with_drop_path_either_order() -> None:
    for first_layerdrop in (True, False):
        model = tiny_vit(depth=2)
        ref = model.eval()(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if first_layerdrop:
                apply_layerdrop(model, 0.3)
                apply_stochastic_depth(model, 0.2)
            else:
                apply_stochastic_depth(model, 0.2)
                apply_layerdrop(model, 0.3)
        model.train()(X).sum().backward()
        assert torch.equal(model.eval()(X), ref)
        strip(model)
        assert not regsurgery.is_patched(model) and torch.equal(model.eval()(X), ref)
        assert all("forward" not in b.__dict__ for b in model.modules())


def test_keep_rules() -> None:
    assert keep_indices("every_other", 6) == [0, 2, 4]
    assert keep_indices(0.5, 12) == [0, 2, 4, 6, 8, 10]
    assert keep_indices(1.0, 3) == [0, 1, 2]
    assert keep_indices([0, -1], 4) == [0, 3]
    for bad in ("half", 0.0, 1.5, [4], [0, 0], [], True):
        with pytest.raises(ValueError):
            keep_indices(bad, 4)


def test_prune_every_other_state_dict_outputs_and_onnx(tmp_path) -> None:
    model = tiny_vit(depth=4)
    refs = outputs_per_subset(model, 4)
    original = copy.deepcopy(model).state_dict()
    pruned = prune_layers(model, "every_other", inplace=False)
    assert len(model.blocks) == 4 and len(pruned.blocks) == 2
    assert type(pruned) is type(model) and type(pruned.blocks) is nn.Sequential
    sd = pruned.state_dict()
    expected = {k for k in original if not k.startswith("blocks.")} | {
        k.replace("blocks.2.", "blocks.1.") for k in original if k.startswith(("blocks.0.", "blocks.2."))}
    assert set(sd) == expected
    assert torch.equal(sd["blocks.1.mlp.fc1.weight"], original["blocks.2.mlp.fc1.weight"])
    assert torch.equal(pruned.eval()(X), refs[(1, 0, 1, 0)])
    report = export_onnx(pruned, X, tmp_path / "pruned.onnx")
    assert report is not None and (tmp_path / "pruned.onnx").stat().st_size > 0
    # A LayerDrop-patched model exports too (the exporter strips a copy; the model stays patched).
    apply_layerdrop(pruned, 0.5)
    export_onnx(pruned, X, tmp_path / "patched.onnx")
    assert regsurgery.is_patched(pruned)


def test_prune_refuses_non_droppable_and_bad_keep() -> None:
    model = tiny_vit(depth=2)
    with pytest.raises(ValueError, match="out of range"):
        prune_layers(model, [5])
    with pytest.raises(ValueError, match="not layer stacks"):
        prune_layers(model, {"layers": [0]})
    mixed = nn.Sequential(Flex(True), Flex(False), Flex(True))  # one class, block 1 not residual
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"cannot remove block 1 .*not residual"):
        prune_layers(mixed, [0, 2], example_inputs=x)
    assert len(mixed) == 3  # nothing changed
    kept = mixed[1]
    pruned = prune_layers(mixed, [1, 2], example_inputs=x)
    assert pruned is mixed and len(mixed) == 2 and mixed[0] is kept
    assert list(mixed.state_dict())[:2] == ["0.fc.weight", "0.fc.bias"]


def test_layerdrop_patched_model_pickles_and_stays_regularized() -> None:
    import pickle

    torch.manual_seed(0)
    model = tiny_vit(depth=4)
    apply_layerdrop(model, rate=0.5)
    apply_stochastic_depth(model, rate=0.2)
    back = pickle.loads(pickle.dumps(model))
    back.train()
    x = X
    outs = [back(x) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # still dropping after the round trip
    back.eval()
    model.eval()
    assert torch.equal(back(x), model(x))
    strip(back)
    assert not regsurgery.is_patched(back)
