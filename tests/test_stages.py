"""Conv stages: feature maps grouped by spatial reduction, checked against timm's feature_info."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from regsurgery.analysis.stages import (
    ConvStage,
    FeatureLayout,
    describe_feature_layout,
    find_conv_stages,
    infer_example_input,
    record_module_shapes,
)


def image(h: int = 64, w: int | None = None, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, h, w or h, generator=g)


def first_maps(layout: FeatureLayout) -> dict:
    out: dict = {}
    for m in layout.maps:
        if m.kind == "map":
            out.setdefault(m.name, m)
    return out


def descendants(model: nn.Module, name: str) -> list[str]:
    return [f"{name}.{n}" for n, _ in model.get_submodule(name).named_modules() if n]


# ----------------------------------------------------------------------------- timm feature_info

FEATURE_INFO_MODELS = [
    ("resnet18", {}),
    ("resnet50", {}),
    ("resnext26ts", {}),
    ("regnetx_002", {}),
    ("efficientnet_b0", {}),
    ("mobilenetv3_small_100", {}),
    ("convnext_atto", {}),
    ("convnext_atto", {"conv_mlp": False}),  # channels-last MLP inside NCHW blocks
    ("nf_resnet26", {}),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}),  # NHWC stages
]


@pytest.mark.parametrize(("name", "kwargs"), FEATURE_INFO_MODELS, ids=lambda v: str(v))
def test_stages_agree_with_timm_feature_info(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, pretrained=False, **kwargs)
    layout = describe_feature_layout(model, image(64), sites=[])
    maps = first_maps(layout)
    by_r = {s.reduction: s for s in layout.stages}
    assert [s.index for s in layout.stages] == list(range(1, len(layout.stages) + 1))
    # Indices follow execution: the first map of stage k+1 comes after the first of stage k.
    first_seen: dict = {}
    for pos, m in enumerate(layout.maps):
        if m.kind == "map":
            first_seen.setdefault(m.reduction, pos)
    assert sorted(first_seen, key=first_seen.get) == [s.reduction for s in layout.stages]
    assert len(layout.stages) == len(model.feature_info)
    for k, info in enumerate(model.feature_info):
        stage_name, r = info["module"], info["reduction"]
        stage = by_r[r]
        # Stage k is timm's feature k (timm lists one feature per reduction on these models).
        assert stage.index == k + 1
        assert stage.size == (64 // r, 64 // r)
        stage_module = model.get_submodule(stage_name)
        blocks = [stage_name] + [f"{stage_name}.{n}" for n, _ in stage_module.named_children()]
        if hasattr(stage_module, "blocks"):
            blocks += [f"{stage_name}.blocks.{n}" for n, _ in stage_module.blocks.named_children()]
        checked = [b for b in blocks if b in maps]
        assert stage_name in checked
        for b in checked:
            assert maps[b].reduction == r, (b, maps[b])
            assert b in stage.scopes
        # Anything inside the stage module at another reduction is computed before the stride
        # of a downsampling block (Bottleneck conv1, inverted-residual expansion).
        for d in descendants(model, stage_name):
            if d in maps and maps[d].reduction != r:
                assert maps[d].interior_of is not None, (d, maps[d])
        if name == "efficientnet_b0" and r == 32:
            # timm's last feature is blocks.6; conv_head (1280) follows at the same reduction.
            assert stage.channels == model.num_features == 1280
        else:
            assert stage.channels == info["num_chs"]
    assert all(m.kind != "tokens" or m.name.startswith("layers.") for m in layout.maps)


def test_layouts_channels_last() -> None:
    cnx = timm.create_model("convnext_atto", pretrained=False, conv_mlp=False)
    layout = describe_feature_layout(cnx, image(64), sites=[])
    assert layout.two_sizes
    assert [s.layout for s in layout.stages] == ["mixed"] * 4
    s1 = layout.stages[0]
    assert "stages.0.blocks.0.norm" in s1.channels_last
    assert "stages.0.blocks.0.mlp.fc1" in s1.channels_last
    assert "stages.0.blocks.0" not in s1.channels_last and "stages.0.blocks.0.conv_dw" in s1.scopes
    assert layout.ambiguous == []
    # conv_mlp=True (the atto default) keeps every map NCHW.
    plain = describe_feature_layout(timm.create_model("convnext_atto", pretrained=False), image(64), sites=[])
    assert [s.layout for s in plain.stages] == ["NCHW"] * 4 and plain.channels_last == []

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2)
    layout = describe_feature_layout(swin, image(64), sites=[])
    assert not layout.two_sizes and "rejects a second input size" in layout.notes[0]
    assert [(s.reduction, s.layout) for s in layout.stages] == [
        (4, "mixed"), (8, "NHWC"), (16, "NHWC"), (32, "NHWC")
    ]
    assert layout.stages[0].scopes[0] == "patch_embed.proj"  # the only NCHW map
    assert [s for s in layout.stages[0].scopes if s not in layout.stages[0].channels_last] == ["patch_embed.proj"]
    assert {"layers.0", "layers.3"} <= {m.name for m in layout.channels_last}
    # Window attention is not guessed into a stage: (windows*B, heads, N, N) or windows*B != B.
    assert not any(".attn." in s for st in layout.stages for s in st.scopes)
    assert layout.tokens


def test_deep_map_produced_early_does_not_reorder_stages() -> None:
    # PVT v2's spatial-reduction attention: a stride-8 conv on the stride-4 stage's map.
    pvt = timm.create_model("pvt_v2_b0", pretrained=False)
    layout = describe_feature_layout(pvt, image(64), sites=[])
    assert [s.reduction for s in layout.stages] == [4, 8, 16, 32]
    assert layout.stages[3].scopes[0] == "stages.0.blocks.0.attn.sr"  # the first r32 map
    for k, info in enumerate(pvt.feature_info):
        assert layout.stages[k].reduction == info["reduction"]
        assert info["module"] in layout.stages[k].scopes
    assert layout.tokens  # its attention runs on token sequences


def test_vit_tokens_are_reported_not_staged() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    assert tuple(infer_example_input(vit).shape) == (1, 3, 64, 64)  # its img_size, not the cfg's 224
    layout = describe_feature_layout(vit)  # inferred input, residual sites found
    assert [(s.reduction, s.scopes) for s in layout.stages] == [(16, ["patch_embed.proj"])]
    assert layout.stages[0].sites == []
    tokens = {m.name: m for m in layout.tokens}
    assert tokens["blocks.0"].shape == (1, 17, 192)
    assert (tokens["blocks.0"].reduction, tokens["blocks.0"].prefix) == (16, 1)  # 4x4 grid + cls
    assert len(layout.sites_outside) == 24  # two residual adds in each of the 12 blocks
    assert {s.scope for s in layout.sites_outside} == {f"blocks.{i}" for i in range(12)}
    assert "token sequences" in layout.summary()


# ----------------------------------------------------------------------------- torchvision, sites


def test_torchvision_resnet18_inferred_input_and_sites() -> None:
    model = torchvision.models.resnet18(weights=None)
    assert tuple(infer_example_input(model).shape) == (1, 3, 224, 224)  # first conv, 224 px
    model.train()
    model.layer1.eval()  # mixed flags must survive
    stages = find_conv_stages(model)
    assert model.training and not model.layer1.training and model.layer2.training
    assert [(s.index, s.reduction, s.channels, s.size) for s in stages] == [
        (1, 2, 64, (112, 112)),
        (2, 4, 64, (56, 56)),
        (3, 8, 128, (28, 28)),
        (4, 16, 256, (14, 14)),
        (5, 32, 512, (7, 7)),  # ResNet's group 4 at 224 px (Ghiasi et al.: 7x7)
    ]
    assert stages[0].scopes == ["conv1", "bn1", "relu"]
    assert stages[1].scopes[0] == "maxpool" and "layer1" in stages[1].scopes
    # BasicBlock strides in conv1; its relu is reused after bn1 and after the add, both at 8.
    assert {"layer2.0.conv1", "layer2.0.relu", "layer2.0", "layer2"} <= set(stages[2].scopes)
    assert [[site.scope for site in s.sites] for s in stages] == [
        [], ["layer1.0", "layer1.1"], ["layer2.0", "layer2.1"], ["layer3.0", "layer3.1"],
        ["layer4.0", "layer4.1"],
    ]
    assert all(s.layout == "NCHW" and s.channels_last == [] for s in stages)


def test_sites_argument_and_bottleneck_interior() -> None:
    from regsurgery.analysis.residual import find_residual_sites

    model = timm.create_model("resnet50", pretrained=False)
    sites = find_residual_sites(model)
    layout = describe_feature_layout(model, image(64), sites=sites)
    assert sum(len(s.sites) for s in layout.stages) == len(sites) == 16
    assert [len(s.sites) for s in layout.stages] == [0, 3, 4, 6, 3]
    maps = first_maps(layout)
    # timm's Bottleneck strides in conv2: conv1 is still at the input's reduction.
    assert (maps["layer2.0.conv1"].reduction, maps["layer2.0.conv1"].interior_of) == (4, "layer2.0")
    assert (maps["layer2.0.conv2"].reduction, maps["layer2.0.conv2"].interior_of) == (8, None)
    assert "layer2.0.conv1" in layout.stages[1].scopes


# ----------------------------------------------------------------------------- shape rules


class FixedSize(nn.Module):
    """Rejects any other input size, as ViT/Swin patch embeddings do."""

    def __init__(self, size: int, body: nn.Module) -> None:
        super().__init__()
        self.size = size
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise AssertionError(f"input size {x.shape[-1]} != {self.size}")
        return self.body(x)


class Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_second_size_resolves_layout_that_one_size_cannot() -> None:
    body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), Permute())  # 32 px -> (1, 8, 8, 8) twice
    two = describe_feature_layout(body, image(32), sites=[])
    assert two.two_sizes and two.ambiguous == []
    maps = first_maps(two)
    assert (maps["0"].layout, maps["1"].layout) == ("NCHW", "NHWC")
    assert two.stages[0].layout == "mixed" and two.stages[0].channels_last == ["1"]

    one = describe_feature_layout(FixedSize(32, body), image(32), sites=[])
    assert not one.two_sizes
    assert {m.name for m in one.ambiguous} == {"body.0", "body.1", "body", ""}  # "" is the root
    assert all(m.layout == "NCHW" and "also fits NHWC" in m.note for m in one.ambiguous)


def test_pooled_maps_are_not_stages() -> None:
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.AdaptiveAvgPool2d(4))
    layout = describe_feature_layout(body, image(32), sites=[])  # conv: 4x4; pool: 4x4 always
    assert [(s.reduction, s.scopes) for s in layout.stages] == [(8, ["0"])]
    assert [m.name for m in layout.fixed] == ["1", ""]
    # With one input size the pooled 4x4 is indistinguishable from a stride-8 map.
    one = describe_feature_layout(FixedSize(32, body), image(32), sites=[])
    assert one.stages[0].scopes == ["body.0", "body.1", "body"]
    forced = describe_feature_layout(body, image(32), sites=[], two_sizes=False)
    assert not forced.two_sizes and forced.stages[0].scopes == ["0", "1"]


def test_deepest_map_at_1x1_is_still_a_stage() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    layout = describe_feature_layout(model, image(32), sites=[])
    last = layout.stages[-1]
    assert (last.reduction, last.size, last.channels) == (32, (1, 1), 512)
    assert "layer4" in last.scopes
    assert "global_pool.pool" in {m.name for m in layout.fixed}


def test_valid_padding_sizes() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2))
    layout = describe_feature_layout(net, image(35), sites=[])  # 33, 16, 7: not 35 / r exactly
    assert [(s.reduction, s.size) for s in layout.stages] == [(1, (33, 33)), (2, (16, 16)), (4, (7, 7))]
    assert any("valid padding" in n for n in layout.notes)


def test_non_square_input_and_batch() -> None:
    model = torchvision.models.resnet18(weights=None)
    stages = find_conv_stages(model, image(64, 96, batch=2), sites=[])
    assert [(s.reduction, s.size) for s in stages] == [
        (2, (32, 48)), (4, (16, 24)), (8, (8, 12)), (16, (4, 6)), (32, (2, 3))
    ]


def test_record_module_shapes() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv(self.relu(x))) + x

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Block()
            self.b = self.a  # one module under two names: recorded under the first
            self.flat = nn.Flatten()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.flat(self.b(self.a(x)))

    calls = record_module_shapes(Twice(), image(8))
    assert [(c.name, c.call_index) for c in calls] == [
        ("a.relu", 0), ("a.conv", 0), ("a.relu", 1), ("a", 0),
        ("a.relu", 2), ("a.conv", 1), ("a.relu", 3), ("a", 1),
        ("flat", 0), ("", 0),
    ]
    root = calls[-1]
    assert (root.parent, root.start) == (None, 0)
    assert calls[3].parent == 0 and calls[0].parent == calls[1].parent == calls[3].start
    assert calls[1].input_shape == calls[1].output_shape == (1, 3, 8, 8)
    assert calls[-2].output_shape == (1, 192) and calls[-2].type_name == "Flatten"


# ----------------------------------------------------------------------------- errors, hygiene


def test_no_conv_and_no_example_input_is_a_clear_error() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"cannot infer an example input for Sequential.*pass example_inputs"):
        find_conv_stages(net)
    with pytest.raises(ValueError, match=r"image input \(N, C, H, W\).*Tensor\(1, 12\)"):
        find_conv_stages(net, torch.randn(1, 12))
    with pytest.raises(TypeError, match="example_inputs must be a Tensor or a tuple"):
        find_conv_stages(net, {"x": torch.randn(1, 12)})


def test_wrong_example_input_is_a_clear_error_and_leaves_the_model_clean() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    model.train()
    model.bn1.eval()
    with pytest.raises(
        ValueError,
        match=r"ResNet failed on example_inputs \(Tensor\(1, 1, 64, 64\)\).*expects e\.g\. a tensor of shape \(1, 3, 224, 224\)",
    ):
        find_conv_stages(model, torch.randn(1, 1, 64, 64))
    assert model.training and not model.bn1.training and model.layer1.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    find_conv_stages(model, image(32), sites=[])
    assert model.training and not model.bn1.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_inference_sources_and_rng() -> None:
    model = timm.create_model("resnext26ts", pretrained=False)
    state = torch.random.get_rng_state()
    x = infer_example_input(model)
    assert tuple(x.shape) == (1, 3, 256, 256)  # pretrained_cfg input_size
    describe_feature_layout(model, image(64))
    assert torch.equal(torch.random.get_rng_state(), state)  # a private generator, eval forwards
    gray = nn.Sequential(nn.Conv2d(1, 4, 3))
    assert tuple(infer_example_input(gray).shape) == (1, 1, 224, 224)
    assert infer_example_input(gray.double()).dtype == torch.float64


def test_to_dict_and_summary() -> None:
    model = timm.create_model("mobilenetv3_small_100", pretrained=False)
    layout = describe_feature_layout(model, image(64))
    data = json.loads(json.dumps(layout.to_dict()))
    assert [s["reduction"] for s in data["stages"]] == [2, 4, 8, 16, 32]
    assert data["stages"][0]["size"] == [32, 32] and data["two_sizes"] is True
    assert all(set(site) == {"index", "scope", "depth", "kind"} for s in data["stages"] for site in s["sites"])
    stage = layout.stages[-1]
    assert isinstance(stage, ConvStage) and stage.to_dict()["scopes"] == stage.scopes
    text = layout.summary()
    assert text.splitlines()[1].startswith("stage 1: reduction 2, 16 ch, 32x32, NCHW")
