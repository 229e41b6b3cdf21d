"""Issue 17: residual detection on cases nobody tuned for, depths from the structure, reasons for
every rejection, DropBlock on 3-D maps."""

from __future__ import annotations

import json

import pytest
import torch
import toy_models as tm
from torch import nn

from regsurgery import (
    DropBlock3d,
    DropPath,
    NoSitesError,
    apply_dropblock,
    apply_stochastic_depth,
    find_conv_stages,
    find_residual_sites,
    plan_stochastic_depth,
    residual_report,
    strip,
)


def _rates(model: nn.Module) -> dict[str, float]:
    return {n.rsplit(".regsurgery.", 1)[0]: m.p for n, m in model.named_modules() if isinstance(m, DropPath)}


def test_loop_in_one_forward_gives_increasing_depths():
    model = tm.LoopBlocks()
    sites = find_residual_sites(model)
    assert [s.scope for s in sites] == [""] * 4
    assert [s.depth for s in sites] == [0, 1, 2, 3]
    assert [s.block for s in sites] == [f"blocks.{i}" for i in range(4)]
    for depth in ("blocks", "sites"):
        plan = plan_stochastic_depth(model, rate=0.3, depth=depth)
        assert [op.params["p"] for op in plan.ops] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_two_residuals_of_one_block_still_share_a_depth():
    (a, b) = find_residual_sites(tm.TwoResiduals())
    assert a.depth == b.depth == 0 and a.block == b.block == ""


@pytest.mark.parametrize("subclass", [False, True])
def test_one_conv_branch_with_norm_in_a_sequential_is_a_site(subclass):
    (site,) = find_residual_sites(tm.OneConvBranch(subclass=subclass))
    assert site.kind == "identity" and site.branch_weight == 1


def test_conditional_position_encoding_stays_rejected_with_a_reason():
    report = residual_report(tm.ConvPosEnc())
    assert report.sites == []
    (rej,) = report.rejected
    assert rej.rule == "shallow-branch" and "normalization" in rej.reason and rej.forceable


def test_decoder_merge_with_upsampling_in_a_wrapper_is_not_residual():
    model = tm.UNetAddDecoder()
    report = residual_report(model)
    assert report.sites == []
    assert {r.rule for r in report.rejected} == {"upsample"}
    assert [r.key for r in report.rejected] == [":add", ":add_1"]


def test_strided_kxk_conv_shortcut_is_a_projection():
    (site,) = find_residual_sites(tm.StridedConvShortcut())
    assert site.kind == "projection" and site.shortcut == "shortcut"


def test_kxk_conv_next_to_an_attention_branch_is_rejected_with_a_reason():
    (rej,) = residual_report(tm.KxKShortcut()).rejected
    assert rej.rule == "shortcut" and "attention" in rej.reason


def test_context_generator_beside_the_stream_is_rejected():
    report = residual_report(tm.ContextGenerator())
    assert [s.scope for s in report.sites] == ["blocks.0", "blocks.1"]
    assert [s.depth for s in report.sites] == [0, 1]
    (rej,) = [r for r in report.rejected if r.rule == "beside-stream"]
    assert rej.scope == "ctx" and rej.forceable


def test_rejected_adds_are_reported_and_no_sites_error_shows_them():
    model = tm.ConvPosEnc()
    with pytest.raises(NoSitesError) as err:
        apply_stochastic_depth(model)
    msg = str(err.value)
    assert ":add [shallow-branch]" in msg and "include=':add'" in msg


def test_include_forces_a_rejected_add_and_the_report_says_so():
    model = tm.ConvPosEnc()
    report = residual_report(model, force=":add")
    (site,) = report.sites
    assert site.forced and report.rejected == []
    x = torch.randn(2, 8, 8, 8)
    y = model(x)
    plan = plan_stochastic_depth(model, rate=0.2, include=":add")
    assert plan.meta["drop_path"]["forced"] == [":add"]
    apply_stochastic_depth(model, rate=0.2, include=":add")
    assert len(_rates(model)) == 1
    assert torch.equal(model.eval()(x), y)
    strip(model)


def test_forcing_an_add_that_cannot_be_a_site_is_an_error():
    with pytest.raises(ValueError, match="name no rejected add"):
        residual_report(tm.BranchLeft(), force="nope:add")


def test_depth_blocks_counts_non_residual_stacked_blocks():
    model = tm.MBStack()  # features.0 .. features.5; residual: 0, 2, 3, 5
    blocks = plan_stochastic_depth(model, rate=0.5, depth="blocks")
    assert [op.depth for op in blocks.ops] == [0, 2, 3, 5]
    assert [op.params["p"] for op in blocks.ops] == pytest.approx([0.0, 0.2, 0.3, 0.5])
    sites = plan_stochastic_depth(model, rate=0.5, depth="sites")
    assert [op.params["p"] for op in sites.ops] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    with pytest.raises(ValueError, match="depth must be one of"):
        plan_stochastic_depth(model, depth="layers")


def test_torchvision_efficientnet_blocks_are_counted_like_the_authors():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.efficientnet_b0(weights=None)
    plan = plan_stochastic_depth(model, rate=0.1)
    # 16 MBConv blocks; the residual ones are blocks 2 .. 14 (torchvision's stage_block_id)
    assert plan.meta["drop_path"]["num_depths"] == 16
    depths = [op.depth for op in plan.ops]
    assert depths[0] == 2 and depths[-1] == 14
    assert plan.ops[0].params["p"] == pytest.approx(0.1 * 2 / 15)  # authors: 0.1 * 2 / 16


def test_conv_stages_and_dropblock3d_on_volumes():
    model = tm.Net3d().eval()
    x = torch.randn(2, 1, 8, 16, 16)
    stages = find_conv_stages(model, x)
    assert [s.reductions for s in stages] == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert all(s.dims == 3 for s in stages)
    assert [[site.scope for site in s.sites] for s in stages][1:] == [["layer2.0", "layer2.1"],
                                                                     ["layer3.0", "layer3.1"]]
    y = model(x)
    apply_dropblock(model, rate=0.2, block_size=3, example_inputs=x)
    inserted = [m for m in model.modules() if isinstance(m, DropBlock3d)]
    assert {m.block_size for m in inserted} == {3, 2}  # clipped to the (2, 4, 4) maps of stage 3
    assert torch.equal(model(x), y)
    model.train()
    model(x).sum().backward()
    strip(model)
    assert not any(isinstance(m, DropBlock3d) for m in model.modules())


def test_one_d_maps_are_refused_clearly():
    with pytest.raises(ValueError, match=r"1-D map \(N, C, L\)"):
        apply_dropblock(tm.Net1d(), example_inputs=torch.randn(2, 1, 64))


def test_cli_inspect_verbose_lists_rejected_adds_and_forces_one(capsys):
    from regsurgery.cli import main

    assert main(["inspect", "toy_models:ConvPosEnc", "--input-shape", "1,8,8,8", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "rejected adds: 1" in out and ":add" in out and "shallow-branch" in out
    assert main(["inspect", "toy_models:ConvPosEnc", "--input-shape", "1,8,8,8", "--include", ":add",
                 "--format", "json", "--verbose"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["sites"]) == 1 and doc["rejected"] == []
    assert doc["plan"]["meta"]["drop_path"]["forced"] == [":add"]


def test_cli_patch_depth_option(tmp_path, capsys):
    from regsurgery.cli import main
    from regsurgery.io.checkpoint import read_patched

    out = tmp_path / "p.pt"
    assert main(["patch", "toy_models:MBStack", "--input-shape", "1,3,32,32", "--drop-path", "0.5",
                 "--depth", "sites", "--out", str(out)]) == 0
    _, recipe = read_patched(str(out))
    assert recipe["plan"]["meta"]["drop_path"]["depth"] == "sites"
    assert [op["params"]["p"] for op in recipe["plan"]["ops"]] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
