"""Typed plan ops: a dataclass per op kind, the same plain JSON on disk."""

from __future__ import annotations

import json

import pytest
import torchvision

import regsurgery
from regsurgery.plan import (
    PLAN_FORMAT,
    DropBlockParams,
    DropPathParams,
    Plan,
    PlannedOp,
    SetRateParams,
)


def test_each_kind_has_its_own_params_class():
    assert isinstance(PlannedOp(kind="drop_path", scope="a").params, DropPathParams)
    assert isinstance(PlannedOp(kind="drop_block", scope="a").params, DropBlockParams)
    op = PlannedOp(kind="set_rate", scope="", params={"module": "m.drop_path", "p": 0.2})
    assert isinstance(op.params, SetRateParams) and op.params.module == "m.drop_path"
    assert op.key == ("set_rate", "m.drop_path")


def test_unknown_fields_and_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="block_sise"):
        PlannedOp(kind="drop_block", scope="a", params={"p": 0.1, "block_sise": 7})
    with pytest.raises(ValueError, match="drop_connect"):
        PlannedOp(kind="drop_connect", scope="a")
    with pytest.raises(TypeError, match="DropPathParams"):
        PlannedOp(kind="drop_path", scope="a", params=DropBlockParams())
    with pytest.raises(ValueError, match="anchr"):
        PlannedOp.from_dict({"kind": "drop_path", "scope": "a", "anchr": "x"})


def test_plan_json_round_trip_is_plain_data_and_typed_again():
    model = torchvision.models.resnet18(weights=None)
    plan = regsurgery.plan_stochastic_depth(model, rate=0.1)
    text = plan.to_json()
    data = json.loads(text)
    assert data["format"] == PLAN_FORMAT
    assert all(isinstance(op["params"], dict) for op in data["ops"])
    back = Plan.from_json(text)
    assert back.ops == plan.ops
    assert all(isinstance(op.params, DropPathParams) for op in back.ops)


def test_plans_written_before_typed_ops_still_load():
    old = {"format": PLAN_FORMAT, "meta": {}, "ops": [
        {"kind": "set_rate", "scope": "", "anchor": "", "user": None, "role": "branch", "depth": 0,
         "site": 0, "params": {"module": "blocks.0.drop_path", "attr": "drop_prob", "p": 0.1}},
        {"kind": "drop_path", "scope": "layer1.0", "anchor": "relu_1", "user": "add", "role": "branch",
         "depth": 0, "site": 0, "params": {"p": 0.0, "mode": "row", "trace_policy": "children",
                                            "trace_example": None, "skip": False}},
    ]}
    plan = Plan.from_dict(old)
    assert plan.ops[0].params.attr == "drop_prob" and plan.ops[0].params.mode is None
    assert plan.ops[1].params.trace_policy == "children"
    # the mapping view kept for code written against dict params
    assert plan.ops[1].params.get("mode") == "row" and plan.ops[1].params["p"] == 0.0
    assert "skip" in plan.ops[1].params and "nothing" not in plan.ops[1].params
