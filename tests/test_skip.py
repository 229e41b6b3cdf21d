"""Skip-mode stochastic depth (apply_stochastic_depth(..., skip_dropped=True)).

The reference is masking (regsurgery.DropPath) with the same seed: both draw the keep mask with
the same RNG call, so for per-sample-independent branches without random ops of their own the
outputs and gradients must agree, while the skipped branches really do not run (counted with
forward hooks on a layer inside the branch).
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
import toy_models as tm
from tolerances import assert_close_reduced, model_reduction
from torch import nn

from regsurgery import (
    DropPath,
    Plan,
    apply_dropblock,
    apply_plan,
    apply_stochastic_depth,
    inserted_modules,
    is_patched,
    plan_of,
    plan_stochastic_depth,
    strip,
)
from regsurgery.ops.skip import SkipDropPath, skip_drop_path

timm = pytest.importorskip("timm")

D = 16


class ToyViT(nn.Module):
    """Embedding, two transformer blocks (attention + MLP residuals), head."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.blocks = nn.Sequential(*[tm.TwoResiduals(D) for _ in range(depth)])
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


class CondBlock(nn.Module):
    """A branch that reads a second per-sample input besides its source."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x) * cond)))


class CondNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CondBlock(), CondBlock()])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, cond)
        return x


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.fc(h)
        return y if scale is None else y * scale


class OptionalInputBlock(nn.Module):
    """A branch reading an optional input (default None), like timm's ``attn_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mix = Scaled()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x + self.fc(F.gelu(self.mix(self.norm(x), scale)))


class ShapeBlock(nn.Module):
    """Shape reads used inside and outside the branch (they stay, and are recomputed), and
    unused ones hanging off the branch (they go with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.fc1(self.norm(x))
        _, tokens, _ = h.shape  # two of three reads unused: they hang off the branch
        y = x + self.fc2(F.gelu(h).reshape(B, tokens, 2 * C))
        return y.reshape(B, N * C)


class SharedIntermediate(nn.Module):
    """The branch's hidden value is also used after the add: the branch cannot be skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))
        y = x + self.fc2(F.gelu(h))
        return y * h.sigmoid()


def _seeded(seed: int, make):
    torch.manual_seed(seed)
    return make()


def _pair(model: nn.Module, rate: float, mode: str, schedule: str = "uniform"):
    """(masking model, skipping model): the same weights, patched both ways."""
    ref = copy.deepcopy(model)
    apply_stochastic_depth(ref, rate, schedule, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_stochastic_depth(model, rate, schedule, mode, skip_dropped=True)
    return ref, model


def _step(model: nn.Module, seed: int, *inputs: torch.Tensor):
    """Output and parameter gradients (None as zeros) of one train step with a fixed seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*inputs)
    weight = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)  # a non-uniform upstream grad
    (out * weight).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    return out.detach(), grads


def _assert_same_step(ref: nn.Module, skip: nn.Module, seed: int, *inputs: torch.Tensor) -> None:
    out_ref, g_ref = _step(ref, seed, *inputs)
    out_skip, g_skip = _step(skip, seed, *inputs)
    # Skipping runs the branch on fewer rows: the same math in another summation order.
    reduction, depth = model_reduction(ref, *inputs)
    assert_close_reduced(out_skip, out_ref, reduction, depth, "output")
    assert g_ref.keys() == g_skip.keys()
    for name in g_ref:
        assert_close_reduced(g_skip[name], g_ref[name], reduction, 2 * depth, f"grad of {name}")


def _count_rows(layers: list[nn.Module]) -> list[int]:
    """Batch sizes seen by each call of the given layers (appended in call order)."""
    seen: list[int] = []
    for layer in layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


# ----------------------------------------------------------------------------------------------
# equality with masking
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_toy_vit_matches_masking_and_skips(mode):
    x = torch.randn(12, 5, 8, generator=torch.Generator().manual_seed(0))
    ref, skip = _pair(_seeded(0, lambda: ToyViT(depth=3)), rate=0.5, mode=mode)
    modules = inserted_modules(skip)
    assert len(modules) == 6 and all(isinstance(m, SkipDropPath) for m in modules.values())
    rows = _count_rows([b.mlp[0] for b in skip.blocks])
    for seed in range(4):
        _assert_same_step(ref, skip, seed, x)
    # The MLP branch ran on fewer rows than the masked model computes (3 blocks x 4 steps x 12).
    assert sum(rows) < 3 * 4 * 12
    if mode == "row":
        assert any(0 < n < 12 for n in rows)  # gathered subsets
    else:
        assert set(rows) == {12} and len(rows) < 3 * 4  # whole-batch skips


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_timm_vit_matches_masking(mode):
    model = _seeded(0, lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4,
                                                 pretrained=False))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, skip = _pair(model, rate=0.6, mode=mode, schedule="linear")
    rows = _count_rows([b.mlp.fc1 for b in skip.blocks])
    for seed in range(2):
        _assert_same_step(ref, skip, seed, x)
    assert sum(rows) < 4 * 2 * 6
    if mode == "row":
        assert skip.blocks[0].regsurgery.dp0.p == 0.0  # linear: the first block keeps everything
        assert any(0 < n < 6 for n in rows)


def test_timm_existing_slots_are_neutralised_and_restored():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.1,
                              pretrained=False)
    plan = plan_stochastic_depth(model, rate=0.4, skip_dropped=True)
    set_rates = [op for op in plan.ops if op.kind == "set_rate"]
    # timm puts a DropPath only where its own rate is > 0: blocks.1 (linspace(0, 0.1, 2)).
    assert sorted(op.params.module for op in set_rates) == ["blocks.1.drop_path1", "blocks.1.drop_path2"]
    assert all(op.params.p == 0.0 for op in set_rates)
    apply_stochastic_depth(model, rate=0.4, skip_dropped=True)
    assert model.blocks[1].drop_path1.drop_prob == 0.0
    assert isinstance(model.blocks[1].regsurgery.dp0, SkipDropPath)
    assert model.blocks[1].regsurgery.dp0.p == pytest.approx(0.4)
    strip(model)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


def test_shape_reads_used_outside_the_branch_stay():
    x = torch.randn(10, 4, D, generator=torch.Generator().manual_seed(2))
    model = _seeded(0, lambda: nn.Sequential(ShapeBlock()))
    ref, skip = _pair(model, rate=0.5, mode="row")
    assert isinstance(skip[0].regsurgery.dp0, SkipDropPath)
    assert "x.shape" in skip[0]._regsurgery_patch.source  # kept for the final reshape
    rows = _count_rows([skip[0].fc1])
    for seed in range(3):
        _assert_same_step(ref, skip, seed, x)
    assert any(0 < n < 10 for n in rows)


def test_optional_input_given_a_tensor_falls_back_to_masking_at_run_time():
    x = torch.randn(8, 3, D, generator=torch.Generator().manual_seed(3))
    scale = torch.rand(8, 1, D, generator=torch.Generator().manual_seed(4))  # per sample
    net = _seeded(0, lambda: nn.ModuleList([OptionalInputBlock(), OptionalInputBlock()]))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = net

        def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
            for b in self.blocks:
                x = b(x, scale)
            return x

    ref, skip = _pair(Net(), rate=0.5, mode="row")
    assert plan_stochastic_depth(Net(), 0.5, skip_dropped=True).meta["drop_path"]["skip_fallbacks"] == []
    rows = _count_rows([b.fc for b in skip.blocks])
    _assert_same_step(ref, skip, 0, x, scale)  # a tensor: full branch, masked
    assert rows == [8, 8]
    _assert_same_step(ref, skip, 1, x)  # None: gathered
    assert sum(rows[2:]) < 16


# ----------------------------------------------------------------------------------------------
# fallbacks
# ----------------------------------------------------------------------------------------------
def test_resnet_row_mode_falls_back_and_reports_batchnorm():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.warns(UserWarning, match=r"8 of 8 sites fall back to masking .*BatchNorm2d"):
        apply_stochastic_depth(model, rate=0.5, skip_dropped=True)
    modules = inserted_modules(model)
    assert len(modules) == 8
    assert all(type(m) is DropPath for m in modules.values())  # masking, not skipping
    fallbacks = plan_stochastic_depth(model, 0.5, skip_dropped=True).meta["drop_path"]["skip_fallbacks"]
    assert fallbacks[0] == {
        "scope": "layer1.0", "add": "add",
        "reason": "branch has train-mode BatchNorm2d (layer1.0.bn1): batch statistics are cross-sample",
    }


def test_resnet_batch_mode_skips_whole_blocks():
    model = _seeded(0, lambda: timm.create_model("resnet18", pretrained=False))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback in batch mode
        ref, skip = _pair(model, rate=0.5, mode="batch")
    assert all(isinstance(m, SkipDropPath) for m in inserted_modules(skip).values())
    runs = _count_rows([getattr(skip, f"layer{i}")[j].conv1 for i in (1, 2, 3, 4) for j in (0, 1)])
    before = [getattr(skip, f"layer{i}")[j].bn1.num_batches_tracked.item() for i in (1, 2, 3, 4) for j in (0, 1)]
    _assert_same_step(ref, skip, 0, x)
    after = [getattr(skip, f"layer{i}")[j].bn1.num_batches_tracked.item() for i in (1, 2, 3, 4) for j in (0, 1)]
    assert 0 < len(runs) < 8  # some blocks did not run at all ...
    assert sum(a - b for a, b in zip(after, before)) == len(runs)  # ... nor update their BN stats


def test_second_per_sample_input_falls_back_in_row_mode_only():
    model = CondNet()
    row = plan_stochastic_depth(model, 0.3, skip_dropped=True).meta["drop_path"]["skip_fallbacks"]
    assert len(row) == 2 and "'cond'" in row[0]["reason"] and "per-sample" in row[0]["reason"]
    batch = plan_stochastic_depth(model, 0.3, mode="batch", skip_dropped=True)
    assert batch.meta["drop_path"]["skip_fallbacks"] == []
    x = torch.randn(6, 3, D, generator=torch.Generator().manual_seed(6))
    cond = torch.rand(6, 1, D, generator=torch.Generator().manual_seed(7))
    ref, skip = _pair(_seeded(0, CondNet), rate=0.5, mode="batch")
    for seed in range(3):
        _assert_same_step(ref, skip, seed, x, cond)


def test_intermediate_used_outside_the_branch_falls_back():
    model = nn.Sequential(SharedIntermediate())
    for mode in ("row", "batch"):
        fallbacks = plan_stochastic_depth(model, 0.3, mode=mode, skip_dropped=True).meta["drop_path"]["skip_fallbacks"]
        assert len(fallbacks) == 1 and "also used outside the branch" in fallbacks[0]["reason"]


def test_cross_sample_reduction_inside_a_custom_leaf_falls_back():
    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.fc(h - h.mean(0))  # centres over the batch: cross-sample

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.inner = BatchMean()
            self.fc = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(self.inner(self.norm(x)))

    fallbacks = plan_stochastic_depth(nn.Sequential(Block()), 0.3, skip_dropped=True).meta["drop_path"]["skip_fallbacks"]
    assert len(fallbacks) == 1 and "mean over dim 0" in fallbacks[0]["reason"]


# ----------------------------------------------------------------------------------------------
# edge rates, eval, strip, state_dict, copies
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_rate_zero_is_the_original_train_computation(mode):
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(8))
    original = _seeded(0, ToyViT)
    _, skip = _pair(copy.deepcopy(original), rate=0.0, mode=mode)
    assert torch.equal(skip(x), original(x))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_rate_one_never_runs_a_branch(mode):
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(9))
    ref, skip = _pair(_seeded(0, ToyViT), rate=1.0, mode=mode)
    rows = _count_rows([b.mlp[0] for b in skip.blocks] + [b.norm1 for b in skip.blocks])
    _assert_same_step(ref, skip, 0, x)
    assert rows == []
    # Skipped branches give their parameters exact zero gradients (DDP without find_unused_parameters).
    assert all(p.grad is not None and not p.grad.any() for b in skip.blocks for p in b.parameters())
    direct = skip.head(skip.embed(x).mean(1))  # nothing but the shortcuts
    torch.testing.assert_close(skip(x), direct, rtol=0, atol=0)


def test_functional_edge_cases():
    s = torch.randn(4, 3)
    src = torch.randn(4, 3)
    calls = []

    def branch(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[0])
        return 2 * v

    out = skip_drop_path(s, src, branch, 1.0, mode="row")
    assert torch.equal(out, s) and out is not s and calls == []
    assert torch.equal(skip_drop_path(s, src, branch, 0.0), s + 2 * src)
    assert torch.equal(skip_drop_path(s, src, branch, 0.7, training=False), s + 2 * src)
    with pytest.raises(ValueError, match="mode"):
        skip_drop_path(s, src, branch, 0.5, mode="column")
    with pytest.raises(ValueError, match="p"):
        skip_drop_path(s, src, branch, 1.5)


def test_eval_is_bitwise_the_original_and_never_calls_the_op():
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(10))
    original = _seeded(0, ToyViT).eval()
    ref_out = original(x)
    patched = copy.deepcopy(original)
    apply_stochastic_depth(patched, 0.5, skip_dropped=True)
    calls = []
    for m in inserted_modules(patched).values():
        m.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(patched(x), ref_out)
    assert calls == []


def test_strip_state_dict_and_deepcopy():
    model = _seeded(0, ToyViT)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    apply_stochastic_depth(model, 0.5, skip_dropped=True)
    dp = model.blocks[0].regsurgery.dp1
    assert dp._owner is model.blocks[0] and "_owner" not in dp._modules
    assert list(model.state_dict()) == keys  # nothing registered, owner included
    assert [n for n, _ in model.named_modules() if ".regsurgery" not in n] == names
    clone = copy.deepcopy(model)
    cdp = clone.blocks[0].regsurgery.dp1
    assert cdp._owner is clone.blocks[0] and cdp.forward.__self__ is cdp
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = clone(x)
    assert torch.equal(a, b)
    strip(model)
    assert not is_patched(model) and list(model.state_dict()) == keys
    assert [n for n, _ in model.named_modules()] == names
    assert "forward" not in model.blocks[0].__dict__
    assert torch.equal(model(x), _seeded(0, ToyViT)(x))


def test_plan_round_trip_and_reapply():
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(15))
    model = _seeded(0, ToyViT)
    fresh = copy.deepcopy(model)
    apply_stochastic_depth(model, 0.5, skip_dropped=True)
    plan = Plan.from_json(plan_of(model).to_json())
    assert [op.params.skip for op in plan.ops] == [True] * 4
    apply_plan(fresh, plan)
    before = inserted_modules(fresh)
    apply_plan(fresh, plan)  # merging keeps (and rebinds) the same module objects
    after = inserted_modules(fresh)
    assert all(after[k] is before[k] and isinstance(after[k], SkipDropPath) for k in before)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = fresh(x)
    assert torch.equal(a, b)


def test_schedules_move_the_skip_rate():
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(12))
    original = _seeded(0, ToyViT)
    _, skip = _pair(copy.deepcopy(original), rate=0.9, mode="row")
    for m in inserted_modules(skip).values():
        assert isinstance(m, DropPath)  # what RateSchedule looks for
        m.p = 0.0
    assert torch.equal(skip(x), original(x))


def test_composes_with_dropblock():
    model = _seeded(0, lambda: timm.create_model("resnet18", pretrained=False))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    apply_stochastic_depth(model, 0.5, mode="batch", skip_dropped=True)
    apply_dropblock(model, rate=0.1, block_size=3, example_inputs=x)
    src = model.layer4[1]._regsurgery_patch.source
    assert "self.regsurgery.dp0(regsurgery_db" in src  # DropBlock on the shortcut, then the skip op
    assert "regsurgery.db" in model.layer4[1].regsurgery.dp0.branch_code  # DropBlock in the branch
    model(x).sum().backward()
    strip(model)
    assert not is_patched(model)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def test_torch_compile_train_and_eval():
    x = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(14))
    ref, skip = _pair(_seeded(0, ToyViT), rate=0.5, mode="row")
    torch._dynamo.reset()
    compiled = torch.compile(skip, backend="aot_eager")
    for seed in range(3):
        _assert_same_step(ref, compiled, seed, x)
    compiled.eval()
    ref.eval()
    assert torch.equal(compiled(x), ref(x))
    torch._dynamo.reset()
