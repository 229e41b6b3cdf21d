"""Export: strip + ONNX / TorchScript / torch.export, verified; random nodes and failures."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from tolerances import assert_close_reduced, model_reduction
from torch import nn

import regsurgery.io.export as export_mod
from regsurgery.api import plan_dropblock, plan_stochastic_depth
from regsurgery.io.examples_models import TinyResNet
from regsurgery.io.export import (
    RANDOM_ONNX_OPS,
    ExportError,
    export_onnx,
    export_pt2,
    export_torchscript,
    onnx_random_nodes,
    strip_for_export,
)
from regsurgery.rewrite.apply import apply_plan, inserted_modules, is_patched

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pair():
    """(untouched, patched) TinyResNets with identical weights; patched with DropPath + DropBlock."""
    torch.manual_seed(0)
    untouched = TinyResNet()
    patched = TinyResNet()
    patched.load_state_dict(untouched.state_dict())
    plan = plan_stochastic_depth(patched, 0.2) + plan_dropblock(patched, 0.1, example_inputs=X)
    apply_plan(patched, plan)
    assert len(inserted_modules(patched)) == 8 + 12
    return untouched, patched


@pytest.fixture(scope="module")
def onnx_pair(pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    untouched, patched = pair
    return (export_onnx(untouched, X, d / "untouched.onnx"), export_onnx(patched, X, d / "patched.onnx"))


def _no_temp_files(directory):
    return [p for p in os.listdir(directory) if ".tmp" in p]


def test_onnx_patched_export_equals_untouched(pair, onnx_pair):
    untouched, patched = pair
    ref, rep = onnx_pair
    assert rep.exporter == "dynamo" and [n for n in rep.notes if not n.startswith("dynamic batch")] == []
    assert rep.random_nodes == [] and ref.random_nodes == []
    assert rep.node_count == ref.node_count
    assert rep.op_histogram == ref.op_histogram
    assert rep.op_histogram["Conv"] == 20 and rep.op_histogram["Add"] == 8
    # Independent check of the written file: node count, op types, numbers.
    proto = onnx.load(rep.path)
    assert len(proto.graph.node) == rep.node_count
    types = {n.op_type for n in proto.graph.node}
    assert not types & RANDOM_ONNX_OPS
    assert not types & {"RandomUniform", "RandomUniformLike", "Bernoulli", "Dropout"}
    sess = ort.InferenceSession(rep.path, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64)
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = untouched.eval()(x).numpy()
    assert np.abs(out - expected).max() < 1e-4
    assert 0 <= rep.max_abs_diff < 1e-4
    assert rep.opset == next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def test_export_leaves_the_callers_model_patched(pair, onnx_pair):
    _, patched = pair
    assert is_patched(patched) and len(inserted_modules(patched)) == 20
    assert patched.training


def test_strip_for_export_is_a_clean_eval_copy(pair):
    untouched, patched = pair
    clone = strip_for_export(patched)
    assert clone is not patched and not is_patched(clone) and not clone.training
    assert inserted_modules(clone) == {} and is_patched(patched)
    assert list(clone.state_dict()) == list(untouched.state_dict())


def test_onnx_opset_is_honoured(pair, tmp_path):
    rep = export_onnx(pair[0], X, tmp_path / "m.onnx", opset=18)
    assert rep.opset == 18


def _graph_with(op_type):
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    return helper.make_graph([helper.make_node(op_type, ["x"], ["y"], name=f"n_{op_type}")], "g", [inp], [out])


def test_random_node_scan_reaches_subgraphs_and_functions():
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    if_node = helper.make_node("If", ["c"], ["y"], name="branch",
                               then_branch=_graph_with("Bernoulli"), else_branch=_graph_with("Relu"))
    fn = helper.make_function("local", "noisy", ["x"], ["y"],
                              [helper.make_node("RandomUniformLike", ["x"], ["y"], name="r")],
                              [helper.make_opsetid("", 18)])
    model = helper.make_model(helper.make_graph([if_node], "main", [cond], [out]), functions=[fn])
    assert onnx_random_nodes(model) == ["n_Bernoulli (Bernoulli)", "r (RandomUniformLike)"]
    assert onnx_random_nodes(helper.make_model(_graph_with("Relu"))) == []
    # A Dropout is the identity at inference unless it is given a training_mode that may be true.
    assert onnx_random_nodes(helper.make_model(_graph_with("Dropout"))) == []
    t = helper.make_tensor_value_info("t", TensorProto.BOOL, [])
    live = helper.make_graph([helper.make_node("Dropout", ["x", "", "t"], ["y"], name="d")], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), t], [out])
    assert onnx_random_nodes(helper.make_model(live)) == ["d (Dropout)"]


class _Noisy(nn.Module):
    """Draws random numbers even in eval mode: the kind of graph an export must refuse."""

    def forward(self, x):
        return x + 0.0 * torch.rand_like(x)


class _TrainDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=True)


def test_onnx_random_node_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "noisy.onnx"
    with pytest.raises(ExportError, match=r"random/dropout nodes .*RandomUniformLike"):
        export_onnx(_Noisy(), torch.randn(2, 3), path)
    assert not path.exists() and _no_temp_files(tmp_path) == []


def test_onnx_disagreement_is_refused_and_old_file_kept(pair, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    monkeypatch.setattr(export_mod, "_max_abs_diff", lambda *a: (0.5, 2.0))
    with pytest.raises(ExportError, match=r"max abs diff 0.5 > 0.001 x max\(1, \|output\| 2\)"):
        export_onnx(pair[0], X, path)
    assert path.read_bytes() == b"previous" and _no_temp_files(tmp_path) == []


def test_onnx_falls_back_to_legacy_exporter_and_says_so(pair, tmp_path, monkeypatch):
    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    rep = export_onnx(pair[1], X, tmp_path / "legacy.onnx")
    assert rep.exporter == "legacy"
    assert "dynamo exporter failed (RuntimeError: simulated dynamo failure)" in rep.notes[0]
    assert rep.random_nodes == [] and rep.max_abs_diff < 1e-4
    assert rep.op_histogram["Conv"] == 20


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("fn, suffix", [(export_torchscript, ".ts"), (export_pt2, ".pt2")])
def test_torchscript_and_pt2_match_untouched(pair, tmp_path, fn, suffix):
    untouched, patched = pair
    ref = fn(untouched, X, tmp_path / f"u{suffix}")
    rep = fn(patched, X, tmp_path / f"p{suffix}")
    assert rep.random_nodes == [] and rep.max_abs_diff == 0.0
    assert rep.node_count == ref.node_count and rep.op_histogram == ref.op_histogram
    x = torch.randn(1, 3, 64, 64)  # the export shape: torch.export specialises static shapes
    with torch.no_grad():
        expected = untouched.eval()(x)
        if suffix == ".ts":
            loaded = torch.jit.load(rep.path)
            got = loaded(x)
            kinds = {n.kind() for n in loaded.inlined_graph.nodes()}
            assert not any("dropout" in k or "bernoulli" in k or "rand" in k for k in kinds)
        else:
            got = torch.export.load(rep.path).module()(x)
    reduction, depth = model_reduction(untouched, x)  # the exporters may fuse and reorder sums
    assert_close_reduced(got, expected, reduction, depth)


@pytest.mark.parametrize("fn, suffix", [(export_torchscript, ".ts"), (export_pt2, ".pt2")])
def test_torchscript_and_pt2_refuse_random_ops(tmp_path, fn, suffix):
    path = tmp_path / f"d{suffix}"
    with pytest.raises(ExportError, match="dropout|bernoulli|rand"):
        fn(_TrainDropout(), torch.randn(2, 3), path, tolerance=None)
    assert not path.exists() and _no_temp_files(tmp_path) == []
