"""Model specs: timm / torchvision / callable / built-in, errors, default input shapes."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch
from torch import nn

from regsurgery.io.examples_models import TinyResNet
from regsurgery.io.modelspec import (
    DEFAULT_SPEC,
    MissingDependencyError,
    ModelSpecError,
    build_model,
    default_input_shape,
    parse_kwargs,
    parse_spec,
)


def test_builtin_example_is_the_default_and_runs_on_64px():
    model = build_model(DEFAULT_SPEC)
    assert isinstance(model, TinyResNet) and model.training
    assert default_input_shape(model, DEFAULT_SPEC) == (1, 3, 64, 64)
    out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert [type(m).__name__ for m in model.layer4] == ["BasicBlock", "BasicBlock"]
    assert model.layer4[0].conv2.out_channels == 128 and model.layer1[0].conv1.out_channels == 16


def test_builtin_kwargs_are_passed():
    model = build_model("regsurgery:example", {"num_classes": 3, "in_chans": 1})
    assert model.fc.out_features == 3
    assert default_input_shape(model) == (1, 1, 64, 64)


def test_timm_model_without_download():
    model = build_model("timm:resnet18", {"num_classes": 7})
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 7
    # from timm's pretrained_cfg, not a guess
    assert default_input_shape(model, "timm:resnet18") == (1, 3, 224, 224)
    tagged = build_model("timm:resnet18.a1_in1k")
    assert tagged.pretrained_cfg.get("tag") == "a1_in1k"


def test_timm_input_size_from_pretrained_cfg():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.pretrained_cfg = {"input_size": (3, 288, 288)}
    assert default_input_shape(model, "timm:whatever") == (1, 3, 288, 288)


def test_torchvision_model_without_download():
    model = build_model("torchvision:resnet18", {"num_classes": 5})
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 5
    assert default_input_shape(model, "torchvision:resnet18") == (1, 3, 224, 224)


def test_torchvision_crop_size_from_weights_metadata():
    # inception_v3's weights are meant for 299 px; read from the weights enum, nothing downloaded
    small = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert default_input_shape(small, "torchvision:inception_v3") == (1, 3, 299, 299)


def test_callable_spec_and_dotted_attribute():
    model = build_model("regsurgery.io.examples_models:TinyResNet", {"num_classes": 4})
    assert isinstance(model, TinyResNet) and model.fc.out_features == 4
    mod = type(sys)("_rs_spec_dotted")

    class Factory:
        @staticmethod
        def build(n: int = 2) -> nn.Module:
            return nn.Linear(n, n)

    mod.Factory = Factory
    sys.modules["_rs_spec_dotted"] = mod
    try:
        assert build_model("_rs_spec_dotted:Factory.build", {"n": 3}).in_features == 3
        with pytest.raises(ModelSpecError, match="has no attribute 'buld'; did you mean build"):
            build_model("_rs_spec_dotted:Factory.buld")
    finally:
        del sys.modules["_rs_spec_dotted"]


def test_callable_that_returns_a_non_module_is_refused():
    with pytest.raises(ModelSpecError, match="not a torch.nn.Module"):
        build_model("builtins:dict")


def test_module_instance_is_refused():
    sys.modules["_rs_spec_instance"] = type(sys)("_rs_spec_instance")
    sys.modules["_rs_spec_instance"].net = nn.Linear(2, 2)
    try:
        with pytest.raises(ModelSpecError, match="module instance"):
            build_model("_rs_spec_instance:net")
    finally:
        del sys.modules["_rs_spec_instance"]


def test_user_file_in_working_directory(tmp_path, monkeypatch):
    (tmp_path / "rs_user_models_xyz.py").write_text(
        "from torch import nn\n"
        "def build(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = build_model("rs_user_models_xyz:build", {"width": 6})
    assert model[0].out_channels == 6
    sys.modules.pop("rs_user_models_xyz", None)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("resnet18", r"timm:resnet18"),  # bare name: the message proposes both sources
        ("", "empty model spec"),
        ("timm:", "must look like"),
        ("a b:c", "unknown model source"),
        ("timm:resnet1800", r"unknown timm model 'resnet1800'; did you mean resnet18"),
        ("torchvision:resnt18", r"unknown torchvision model 'resnt18'; did you mean resnet18"),
        ("regsurgery:exampel", r"did you mean example"),
        ("regsurgery.io.examples_models:TinyResNett", r"did you mean TinyResNet"),
        ("no_such_module_rs:build", r"cannot import 'no_such_module_rs'"),
        ("timm:hf-hub:timm/resnet18.a1_in1k", "fetch"),
    ],
)
def test_spec_errors_name_the_problem(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        build_model(spec)


def test_bad_kwargs_name_the_keyword():
    with pytest.raises(ModelSpecError, match="unexpected keyword argument 'not_an_arg'"):
        build_model("regsurgery:example", {"not_an_arg": 1})
    with pytest.raises(ModelSpecError, match="download"):
        build_model("timm:resnet18", {"pretrained": True})
    with pytest.raises(ModelSpecError, match="download"):
        build_model("torchvision:resnet18", {"weights": "DEFAULT"})


@pytest.mark.parametrize("text, match", [("{", "not valid JSON"), ("[1, 2]", "JSON object"),
                                         ("3", "JSON object")])
def test_parse_kwargs_errors(text, match):
    with pytest.raises(ModelSpecError, match=match):
        parse_kwargs(text)


def test_parse_kwargs_and_spec():
    assert parse_kwargs(None) == {} and parse_kwargs("  ") == {}
    assert parse_kwargs('{"num_classes": 10, "drop_rate": 0.0}') == {"num_classes": 10, "drop_rate": 0.0}
    assert parse_spec("timm:convnext_tiny") == ("timm", "convnext_tiny")
    assert parse_spec("my.pkg.models:Net.build") == ("my.pkg.models", "Net.build")


def test_missing_package_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ModuleNotFoundError("No module named 'timm'", name="timm")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr("importlib.import_module", lambda name, package=None: fake_import(name))
    with pytest.raises(MissingDependencyError, match=r"pip install regsurgery\[models\]"):
        build_model("timm:resnet18")


def test_default_input_shape_fallbacks():
    assert default_input_shape(nn.Sequential(nn.Conv1d(2, 4, 3))) == (1, 2, 224)
    assert default_input_shape(nn.Sequential(nn.Conv3d(3, 4, 3))) == (1, 3, 16, 112, 112)
    assert default_input_shape(nn.Sequential(nn.Linear(12, 4))) == (1, 12)
    with pytest.raises(ModelSpecError, match="--input-shape"):
        default_input_shape(nn.Sequential(nn.ReLU()))
