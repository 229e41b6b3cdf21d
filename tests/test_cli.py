"""The CLI, in-process on the built-in example: the README flow, exit codes, safety of outputs."""

from __future__ import annotations

import io
import json
import os

import onnx
import pytest
import torch
from safetensors.torch import save_file

import regsurgery.io.checkpoint as checkpoint_mod
from regsurgery.cli import main
from regsurgery.io.checkpoint import PATCHED_FORMAT, load
from regsurgery.io.examples_models import TinyResNet
from regsurgery.progress import Progress
from regsurgery.rewrite.apply import inserted_modules, is_patched

RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli",
              "Dropout", "Multinomial"}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("regsurgery: error: "), err
    return lines[0]


def _temps(directory):
    return [p for p in os.listdir(directory) if ".tmp" in p]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A TinyResNet checkpoint with non-default weights (so loading is observable)."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(3)
    model = TinyResNet()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so buffers are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = d / "tiny.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def patched(tmp_path_factory, weights):
    """`regsurgery patch` run once: (out path, stdout)."""
    d = tmp_path_factory.mktemp("patched")
    out = d / "tiny-patched.pt"
    code = main(["patch", "--checkpoint", str(weights[0]), "--drop-path", "0.1", "--drop-block", "0.1",
                 "--block-size", "7", "--stages", "-2,-1", "--out", str(out)])
    assert code == 0
    return out


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- README flow
def test_inspect_table(capsys):
    code, out, err = run(capsys, "inspect")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("regsurgery:example") and "input 1x3x64x64" in lines[0]
    assert "residual sites: 8; planned DropPath 0.1 (linear, row)" in out
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit() and "layer" in line]
    site_rows = [r for r in rows if len(r) == 8]
    assert [r[1] for r in site_rows] == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [float(r[5]) for r in site_rows] == pytest.approx([round(0.1 * i / 7, 3) for i in range(8)])
    assert [r[3] for r in site_rows] == ["identity"] * 2 + ["projection", "identity"] * 3
    assert "conv stages: 4" in out
    assert any(line.split()[:6] == ["4", "4", "8", "128", "8x8", "layer4.0,"] for line in lines)
    assert "'stage' is the number --stages takes" in out


def test_inspect_json_and_plots(capsys, tmp_path):
    png, svg = tmp_path / "plan.png", tmp_path / "plan.svg"
    code, out, err = run(capsys, "inspect", "regsurgery:example", "--format", "json", "--drop-path", "0.2",
                         "--schedule", "uniform", "--drop-block", "0.1", "--plot", str(png))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "regsurgery:example" and doc["input_shape"] == [1, 3, 64, 64]
    assert [s["drop_path"] for s in doc["sites"]] == [0.2] * 8
    assert [s["stage"] for s in doc["sites"]] == [1, 1, 2, 2, 3, 3, 4, 4]
    # DropBlock in the last two stages only: conv1 + conv2 of the branch and the skip = 3 per site
    assert [s["drop_block_ops"] for s in doc["sites"]] == [0, 0, 0, 0, 3, 3, 3, 3]
    assert [(s["index"], s["reduction"], s["channels"], s["size"]) for s in doc["stages"]] == [
        (1, 1, 16, [64, 64]), (2, 2, 32, [32, 32]), (3, 4, 64, [16, 16]), (4, 8, 128, [8, 8])]
    assert doc["plan"]["format"] == "regsurgery.plan/1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run(capsys, "inspect", "--plot", str(svg))
    assert code == 0, err
    assert b"<svg" in svg.read_bytes()[:1000] and f"wrote {svg}" in out
    assert _temps(tmp_path) == []


def test_patch_writes_weights_and_plain_recipe(patched, weights, capsys):
    raw = torch.load(patched, weights_only=True)  # plain data only
    assert raw["format"] == PATCHED_FORMAT
    _assert_same_weights(raw["state_dict"], weights[1])
    recipe = raw["recipe"]
    assert recipe["model"] == "regsurgery:example" and recipe["kwargs"] == {}
    assert recipe["input_shape"] == [1, 3, 64, 64]
    assert set(recipe["versions"]) >= {"torch", "regsurgery"}
    kinds = [op["kind"] for op in recipe["plan"]["ops"]]
    assert kinds.count("drop_path") == 8 and kinds.count("drop_block") == 12


def test_patch_message(tmp_path, capsys):
    code, out, err = run(capsys, "patch", "--drop-path", "0.1", "--out", str(tmp_path / "p.pt"))
    assert code == 0, err
    assert "DropPath on 8 residual sites, rate 0 -> 0.1 (linear)" in out
    assert "regsurgery.load(" in out and err == ""


def test_load_rebuilds_the_patched_model(patched, weights):
    import regsurgery

    model = regsurgery.load(patched)
    assert isinstance(model, TinyResNet) and model.training and is_patched(model)
    mods = inserted_modules(model)
    assert sum(type(m).__name__ == "DropPath" for m in mods.values()) == 8
    assert sum(type(m).__name__.startswith("DropBlock") for m in mods.values()) == 12
    _assert_same_weights(model.state_dict(), weights[1])
    ref = TinyResNet()
    ref.load_state_dict(weights[1])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))


def test_export_all_formats_from_patched_file(patched, tmp_path, capsys):
    files = {k: tmp_path / f"m.{k}" for k in ("onnx", "ts", "pt2")}
    code, out, err = run(capsys, "export", str(patched), "--onnx", str(files["onnx"]),
                         "--torchscript", str(files["ts"]), "--pt2", str(files["pt2"]))
    assert code == 0, err
    assert all(f.stat().st_size > 100_000 for f in files.values())
    assert f"onnx: wrote {files['onnx']}" in out and "random/dropout nodes: none" in out
    diffs = [float(line.split(":")[1]) for line in out.splitlines() if "max abs diff vs torch" in line]
    assert len(diffs) == 3 and max(diffs) < 1e-4
    assert "ops: Conv 20, Relu 17, Add 8" in out
    proto = onnx.load(str(files["onnx"]))
    onnx.checker.check_model(proto)
    assert not {n.op_type for n in proto.graph.node} & RANDOM_OPS
    # Same node count as an export of the untouched model (same weights, no patch).
    plain = tmp_path / "plain.onnx"
    code, out2, err = run(capsys, "export", "--checkpoint", str(patched), "--onnx", str(plain))
    assert code == 0, err
    assert len(onnx.load(str(plain)).graph.node) == len(proto.graph.node) == 48
    assert _temps(tmp_path) == []


def test_patched_safetensors_output_loads(tmp_path, capsys, weights):
    out = tmp_path / "p.safetensors"
    code, _, err = run(capsys, "patch", "--checkpoint", str(weights[0]), "--drop-path", "0.3",
                       "--schedule", "uniform", "--out", str(out))
    assert code == 0, err
    model = load(out)
    assert sorted({round(m.p, 6) for m in inserted_modules(model).values()}) == [0.3]
    _assert_same_weights(model.state_dict(), weights[1])


def test_negative_stages_with_space_and_equals(tmp_path, capsys):
    for form in (["--stages", "-1"], ["--stages=-2,-1"], ["--stages", "-2,-1"], ["--stages", "3,4"]):
        code, out, err = run(capsys, "inspect", "--format", "json", "--drop-block", "0.1", *form)
        assert code == 0, (form, err)
        n = sum(s["drop_block_ops"] > 0 for s in json.loads(out)["sites"])
        assert n == (2 if form[-1] == "-1" else 4), form


def test_model_without_residuals_inspects_but_does_not_patch(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", "torchvision:squeezenet1_1", "--input-shape", "1,3,96,96",
                         "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["sites"] == [] and doc["plan"] is None and len(doc["stages"]) >= 3
    assert "no residual sites found in SqueezeNet" in doc["notes"][0]
    out_path = tmp_path / "sq.pt"
    code, _, err = run(capsys, "patch", "torchvision:squeezenet1_1", "--input-shape", "1,3,96,96",
                       "--drop-path", "0.1", "--out", str(out_path))
    assert code == 1 and "no residual sites found in SqueezeNet" in one_line_error(err)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- checkpoints
def test_ddp_prefix_and_model_ema_nesting(tmp_path, capsys, weights):
    sd = weights[1]
    ema = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in sd.items()}
    ck = tmp_path / "train_state.pt"
    torch.save({"epoch": 7, "model": {f"module.{k}": v for k, v in sd.items()},
                "model_ema": {f"module.{k}": v for k, v in ema.items()}}, ck)
    for key, expected in ((None, sd), ("model_ema", ema)):
        out = tmp_path / f"p-{key}.pt"
        argv = ["patch", "--checkpoint", str(ck), "--drop-path", "0.1", "--out", str(out)]
        code, _, err = run(capsys, *argv, *(["--checkpoint-key", key] if key else []))
        assert code == 0, err
        _assert_same_weights(torch.load(out, weights_only=True)["state_dict"], expected)


def test_safetensors_checkpoint(tmp_path, capsys, weights):
    ck = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in weights[1].items()}, str(ck))
    out = tmp_path / "p.pt"
    code, _, err = run(capsys, "patch", "--checkpoint", str(ck), "--drop-path", "0.1", "--out", str(out))
    assert code == 0, err
    _assert_same_weights(torch.load(out, weights_only=True)["state_dict"], weights[1])


def test_pickled_model_refused_unless_trust_pickle(tmp_path, capsys, weights):
    ck = tmp_path / "whole.pt"
    model = TinyResNet()
    model.load_state_dict(weights[1])
    torch.save(model, ck)
    out = tmp_path / "p.pt"
    code, _, err = run(capsys, "patch", "--checkpoint", str(ck), "--drop-path", "0.1", "--out", str(out))
    assert code == 1
    line = one_line_error(err)
    assert "pickled Python objects" in line and "--trust-pickle" in line and "weights_only" in line
    assert not out.exists()
    code, _, err = run(capsys, "patch", "--checkpoint", str(ck), "--trust-pickle", "--drop-path", "0.1",
                       "--out", str(out))
    assert code == 0, err
    _assert_same_weights(torch.load(out, weights_only=True)["state_dict"], weights[1])


def test_key_mismatch_is_one_line_naming_keys(tmp_path, capsys, weights):
    bad = dict(weights[1])
    bad["classifier.weight"] = bad.pop("fc.weight")
    ck = tmp_path / "renamed.pt"
    torch.save(bad, ck)
    code, _, err = run(capsys, "patch", "--checkpoint", str(ck), "--drop-path", "0.1",
                       "--out", str(tmp_path / "p.pt"))
    assert code == 1
    line = one_line_error(err)
    assert "1 missing key (fc.weight)" in line and "1 unexpected key (classifier.weight)" in line
    code, _, err = run(capsys, "export", "--checkpoint", str(weights[0]), "--kwargs", '{"num_classes": 5}',
                       "--pt2", str(tmp_path / "m.pt2"))
    assert code == 1 and "fc.weight: (10, 128)" in one_line_error(err)
    assert not (tmp_path / "m.pt2").exists()


# --------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("argv, match", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["inspect", "--no-such-flag"], "unrecognized arguments"),
    (["patch", "--drop-path", "1.5", "--out", "x.pt"], "expected a rate in [0, 1], got '1.5'"),
    (["patch", "--drop-path", "nan", "--out", "x.pt"], "expected a rate in [0, 1]"),
    (["patch", "--out", "x.pt"], "nothing to do"),
    (["patch", "--drop-path", "0.1"], "--out"),
    (["export"], "nothing to export"),
    (["inspect", "--input-shape", "1,three"], "expected positive integers"),
    (["inspect", "--stages", "0,1", "--drop-block", "0.1"], "expected stage numbers"),
    (["inspect", "timm:resnet1800"], "did you mean resnet18"),
    (["inspect", "--kwargs", "{num_classes: 3}"], "not valid JSON"),
    (["inspect", "--plot", "plan.gif"], ".png, .svg or .pdf"),
    (["export", "--onnx", "a.onnx", "--pt2", "a.onnx"], "different files"),
    (["export", "missing-file.pt", "--onnx", "a.onnx"], "does not exist"),
])
def test_bad_usage_exits_2_with_one_line(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert match in one_line_error(err)
    assert os.listdir(tmp_path) == []  # nothing written


def test_failures_exit_1_and_debug_shows_traceback(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    argv = ["patch", "--checkpoint", str(bad), "--drop-path", "0.1", "--out", str(tmp_path / "p.pt")]
    code, _, err = run(capsys, *argv)
    assert code == 1
    line = one_line_error(err)
    assert str(bad) in line and "truncated or corrupt" in line
    code, _, err = run(capsys, *argv, "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("regsurgery: error: ")


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "regsurgery", "export"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "regsurgery: error: nothing to export: give --onnx FILE, --torchscript FILE and/or --pt2 FILE"]


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("regsurgery 0.")
    code, out, _ = run(capsys, "patch", "--help")
    assert code == 0 and "--drop-path" in out and "--trust-pickle" in out


# --------------------------------------------------------------------------- output safety
def test_input_is_never_overwritten(tmp_path, capsys, weights, patched):
    ck = tmp_path / "ck.pth"
    ck.write_bytes(weights[0].read_bytes())
    before = ck.read_bytes()
    (tmp_path / "d").mkdir()
    for out in (ck, tmp_path / "d" / ".." / "ck.pth"):
        code, _, err = run(capsys, "patch", "--checkpoint", str(ck), "--drop-path", "0.1", "--out", str(out))
        assert code == 2 and "refusing to overwrite the input" in one_line_error(err)
    assert ck.read_bytes() == before
    before = patched.read_bytes()
    code, _, err = run(capsys, "export", str(patched), "--onnx", str(patched))
    assert code == 2 and "refusing to overwrite the input" in one_line_error(err)
    assert patched.read_bytes() == before


def test_failed_patch_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.pt"

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_mod.torch, "save", broken_save)
    code, _, err = run(capsys, "patch", "--drop-path", "0.1", "--out", str(out))
    assert code == 1 and "No space left on device" in one_line_error(err)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"previous result")
    code, _, _ = run(capsys, "patch", "--drop-path", "0.1", "--out", str(out))
    assert code == 1 and out.read_bytes() == b"previous result" and os.listdir(tmp_path) == ["p.pt"]


def test_failed_export_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    import regsurgery.io.export as export_mod

    monkeypatch.setattr(export_mod, "onnx_random_nodes", lambda proto: ["n0 (Bernoulli)"])
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", "--onnx", str(out))
    assert code == 1 and "random/dropout nodes (n0 (Bernoulli))" in one_line_error(err)
    assert os.listdir(tmp_path) == []


def test_export_is_all_or_nothing(tmp_path, capsys, monkeypatch):
    import regsurgery.io.export as export_mod

    def failing_export(*args, **kwargs):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(export_mod.torch.export, "export", failing_export)
    old = tmp_path / "m.ts"
    old.write_bytes(b"previous")
    code, _, err = run(capsys, "export", "--torchscript", str(old), "--pt2", str(tmp_path / "m.pt2"))
    assert code == 1 and "simulated torch.export failure" in one_line_error(err)
    # the TorchScript export succeeded first, yet nothing of this run is left
    assert sorted(os.listdir(tmp_path)) == ["m.ts"] and old.read_bytes() == b"previous"


# --------------------------------------------------------------------------- progress
class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_silent_off_tty_and_draws_on_tty(monkeypatch):
    monkeypatch.delenv("REGSURGERY_PROGRESS", raising=False)
    quiet = _Stream(tty=False)
    with Progress(total=3, desc="work", stream=quiet, delay=0) as bar:
        for s in ("a", "b", "c"):
            bar.step(s)
    assert quiet.getvalue() == ""
    tty = _Stream(tty=True)
    with Progress(total=3, desc="work", stream=tty, delay=0) as bar:
        for s in ("a", "b", "c"):
            bar.step(s)
    text = tty.getvalue()
    assert "\r" in text and "work [" in text and text.endswith("\n") and "3/3" in text.splitlines()[-1]
    summary = _Stream(tty=False)
    assert list(Progress(range(4), desc="items", stream=summary, summary=True)) == [0, 1, 2, 3]
    assert summary.getvalue().startswith("items [") and "4/4" in summary.getvalue()


def test_progress_delay_env_and_failure(monkeypatch):
    tty = _Stream(tty=True)
    with Progress(total=2, stream=tty, delay=60) as bar:  # quick work draws nothing
        bar.update(2)
    assert tty.getvalue() == ""
    monkeypatch.setenv("REGSURGERY_PROGRESS", "1")
    forced = _Stream(tty=False)
    with pytest.raises(ValueError):
        with Progress(total=2, desc="x", stream=forced, delay=0) as bar:
            bar.update(1)
            raise ValueError("boom")
    # the bar was drawn, then erased (no success line) so the error message stands alone
    assert "x [" in forced.getvalue() and forced.getvalue().endswith("\r")
    monkeypatch.setenv("REGSURGERY_PROGRESS", "0")
    off = _Stream(tty=True)
    with Progress(total=1, stream=off, delay=0) as bar:
        bar.update(1)
    assert off.getvalue() == ""
