"""The authors'-placement ground truth (corpus) that the residual corpus benchmark scores against."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import timm.layers.drop as timm_drop
import torch
import torchvision
from corpus import CORPUS, authors_placement, authors_sites, get_entry, prf, score
from torch import nn
from torch.nn.modules import module as module_hooks


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_timm_resnet18_every_basic_block_once_including_the_rate_zero_first():
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1).eval()
    # the linear-decay rule gives layer1.0 a rate of 0, so timm stores None there
    assert model.layer1[0].drop_path is None
    placement = authors_placement(model, _x())
    expected = Counter({f"layer{i}.{j}": 1 for i in range(1, 5) for j in range(2)})
    assert placement.sites == expected
    assert placement.filled == ["layer1.0.drop_path"]
    assert model.layer1[0].drop_path is None, "the model itself must not be modified"
    # without filling, the rate-0 block is invisible: that is what the filling is for
    unfilled = authors_placement(model, _x(), fill_rate_zero_slots=False).sites
    assert unfilled == expected - Counter({"layer1.0": 1})


def test_drop_path_module_calling_its_functional_form_is_counted_once():
    model = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1).eval()
    placement = authors_placement(model, _x())
    assert placement.functional_calls == 0
    assert set(placement.modules.values()) == {1}


def test_mixer_shared_drop_path_counts_two_calls_per_block():
    model = timm.create_model("mixer_s32_224", pretrained=False, drop_path_rate=0.1, img_size=64).eval()
    placement = authors_placement(model, _x(64))
    depth = len(model.blocks)
    assert placement.sites == Counter({f"blocks.{i}": 2 for i in range(depth)})
    assert placement.modules == Counter({f"blocks.{i}.drop_path": 2 for i in range(depth)})


def test_torchvision_efficientnet_b0_only_blocks_with_a_residual():
    from torchvision.models.efficientnet import MBConv

    model = torchvision.models.efficientnet_b0(weights=None, stochastic_depth_prob=0.2).eval()
    placement = authors_placement(model, _x())
    residual = {n for n, m in model.named_modules() if isinstance(m, MBConv) and m.use_res_connect}
    every = {n for n, m in model.named_modules() if isinstance(m, MBConv)}
    assert len(residual) == 9 and len(every) == 16
    assert placement.sites == Counter({n: 1 for n in residual})
    # torchvision keeps StochasticDepth(p=0) in the first block: nothing to fill
    assert placement.filled == []


class _ParallelBlock(nn.Module):
    """timm ParallelThingsBlock-like: drop path inside nn.Sequential branches, add in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 4), timm.layers.DropPath(0.1)) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(b(x) for b in self.branches)


class _FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + timm_drop.drop_path(self.fc(x), 0.1, self.training)


class _IdentitySlotBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mlp_drop_path = nn.Identity()
        self.other = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(x + self.mlp_drop_path(self.fc(x)))


def test_containers_are_skipped_functional_calls_and_identity_slots_are_seen():
    model = nn.Sequential(_ParallelBlock(), _FunctionalBlock(), _IdentitySlotBlock())
    placement = authors_placement(model, torch.randn(2, 4))
    assert placement.sites == Counter({"0": 2, "1": 1, "2": 1})
    assert placement.functional_calls == 1
    assert placement.filled == ["2.mlp_drop_path"]  # ``other`` is an Identity but not a drop-path slot
    assert timm_drop.drop_path.__name__ == "drop_path", "the functional patch must be undone"


class _NoShortcutBlock(nn.Module):
    """timm byobnet-like: drop path called on a block output that is never added to anything."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = timm.layers.DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.drop_path(self.fc(x))], dim=1)


class _ScaledResidual(nn.Module):
    """The drop-path output goes through a layer scale and a reshape before the add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.drop_path = timm.layers.DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.gamma * self.drop_path(self.fc(x))).reshape(x.shape)


def test_only_calls_whose_output_meets_an_add_are_sites():
    model = nn.Sequential(_NoShortcutBlock(), nn.Linear(8, 4), _ScaledResidual())
    placement = authors_placement(model, torch.randn(2, 4))
    assert placement.sites == Counter({"2": 1})
    assert placement.no_add == Counter({"0": 1})
    assert placement.modules == Counter({"0.drop_path": 1, "2.drop_path": 1})


def test_an_add_after_the_caller_returned_does_not_count():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _NoShortcutBlock()
            self.fc = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + self.fc(x)  # the add is in the parent, not in the caller

    placement = authors_placement(Outer(), torch.randn(2, 4))
    assert placement.sites == Counter()
    assert placement.no_add == Counter({"inner": 1})


def test_root_scope_is_the_empty_string():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop_path = timm.layers.DropPath(0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop_path(self.fc(x))

    assert authors_sites(Root(), torch.randn(1, 4)) == Counter({"": 1})


def test_hooks_are_removed_when_the_forward_raises():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop_path = timm.layers.DropPath(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.drop_path(x)
            raise ValueError("boom")

    before = (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks))
    with pytest.raises(ValueError, match="boom"):
        authors_placement(Broken(), torch.randn(1, 4))
    after = (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks))
    assert after == before


def test_not_a_module_is_rejected_with_its_type():
    with pytest.raises(TypeError, match="nn.Module.*function"):
        authors_placement(lambda x: x, torch.randn(1))


def test_score_is_a_multiset_comparison():
    assert score(Counter(), Counter()) == (0, 0, 0)
    assert prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert score(Counter({"a": 2}), Counter({"a": 1})) == (1, 1, 0)
    assert score(Counter({"a": 1}), Counter({"a": 2, "": 1})) == (1, 0, 2)
    assert score(Counter({"b": 1}), Counter({"a": 1})) == (0, 1, 1)
    assert prf(0, 1, 1) == (0.0, 0.0, 0.0)
    precision, recall, f1 = prf(3, 1, 2)
    assert (precision, recall) == (0.75, 0.6)
    assert f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    # plain dicts work too (the benchmark's JSON rows)
    assert score({"x": 1}, {"x": 1}) == (1, 0, 0)


def test_corpus_is_diverse_and_well_formed():
    keys = [e.key for e in CORPUS]
    assert len(keys) == len(set(keys)) >= 35
    assert len({e.family for e in CORPUS}) >= 9
    assert {e.source for e in CORPUS} == {"timm", "torchvision"}
    for entry in CORPUS:
        assert entry.on != entry.off, entry.key
    assert get_entry("resnet18").key == "timm:resnet18"
    with pytest.raises(KeyError, match="not in the residual corpus"):
        get_entry("no_such_model")
