"""Dropout on hidden MLP activations (Srivastava et al., 2014): op, analysis, plan, rewrite, strip."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
from torch import nn

import regsurgery
from regsurgery import NoSitesError, Plan, RateSchedule, apply_dropout, plan_dropout, strip
from regsurgery.analysis.mlp import find_mlp_sites
from regsurgery.io.export import export_onnx, strip_for_export
from regsurgery.ops import Dropout, dropout
from regsurgery.rewrite.apply import apply_plan, inserted_modules, plan_of

SEED = 0


def binomial_tol(n: int, p: float, sigmas: float = 5.0) -> float:
    """Tolerance on a realized fraction of ``n`` Bernoulli(p) draws: ``sigmas`` standard errors."""
    return sigmas * math.sqrt(p * (1.0 - p) / n)


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2, num_classes=3)


def mlp_classifier() -> nn.Module:
    # Input 12 -> hidden 64 (ReLU) -> hidden 64 (GELU) -> logits 3: two hidden layers, no slots.
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 3))


class ConvMlp(nn.Module):
    """A 1x1-conv MLP (channels mixed per position) next to a 3x3 conv -> act -> 3x3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial1 = nn.Conv2d(4, 8, 3, padding=1)
        self.spatial2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc1 = nn.Conv2d(4, 16, 1)
        self.fc2 = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial2(torch.relu(self.spatial1(x)))
        return self.fc2(torch.nn.functional.gelu(self.fc1(y)))


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_realized_rate_within_binomial_bounds(p: float) -> None:
    x = torch.rand(256, 512) + 0.5  # no zeros of its own
    out = dropout(x, p, generator=torch.Generator().manual_seed(SEED))
    n = x.numel()
    frac = (out == 0).double().mean().item()
    assert abs(frac - p) <= binomial_tol(n, p)
    kept = out != 0
    # Survivors are x / (1 - p): one float32 multiply by the rounded 1/(1-p), so 2 ulp.
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=2 * torch.finfo(torch.float32).eps, atol=0)


def test_edges_identity_and_zeros() -> None:
    x = torch.randn(8, 8)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.7, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    m = Dropout(0.5).eval()
    assert m(x) is x
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(dropout(x, 0.4, generator=g1), dropout(x, 0.4, generator=g2))
    with pytest.raises(ValueError, match="p must be"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="floating"):
        dropout(torch.ones(3, dtype=torch.long), 0.1)


def test_gradient_only_through_kept_elements() -> None:
    x = torch.randn(64, 64, requires_grad=True)
    out = dropout(x, 0.5, generator=torch.Generator().manual_seed(1))
    out.sum().backward()
    mask = (out != 0).float()
    torch.testing.assert_close(x.grad, mask * 2.0)


# ----------------------------------------------------------------------------- analysis


def test_finds_hidden_layers_not_input_not_logits() -> None:
    model = mlp_classifier()
    plan = plan_dropout(model, 0.3)
    assert [(op.kind, op.anchor, op.role) for op in plan.ops] == [("dropout", "_2", "hidden"),
                                                                  ("dropout", "_4", "hidden")]
    seen = []
    apply_dropout(model, 0.3)
    for name, m in inserted_modules(model).items():
        m.register_forward_hook(lambda mod, a, out, name=name: seen.append((name, tuple(a[0].shape))))
    model.train()(torch.randn(5, 3, 2, 2))
    assert sorted(s for _, s in seen) == [(5, 64), (5, 64)]  # hidden widths; input 12, logits 3


def test_one_by_one_convs_are_dense_and_spatial_convs_are_not() -> None:
    sites = find_mlp_sites(ConvMlp())
    assert [(s.dense_in, s.dense_out) for s in sites] == [("fc1", "fc2")]
    only_spatial = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 3))
    with pytest.raises(NoSitesError, match="no place for dropout"):
        plan_dropout(only_spatial)


def test_linear_chain_without_activation_is_no_site() -> None:
    # Linear -> Identity-like scale -> Linear: no non-linearity, nothing to drop.
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * x

    with pytest.raises(NoSitesError):
        plan_dropout(nn.Sequential(nn.Linear(4, 4), Scale(), nn.Linear(4, 4)))


def test_head_is_classifier_input_and_not_doubled() -> None:
    plan = plan_dropout(mlp_classifier(), 0.2, where=("head",))
    assert [(op.anchor, op.user, op.role) for op in plan.ops] == [("_4", "_5", "head")]
    both = plan_dropout(mlp_classifier(), 0.2, where=("mlp", "head"))
    assert len(both.ops) == 2  # the head's input is the last hidden activation: one dropout
    with pytest.raises(ValueError, match="where must be"):
        plan_dropout(mlp_classifier(), where=("logits",))


# ----------------------------------------------------------------------------- slots, rewrite, strip


def test_timm_slots_reused_and_restored() -> None:
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    keys = list(model.state_dict())
    model.eval()
    ref = model(x)
    with pytest.warns(UserWarning, match="rates were set"):
        apply_dropout(model, 0.25, where=("mlp", "head"))
    plan = plan_of(model)
    assert sorted(op.params["module"] for op in plan.ops) == ["blocks.0.mlp.drop1", "blocks.1.mlp.drop1",
                                                              "head_drop"]
    assert not inserted_modules(model)  # nothing doubled
    assert model.blocks[0].mlp.drop1.p == 0.25 and model.head_drop.p == 0.25
    assert torch.equal(model(x), ref)
    strip(model)
    assert model.blocks[0].mlp.drop1.p == 0.0 and model.head_drop.p == 0.0
    assert list(model.state_dict()) == keys and not regsurgery.is_patched(model)


def test_inserted_dropout_realized_rate_eval_bitwise_and_strip() -> None:
    torch.manual_seed(SEED)
    model = mlp_classifier()
    original = copy.deepcopy(model)
    x = torch.randn(400, 3, 2, 2)
    apply_dropout(model, 0.4)
    model.eval()
    assert torch.equal(model(x), original.eval()(x))
    outs = []
    for m in inserted_modules(model).values():
        m.register_forward_hook(lambda mod, a, out: outs.append((a[0], out)))
    model.train()
    model(x)
    for a, out in outs:
        live = a != 0  # ReLU zeros are not drops
        n = int(live.sum())
        frac = ((out == 0) & live).sum().item() / n
        assert abs(frac - 0.4) <= binomial_tol(n, 0.4)
    assert torch.equal(strip(model).eval()(x), original(x))
    assert type(model) is nn.Sequential and len(model) == 6


def test_plan_json_roundtrip_schedule_and_compose_with_drop_path() -> None:
    model = tiny_vit()
    plan = plan_dropout(model, 0.3, where="mlp") + regsurgery.plan_stochastic_depth(model, 0.1)
    plan = Plan.from_json(plan.to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, plan)
    net = mlp_classifier()
    apply_dropout(net, 0.5)
    sched = RateSchedule(net, total_steps=4)
    assert set(sched.kinds_by_name.values()) == {"dropout"}
    assert all(m.p == 0.0 for m in inserted_modules(net).values())
    sched.set_step(2)
    assert all(m.p == pytest.approx(0.25) for m in inserted_modules(net).values())
    model.train()(torch.randn(2, 3, 16, 16)).sum().backward()


def test_onnx_export_of_patched_model_has_no_dropout(tmp_path) -> None:
    model = ConvMlp()
    apply_dropout(model, 0.5)
    x = torch.randn(1, 4, 6, 6)
    report = export_onnx(model, x, tmp_path / "m.onnx")
    assert report is not None and (tmp_path / "m.onnx").exists()
    assert not regsurgery.is_patched(strip_for_export(model))
    assert regsurgery.is_patched(model)  # export strips a copy
