"""RateSchedule: ramps of inserted DropBlock / DropPath rates during training."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from torch import nn

from regsurgery.ops import DropBlock2d, DropPath
from regsurgery.schedule import RateSchedule


class Net(nn.Module):
    """A conv, a DropBlock2d on its map and two DropPath modules at different depths."""

    def __init__(self, p_block: float = 0.2, p_path: tuple[float, float] = (0.05, 0.1)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.ModuleDict({"db": DropBlock2d(p_block, block_size=3)})
        self.paths = nn.ModuleList([DropPath(p) for p in p_path])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block["db"](self.conv(x))
        for dp in self.paths:
            y = y + dp(y)
        return self.head(y.mean((2, 3)))


TARGETS = {"block.db": 0.2, "paths.0": 0.05, "paths.1": 0.1}


def test_targets_and_step_zero() -> None:
    net = Net()
    sched = RateSchedule(net, total_steps=10)
    assert sched.targets == TARGETS
    assert sched.kinds_by_name == {"block.db": "drop_block", "paths.0": "drop_path", "paths.1": "drop_path"}
    # Construction sets step 0: the paper starts with keep_prob 1 (rate 0).
    assert sched.current_rates() == {name: 0.0 for name in TARGETS}
    assert net.block["db"].p == 0.0 and isinstance(net.block["db"].p, float)


def test_linear_ramp_values() -> None:
    net = Net()
    sched = RateSchedule(net, total_steps=10)
    seen = {0: sched.current_rates()}
    for t in range(1, 16):
        sched.step()
        seen[t] = sched.current_rates()
    assert sched.step_count == 15
    for t, rates in seen.items():
        for name, target in TARGETS.items():
            assert rates[name] == pytest.approx(target * min(t, 10) / 10, abs=1e-15), (t, name)
    assert seen[5] == pytest.approx({"block.db": 0.1, "paths.0": 0.025, "paths.1": 0.05})
    assert seen[10] == pytest.approx(TARGETS) and seen[15] == pytest.approx(TARGETS)
    # The modules hold the rates: what forward uses.
    assert net.paths[1].p == pytest.approx(0.1)


def test_warmup_start_and_builtin_ramps() -> None:
    sched = RateSchedule(Net(), total_steps=12, warmup_steps=4, start=0.25)
    # Held at start * target during warmup, then a linear ramp over the remaining 8 steps.
    assert [sched.factor(t) for t in (0, 3, 4, 8, 12, 20)] == pytest.approx(
        [0.25, 0.25, 0.25, 0.25 + 0.75 * 0.5, 1.0, 1.0]
    )
    cos = RateSchedule(Net(), total_steps=4, fn="cosine")
    assert [cos.factor(t) for t in range(5)] == pytest.approx(
        [0.5 * (1 - math.cos(math.pi * t / 4)) for t in range(5)]
    )
    const = RateSchedule(Net(), total_steps=4, fn="constant")
    assert const.current_rates() == pytest.approx(TARGETS)
    assert const.rates_at(2) == pytest.approx(TARGETS)


def test_callable_fn_and_its_validation() -> None:
    def square(x: float) -> float:
        return x * x

    sched = RateSchedule(Net(), total_steps=10, fn=square)
    sched.set_step(5)
    assert sched.current_rates()["block.db"] == pytest.approx(0.2 * 0.25)

    def too_big(x: float) -> float:
        return 2 * x

    bad = RateSchedule(Net(), total_steps=10, fn=too_big)  # 0 at step 0 is fine
    with pytest.raises(ValueError, match=r"too_big returned 1\.2 .*\[0, 1\]"):
        bad.set_step(6)
    with pytest.raises(ValueError, match="nan"):
        RateSchedule(Net(), total_steps=10, fn=lambda x: float("nan"))


def test_kinds_filter() -> None:
    net = Net()
    sched = RateSchedule(net, total_steps=10, kinds=("drop_block",))
    assert list(sched.targets) == ["block.db"]
    assert net.paths[0].p == 0.05  # untouched
    only_paths = RateSchedule(Net(), total_steps=10, kinds="drop_path")
    assert sorted(only_paths.targets) == ["paths.0", "paths.1"]


def test_bound_to_optimizer_steps() -> None:
    torch.manual_seed(0)
    net = Net()
    sched = RateSchedule(net, total_steps=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    binding = sched.bind(opt)
    net.train()
    x = torch.randn(2, 3, 8, 8)
    for t in range(1, 4):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
        assert sched.step_count == t
        assert sched.current_rates() == pytest.approx({n: p * t / 8 for n, p in TARGETS.items()})
    with pytest.raises(ValueError, match="already bound"):
        sched.bind(opt)
    binding.remove()
    opt.step()
    assert sched.step_count == 3
    with sched.bind(opt):  # a fresh binding after remove(), removed on exit
        opt.step()
    opt.step()
    assert sched.step_count == 4
    with pytest.raises(TypeError, match="Optimizer"):
        sched.bind(object())


def test_state_dict_round_trip_continues_identically() -> None:
    net_a = Net()
    a = RateSchedule(net_a, total_steps=20, warmup_steps=2, fn="cosine", start=0.1)
    for _ in range(7):
        a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain data only
    json.dumps(state)

    # A resumed run: a fresh model (rates at their planned targets) and a default schedule.
    net_b = Net()
    b = RateSchedule(net_b, total_steps=5)
    b.load_state_dict(state)
    assert b.step_count == 7 and b.total_steps == 20 and b.fn == "cosine"
    assert b.current_rates() == a.current_rates()
    for _ in range(16):
        a.step()
        b.step()
        assert b.current_rates() == a.current_rates()
    assert b.current_rates() == pytest.approx(TARGETS)


def test_state_dict_keeps_targets_when_modules_hold_ramped_rates() -> None:
    # A model rebuilt from a checkpoint that recorded mid-ramp rates as its plan: the saved
    # targets, not the modules' current values, are what the resumed ramp heads for.
    a = RateSchedule(Net(), total_steps=10)
    for _ in range(3):
        a.step()
    ramped = Net(p_block=0.06, p_path=(0.015, 0.03))
    b = RateSchedule(ramped, total_steps=10)
    b.load_state_dict(a.state_dict())
    assert b.targets == TARGETS
    b.set_step(10)
    assert b.current_rates() == pytest.approx(TARGETS)


def test_load_state_dict_errors() -> None:
    a = RateSchedule(Net(), total_steps=10)
    other = nn.Sequential(nn.Conv2d(3, 3, 1), DropBlock2d(0.1))
    b = RateSchedule(other, total_steps=10)
    with pytest.raises(ValueError, match=r"saved but not here \['block.db', 'paths.0', 'paths.1'\].*here but not saved \['1'\]"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a RateSchedule state"):
        b.load_state_dict({"step": 3})
    callable_state = RateSchedule(Net(), total_steps=10, fn=lambda x: x).state_dict()
    c = RateSchedule(Net(), total_steps=10)
    with pytest.raises(ValueError, match="callable fn"):
        c.load_state_dict(callable_state)
    bad = dict(a.state_dict(), start=2.0)
    c.set_step(4)
    with pytest.raises(ValueError, match="start"):
        c.load_state_dict(bad)
    assert c.step_count == 4 and c.fn == "linear"  # a rejected state changes nothing


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        RateSchedule(Net(), total_steps=0)
    with pytest.raises(ValueError, match="total_steps"):
        RateSchedule(Net(), total_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_steps"):
        RateSchedule(Net(), total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="fn must be one of"):
        RateSchedule(Net(), total_steps=10, fn="exponential")
    with pytest.raises(ValueError, match="start"):
        RateSchedule(Net(), total_steps=10, start=-0.1)
    with pytest.raises(ValueError, match="kinds"):
        RateSchedule(Net(), total_steps=10, kinds=("attention",))
    with pytest.raises(ValueError, match="found no drop_block / drop_path / dropout modules in Sequential"):
        RateSchedule(nn.Sequential(nn.Conv2d(3, 3, 1)), total_steps=10)
    with pytest.raises(TypeError, match="model_or_modules"):
        RateSchedule(3, total_steps=10)  # type: ignore[arg-type]


def test_modules_mapping_and_list() -> None:
    db, dp = DropBlock2d(0.3), DropPath(0.1)
    s = RateSchedule({"a": db, "b": dp}, total_steps=2)
    s.step()
    assert s.current_rates() == pytest.approx({"a": 0.15, "b": 0.05})
    s2 = RateSchedule([db, ("named", dp)], total_steps=2)
    assert sorted(s2.targets) == ["0", "named"]
    assert s2.targets["0"] == pytest.approx(0.15)  # the current rate becomes the target


def test_existing_third_party_slots() -> None:
    from timm.layers import DropPath as TimmDropPath
    from torchvision.ops import StochasticDepth

    m = nn.Sequential(TimmDropPath(0.2), StochasticDepth(0.4, mode="row"), DropPath(0.1))
    s = RateSchedule(m, total_steps=4)
    assert s.targets == pytest.approx({"0": 0.2, "1": 0.4, "2": 0.1})
    s.set_step(2)
    assert (m[0].drop_prob, m[1].p, m[2].p) == pytest.approx((0.1, 0.2, 0.05))
    only_ours = RateSchedule(m, total_steps=4, include_existing=False)
    assert list(only_ours.targets) == ["2"]


def test_schedule_on_a_patched_model() -> None:
    from regsurgery.api import apply_dropblock
    from regsurgery.io.examples_models import tiny_resnet

    model = tiny_resnet()
    apply_dropblock(model, rate=0.1, block_size=3, example_inputs=torch.randn(1, 3, 64, 64))
    sched = RateSchedule(model, total_steps=100)
    names = list(sched.targets)
    assert names and all(".regsurgery." in n for n in names)
    assert set(sched.targets.values()) == {0.1}
    sched.set_step(50)
    assert list(sched.current_rates().values()) == pytest.approx([0.05] * len(names))
    model.train()
    model(torch.randn(2, 3, 64, 64))  # the patched forward runs with the scheduled rates
