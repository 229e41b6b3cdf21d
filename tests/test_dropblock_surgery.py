"""apply_dropblock: placement in the last conv stages, clipping, composition with DropPath, strip."""

from __future__ import annotations

import copy

import pytest
import torch
import toy_models as tm

from regsurgery import (
    DropBlock2d,
    DropPath,
    apply_dropblock,
    apply_stochastic_depth,
    find_conv_stages,
    inserted_modules,
    is_patched,
    strip,
)
from regsurgery.api import residual_stages

timm = pytest.importorskip("timm")
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def resnet(name: str = "resnet18"):
    torch.manual_seed(0)
    return tm.randomize_norms(timm.create_model(name, pretrained=False)).eval()


def scopes_of(inserted, cls):
    return sorted({n.split(".regsurgery.")[0] for n, m in inserted.items() if isinstance(m, cls)})


def test_paper_placement_on_resnet18():
    model = resnet()
    ref = model(X)
    apply_dropblock(model, rate=0.1, example_inputs=X)
    inserted = inserted_modules(model)
    # the last two stages (layer3, layer4), every block
    assert scopes_of(inserted, DropBlock2d) == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    src = model.layer4[0]._regsurgery_patch.source
    # after each conv's BN on the branch, and on the (projection) shortcut operand of the add
    assert "self.regsurgery.db0(bn1)" in src and "self.regsurgery.db1(bn2)" in src
    assert "self.regsurgery.db2(downsample)" in src
    assert "self.regsurgery.db2(x)" in model.layer4[1]._regsurgery_patch.source  # identity skip
    # block size clipped to the map: 64 px input -> layer3 4x4, layer4 2x2
    sizes = {n.split(".regsurgery.")[0]: m.block_size for n, m in inserted.items()}
    assert sizes["layer3.1"] == 4 and sizes["layer4.1"] == 2
    assert torch.equal(model(X), ref)  # eval unchanged


def test_where_and_stages_arguments():
    model = resnet()
    apply_dropblock(model, rate=0.2, block_size=3, stages=(2,), where="skip", example_inputs=X)
    inserted = inserted_modules(model)
    stages = find_conv_stages(resnet(), X)
    expected = sorted(s.scope for s in residual_stages(stages)[1].sites)  # the 2nd residual stage
    assert scopes_of(inserted, DropBlock2d) == expected
    assert all(m.p == pytest.approx(0.2) for m in inserted.values())
    assert len(inserted) == len(expected)  # one per skip connection


@pytest.mark.parametrize("order", ["droppath_first", "dropblock_first"])
def test_composes_in_either_order_and_strips(order):
    model = resnet("resnet50")
    twin = copy.deepcopy(model)
    ref = model(X)
    sd = copy.deepcopy(model.state_dict())
    steps = [lambda m: apply_stochastic_depth(m, rate=0.2), lambda m: apply_dropblock(m, 0.1, example_inputs=X)]
    if order == "dropblock_first":
        steps.reverse()
    for step in steps:
        step(model)
    inserted = inserted_modules(model)
    assert sum(isinstance(m, DropPath) for m in inserted.values()) == 16
    assert sum(isinstance(m, DropBlock2d) for m in inserted.values()) == (6 + 3) * 4  # 3 convs + 1 skip per bottleneck
    assert torch.equal(model(X), ref)
    assert list(model.state_dict()) == list(sd)
    model.train()
    model(X).sum().backward()
    strip(model)
    assert not is_patched(model)
    model.train()
    twin.train()
    torch.manual_seed(5)
    a = model(X)
    torch.manual_seed(5)
    assert torch.equal(a, twin(X))


def test_bad_arguments():
    model = resnet()
    for kwargs, match in [
        (dict(rate=1.2), "rate"),
        (dict(block_size=0), "block_size"),
        (dict(stages=(0,)), "stages"),
        (dict(stages=(9,)), "stages"),
        (dict(where=("everywhere",)), "where"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_dropblock(model, example_inputs=X, **kwargs)
    assert not is_patched(model)
