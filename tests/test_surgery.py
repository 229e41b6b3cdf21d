"""apply_stochastic_depth / strip on hand-written and real third-party models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import toy_models as tm
from torch import nn

import regsurgery
from regsurgery import (
    DropPath,
    NoSitesError,
    apply_stochastic_depth,
    find_residual_sites,
    inserted_modules,
    is_patched,
    strip,
)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tm.randomize_norms(tm.Net()).eval()


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_patched_model_keeps_identity_and_eval_output():
    model = make_net()
    ref = model(X)
    sd = copy.deepcopy(model.state_dict())
    out = apply_stochastic_depth(model, rate=0.2)
    assert out is model and type(model) is tm.Net
    assert torch.equal(model(X), ref)  # eval: bitwise identical
    assert torch.equal(model.forward_features(X), tm.Net.forward_features(model, X))
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    # strict loading both ways
    model.load_state_dict(sd, strict=True)
    fresh = tm.Net()
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_one_droppath_per_site_with_linear_rates():
    model = make_net()
    sites = find_residual_sites(model)
    apply_stochastic_depth(model, rate=0.35, depth="sites")
    inserted = inserted_modules(model)
    assert len(inserted) == len(sites) == 9  # the data-dependent block is traced specialized
    assert all(isinstance(m, DropPath) for m in inserted.values())
    by_scope = {name.rsplit(".regsurgery.", 1)[0]: m.p for name, m in inserted.items()}
    expected = {s.scope: 0.35 * s.depth / 8 for s in sites}
    assert by_scope == pytest.approx(expected)
    # the alias name shares the patched object
    assert model.alias is model.stage1[0] and "forward" in model.alias.__dict__


def test_train_mode_is_stochastic_and_strip_restores():
    model = make_net()
    apply_stochastic_depth(model, rate=0.5, schedule="uniform")
    model.train()
    torch.manual_seed(0)
    a = model(X)
    b = model(X)
    assert not torch.equal(a, b)
    strip(model)
    assert not is_patched(model)
    assert inserted_modules(model) == {}
    assert all("forward" not in m.__dict__ and "regsurgery" not in m._modules for m in model.modules())


def test_strip_gives_exactly_the_original_computation():
    model = make_net()
    ref_eval = model(X)
    twin = copy.deepcopy(model)
    apply_stochastic_depth(model, rate=0.3)
    strip(model)
    assert torch.equal(model(X), ref_eval)
    model.train()
    twin.train()
    torch.manual_seed(3)
    out = model(X)
    torch.manual_seed(3)
    assert torch.equal(out, twin(X))


def test_rate_zero_train_mode_equals_original_train_mode():
    model = make_net()
    twin = copy.deepcopy(model).train()
    apply_stochastic_depth(model, rate=0.0).train()
    assert torch.equal(model(X), twin(X))


def test_inplace_false_leaves_argument_untouched():
    model = make_net()
    patched = apply_stochastic_depth(model, rate=0.2, inplace=False)
    assert patched is not model and is_patched(patched)
    assert not is_patched(model)


def test_batch_mode_and_filters():
    model = make_net()
    apply_stochastic_depth(model, rate=0.4, mode="batch", include="stage2.*", exclude=["stage2.2*"])
    inserted = inserted_modules(model)
    assert sorted(n.rsplit(".regsurgery.", 1)[0] for n in inserted) == ["stage2.0", "stage2.1"]
    assert all(m.mode == "batch" for m in inserted.values())


def test_callable_schedule():
    model = make_net()
    apply_stochastic_depth(model, rate=0.5, schedule=lambda d, n, r: r if d % 2 else 0.0, depth="sites")
    rates = sorted(m.p for m in inserted_modules(model).values())
    assert rates == [0.0] * 5 + [0.5] * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rate=-0.1), "rate"),
        (dict(rate=1.5), "rate"),
        (dict(rate=float("nan")), "rate"),
        (dict(mode="sample"), "mode"),
        (dict(schedule="cosine"), "schedule"),
        (dict(schedule=lambda d, n, r: 2.0), "schedule"),
        (dict(include="nothing.*"), "include"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = make_net()
    with pytest.raises(ValueError, match=match):
        apply_stochastic_depth(model, **kwargs)
    assert not is_patched(model)


def test_no_residual_sites_is_a_clear_error():
    with pytest.raises(NoSitesError, match="no residual sites"):
        apply_stochastic_depth(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_per_call_site_with_reused_modules():
    model = tm.ReusedModules()
    apply_stochastic_depth(model, rate=0.5)
    assert len(inserted_modules(model)) == 1
    src = model._regsurgery_patch.source
    assert src.count("self.relu(") == 3  # the reused ReLU still called three times


def test_buffers_and_batchnorm_stay_live():
    model = tm.randomize_norms(tm.TrainingBranch()).train()
    apply_stochastic_depth(model, rate=0.0)
    bn = model.body[0][1]
    before = int(bn.num_batches_tracked)
    x = torch.randn(2, 8, 6, 6)
    y0 = model(x)
    assert int(bn.num_batches_tracked) == before + 1
    model.offset.fill_(1.0)  # a buffer, not a frozen constant
    y1 = model(x)
    # y1 - y0 is the buffer's 1.0 up to the rounding of the two outputs' magnitude
    tol = 4 * torch.finfo(y0.dtype).eps * float(y0.detach().abs().max() + 1)
    torch.testing.assert_close(y1 - y0, torch.ones_like(y0), rtol=0, atol=tol)


def test_composes_with_deepcopy_and_double_apply():
    model = make_net()
    apply_stochastic_depth(model, rate=0.2)
    apply_stochastic_depth(model, rate=0.4)  # re-applying replaces, never doubles
    assert len(inserted_modules(model)) == 9
    # the last of the 9 stacked blocks (stage3.2) has no site: the deepest site is block 7 of 0..8
    assert max(m.p for m in inserted_modules(model).values()) == pytest.approx(0.4 * 7 / 8)
    clone = copy.deepcopy(model)
    assert len(inserted_modules(clone)) == 9
    clone.train()
    clone(X).sum().backward()
    strip(clone)
    assert not is_patched(clone) and is_patched(model)


# ----------------------------------------------------------------------------- real models


def test_timm_model_keeps_methods_and_attributes():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    tm.randomize_norms(model)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    apply_stochastic_depth(model, rate=0.1)
    assert model.pretrained_cfg["architecture"] == "resnet18"
    assert torch.equal(model(x), ref)
    assert model.forward_features(x).shape[1] == 512
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert len(inserted_modules(model)) == 8


def test_existing_slots_are_reused_not_doubled():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.05)
    original = {n: m.drop_prob for n, m in model.named_modules() if hasattr(m, "drop_prob")}
    assert len(original) == 22  # timm builds block 0 (rate 0) with Identity, not DropPath
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_stochastic_depth(model, rate=0.3)
    assert any("already has 22 DropPath" in str(w.message) for w in caught)
    assert sorted(inserted_modules(model)) == ["blocks.0.regsurgery.dp0", "blocks.0.regsurgery.dp1"]
    rates = {n: m.drop_prob for n, m in model.named_modules() if hasattr(m, "drop_prob")}
    assert rates["blocks.11.drop_path1"] == pytest.approx(0.3)
    assert rates["blocks.1.drop_path2"] == pytest.approx(0.3 / 11)
    strip(model)
    assert {n: m.drop_prob for n, m in model.named_modules() if hasattr(m, "drop_prob")} == original


def test_torchvision_stochastic_depth_slots():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.efficientnet_b0(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_stochastic_depth(model, rate=0.5, mode="batch")
    slots = [model.get_submodule(s.existing) for s in find_residual_sites(model)]
    assert len(slots) == 9 and inserted_modules(model) == {}
    # depth="blocks": 16 stacked MBConv blocks, the deepest residual one is block 14 of 0..15
    assert max(m.p for m in slots) == pytest.approx(0.5 * 14 / 15)
    assert {m.mode for m in slots} == {"batch"}
    strip(model)
    assert {m.mode for m in slots} == {"row"}


@pytest.mark.parametrize("name", ["mobilevit_xxs", "tiny_vit_5m_224"])
def test_models_that_do_not_trace_as_a_whole(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False).eval()
    with pytest.raises(Exception):  # noqa: B017 - any fx error: the whole model does not trace
        torch.fx.symbolic_trace(model)
    report = regsurgery.residual_report(model)
    assert report.sites, "blocks inside the untraceable model must be found"
    assert {f.scope for f in report.skipped} <= {"head"}  # the classifier head has no residual
    if name.startswith("tiny_vit"):
        # its attention blocks branch on the window size: traced specialized on an example
        assert sum(s.trace_policy.startswith("specialized") for s in report.sites) == 20
    x = torch.randn(1, 3, 64, 64) if name.startswith("mobilevit") else torch.randn(1, 3, 224, 224)
    ref = model(x)
    apply_stochastic_depth(model, rate=0.2)
    assert torch.equal(model(x), ref)
    model.train()
    model(x)


# ----------------------------------------------------------------------------- in-place residual add
def test_add_into_dropped_writes_into_the_fresh_drop_path_output_only():
    from regsurgery.rewrite.apply import add_into_dropped

    branch, shortcut = torch.randn(4, 3), torch.randn(4, 3)
    fresh = branch * 2.0
    expected = fresh + shortcut
    out = add_into_dropped(shortcut, fresh, 1, branch)  # the branch in operand position 1
    assert out is fresh and torch.equal(out, expected)
    # DropPath returned its input (rate 0 / eval): never modify the branch in place.
    kept = branch.clone()
    out = add_into_dropped(branch, shortcut, 0, branch)
    assert out is not branch and torch.equal(branch, kept) and torch.equal(out, kept + shortcut)
    # Promotion or broadcasting: the plain add.
    half = (branch * 2).half()
    out = add_into_dropped(half, shortcut, 0, branch)
    assert out.dtype == torch.float32 and out is not half
    small = branch[:1] * 2
    out = add_into_dropped(small, shortcut, 0, branch)
    assert out.shape == (4, 3) and out is not small


def test_masking_rewrite_adds_in_place_and_matches_a_manual_drop_path():
    """fx records ``x += shortcut`` as an out-of-place add; the rewrite adds into the DropPath
    output instead (no extra feature map), with the same values and gradients."""
    timm = pytest.importorskip("timm")
    block = timm.create_model("resnet18", pretrained=False).layer1[0]
    patched = apply_stochastic_depth(copy.deepcopy(block), rate=0.5, schedule="uniform")
    assert "add_into_dropped" in patched._regsurgery_patch.source
    dp = patched.regsurgery.dp0
    x = torch.randn(8, 64, 8, 8)
    block.train(), patched.train()

    def manual(m, inp):
        s = inp
        y = m.bn2(m.conv2(m.drop_block(m.act1(m.bn1(m.conv1(inp))))))
        return m.act2(regsurgery.drop_path(y, dp.p) + s)

    torch.manual_seed(0)
    xa = x.clone().requires_grad_()
    out_a = patched(xa)
    out_a.square().sum().backward()
    torch.manual_seed(0)
    xb = x.clone().requires_grad_()
    out_b = manual(block, xb)
    out_b.square().sum().backward()
    assert torch.equal(out_a, out_b)
    assert torch.equal(xa.grad, xb.grad)
    for (name, pa), pb in zip(patched.named_parameters(), block.parameters()):
        assert torch.equal(pa.grad, pb.grad), name


def test_depth_blocks_counts_every_stacked_block():
    # depth="blocks" (the default): the 9 blocks of the three stages take a depth each, residual
    # or not (stage3.2 is a RepVGG-style block without a site); a nested residual (stage2.2.inner)
    # shares the depth of the block it is in.
    model = make_net()
    apply_stochastic_depth(model, rate=0.4)
    by_scope = {name.rsplit(".regsurgery.", 1)[0]: m.p for name, m in inserted_modules(model).items()}
    order = ["stage1.0", "stage1.1", "stage1.2", "stage2.0", "stage2.1", "stage2.2", "stage3.0", "stage3.1"]
    expected = {s: 0.4 * i / 8 for i, s in enumerate(order)}
    expected["stage2.2.inner"] = expected["stage2.2"]
    assert by_scope == pytest.approx(expected)
