"""Residual-site detection on hand-written models, one per tricky case."""

from __future__ import annotations

import pytest
import torch
import toy_models as tm
from torch import nn

from regsurgery import find_residual_sites, residual_report


def sites_of(model: nn.Module):
    return [(s.scope, s.kind) for s in find_residual_sites(model)]


@pytest.mark.parametrize("cls", [tm.BranchLeft, tm.BranchRight])
def test_branch_in_either_operand(cls):
    sites = find_residual_sites(cls())
    assert [(s.scope, s.kind) for s in sites] == [("", "identity")]
    site = sites[0]
    expected_pos = 0 if cls is tm.BranchLeft else 1
    assert site.branch_operand == expected_pos
    assert site.shortcut == "x"
    assert "conv1" in site.branch_nodes and "bn2" in site.branch_nodes


def test_projection_shortcut():
    (site,) = find_residual_sites(tm.ProjectionBlock())
    assert site.kind == "projection"
    assert site.branch_operand == 0
    assert site.shortcut_nodes == ["proj"]


def test_reused_modules_one_site():
    (site,) = find_residual_sites(tm.ReusedModules())
    assert site.kind == "identity"


def test_two_residuals_share_depth():
    sites = find_residual_sites(tm.TwoResiduals())
    assert len(sites) == 2
    assert sites[0].depth == sites[1].depth == 0
    assert [s.index for s in sites] == [0, 1]


def test_nested_residuals():
    scopes = [s for s, _ in sites_of(tm.Nested())]
    assert scopes == ["", "inner.0", "inner.1"]


@pytest.mark.parametrize(
    "cls", [tm.PosEmbed, tm.AttentionBias, tm.ParallelBranches, tm.AttentionTerms, tm.ConvPosEnc, tm.FPNMerge]
)
def test_decoys_are_not_residual(cls):
    assert find_residual_sites(cls()) == []


@pytest.mark.parametrize("cls", [tm.RepMixerLike, tm.CustomNormRepMixer, tm.SplitChunks, tm.KxKShortcut,
                                 tm.ShapeOnlyMerge])
def test_more_decoys_are_not_residual(cls):
    model = cls()
    x = (torch.randn(16, 4, 16), torch.randn(2, 8, 16)) if cls is tm.ShapeOnlyMerge else (torch.randn(2, 8, 8, 8),)
    model(*x)  # the decoy runs
    assert find_residual_sites(model) == []


@pytest.mark.parametrize("cls, kind", [
    (tm.LayerScaledPool, "identity"),  # one weightless layer, no norm: marked by its layer scale
    (tm.LayerScaledLinear, "identity"),
    (tm.ResScaleShortcut, "projection"),  # a learned scale of x on the shortcut
])
def test_layer_scaled_branches_are_residual(cls, kind):
    (site,) = find_residual_sites(cls())
    assert site.kind == kind
    assert site.scope == ""


@pytest.mark.parametrize("cls, n_sites", [
    (tm.ForkedOneLayer, 1),  # parallel paths, each through a layer: no bypass
    (tm.NestedOneLayer, 2),  # a nested residual site is no bypass of the outer branch
    (tm.GatedOneLayer, 1),  # a product is a gate, not a sum around the layer
])
def test_one_layer_branches_without_a_bypass_are_residual(cls, n_sites):
    model = cls()
    model(torch.randn(2, 8, 8, 8))
    sites = find_residual_sites(model)
    assert [(s.scope, s.kind) for s in sites] == [("", "identity")] * n_sites
    assert all(s.branch_weight == 1 for s in sites)


def test_library_conv_norm_act_counts_as_a_conv():
    """timm's ConvNormAct is a no-trace leaf with "Norm" in its name: it is a conv layer, not a
    normalization (two of them make a branch)."""
    from timm.layers import ConvNormAct

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = ConvNormAct(8, 8, 3)
            self.conv2 = ConvNormAct(8, 8, 3, apply_act=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.conv1(x)) + x

    (site,) = find_residual_sites(Block())
    assert site.kind == "identity" and site.branch_weight == 2


def test_untraceable_blocks_are_traced_specialized():
    model = tm.Net()
    report = residual_report(model, torch.randn(2, 3, 16, 16))
    assert report.skipped == []
    scopes = [s.scope for s in report.sites]
    # every residual block, once, in registration order; the RepVGG-style block has no site
    assert scopes == [
        "stage1.0", "stage1.1", "stage1.2", "stage2.0", "stage2.1", "stage2.2", "stage2.2.inner",
        "stage3.0", "stage3.1",
    ]
    policies = {s.scope: s.trace_policy for s in report.sites}
    assert policies["stage2.2"] == "specialized:children"  # data-dependent `if`: specialized
    assert policies["stage2.1"] == "children"
    assert report.sites[5].trace_example == {"args": [{"shape": [2, 16, 8, 8], "dtype": "float32"}],
                                             "kwargs": {}}
    assert [s.depth for s in report.sites] == list(range(9))


class _ShapeSwitch(nn.Module):
    """A residual block whose forward branches on the input size: fx cannot trace it symbolically."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 4:
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return x + self.fc1(x)


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _ShapeSwitch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_untraceable_without_example_is_reported_not_raised():
    report = residual_report(_TokenNet())  # no conv, no cfg: no example input can be inferred
    assert [f.scope for f in report.skipped] == ["block"]
    assert "example_inputs" in report.skipped[0].reason
    assert report.sites == []


def test_specialized_trace_has_run_time_guards():
    from regsurgery import apply_stochastic_depth

    model = _TokenNet()
    (site,) = find_residual_sites(model, torch.randn(2, 6, 8))
    assert site.trace_policy == "specialized:children"
    apply_stochastic_depth(model, rate=0.5, example_inputs=torch.randn(2, 6, 8))
    model.train()
    model(torch.randn(3, 7, 8))  # another batch and length: same branch, fine
    with pytest.raises(RuntimeError, match="Re-apply the surgery with example_inputs"):
        model(torch.randn(3, 2, 8))  # the other branch: refused, never silently wrong
    model.eval()
    model(torch.randn(3, 2, 8))  # eval runs the class forward: no guard needed


def test_detection_does_not_mutate():
    model = tm.Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    find_residual_sites(model)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "forward" not in model.stage1[0].__dict__


def test_training_branch_and_buffer_stay_live():
    (site,) = find_residual_sites(tm.TrainingBranch())
    assert site.kind == "identity"


def test_site_to_dict_is_plain_data():
    import json

    (site,) = find_residual_sites(tm.BranchLeft())
    json.dumps(site.to_dict())
