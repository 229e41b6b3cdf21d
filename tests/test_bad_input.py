"""The bad-input matrix: every refused input of the API and the CLI, with its error.

Each case checks three things: the error type (API: the exception class; CLI: the exit code and
a one-line ``regsurgery: error: ...``), that the message names the bad thing, and that nothing
was written or changed: the model is not patched and keeps its weights (API), and the working
directory, inputs included, holds the same files with the same bytes (CLI).
``docs/refused.md`` lists the same cases for users.
"""

from __future__ import annotations

import copy
import errno
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import toy_models as tm
from torch import nn

import regsurgery
import regsurgery.io.checkpoint as checkpoint_mod
from regsurgery import (
    DropBlock2d,
    DropPath,
    NoSitesError,
    apply_dropblock,
    apply_plan,
    apply_stochastic_depth,
    drop_block2d,
    drop_path,
    find_conv_stages,
    is_patched,
    plan_stochastic_depth,
)
from regsurgery.cli import main
from regsurgery.io.checkpoint import save_patched
from regsurgery.io.examples_models import TinyResNet
from regsurgery.rewrite.apply import PlanMismatchError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def plain_cnn() -> nn.Module:
    """Two conv stages (strides 1 and 2), no residual add. Also a CLI model spec."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet(widths=(8, 8, 16, 16), depths=(1, 1, 1, 1))


# ----------------------------------------------------------------------------- helpers
class Untouched:
    """Remembers a model's weights and asserts nothing was patched or changed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = copy.deepcopy(model.state_dict())
        self.children = [name for name, _ in model.named_modules()]

    def check(self) -> None:
        m = self.model
        assert not is_patched(m)
        assert [name for name, _ in m.named_modules()] == self.children
        assert not any("forward" in mod.__dict__ for mod in m.modules())
        sd = m.state_dict()
        assert list(sd) == list(self.state)
        assert all(torch.equal(sd[k], v) for k, v in self.state.items())


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: file bytes, symlink targets, directories."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes())
    return out


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, the single error line)."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def assert_refused(capsys, workdir: Path, argv: list, codes: tuple[int, ...], *needles: str) -> str:
    """The command fails with one of ``codes``, one error line holding every needle, and
    leaves ``workdir`` exactly as it was."""
    before = snapshot(workdir)
    code, line = cli(capsys, argv)
    assert code in codes, (code, line)
    assert line.startswith("regsurgery: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    assert snapshot(workdir) == before, "files were written or changed"
    return line


# ----------------------------------------------------------------------------- API: rates
BAD_RATES = [-0.1, 1.5, math.nan, math.inf, None]


@pytest.mark.parametrize("rate", BAD_RATES, ids=repr)
@pytest.mark.parametrize("surgery", ["apply_stochastic_depth", "apply_dropblock"])
def test_api_surgery_bad_rate(surgery, rate):
    model = tiny()
    guard = Untouched(model)
    fn: Callable = getattr(regsurgery, surgery)
    kwargs = {"example_inputs": X} if surgery == "apply_dropblock" else {}
    with pytest.raises(ValueError, match=r"rate must be .*\[0, 1\], got " + repr(rate).replace("(", r"\(")):
        fn(model, rate=rate, **kwargs)
    guard.check()


@pytest.mark.parametrize("rate", BAD_RATES, ids=repr)
@pytest.mark.parametrize("op", [
    lambda p: drop_path(X, p),
    lambda p: drop_block2d(X, p, 3),
    lambda p: DropPath(p),
    lambda p: DropBlock2d(p, 3),
], ids=["drop_path", "drop_block2d", "DropPath", "DropBlock2d"])
def test_api_ops_bad_probability(op, rate):
    with pytest.raises(ValueError, match=r"p must be .*\[0, 1\], got p=" + repr(rate)):
        op(rate)


def test_api_bad_rate_from_a_schedule_callable():
    model = tiny()
    guard = Untouched(model)
    with pytest.raises(ValueError, match=r"schedule\(0, 4, 0.1\) must be in \[0, 1\], got 2.0"):
        apply_stochastic_depth(model, rate=0.1, schedule=lambda d, n, r: 2.0)
    guard.check()


# ----------------------------------------------------------------------------- API: other arguments
@pytest.mark.parametrize("block_size", [0, -1, 2.5, True, "7"], ids=repr)
@pytest.mark.parametrize("where", ["apply_dropblock", "drop_block2d", "DropBlock2d"])
def test_api_bad_block_size(where, block_size):
    pattern = r"block_size must be an integer >= 1, got (block_size=)?" + repr(block_size).replace(".", r"\.")
    if where == "apply_dropblock":
        model = tiny()
        guard = Untouched(model)
        with pytest.raises(ValueError, match=pattern):
            apply_dropblock(model, block_size=block_size, example_inputs=X)
        guard.check()
    elif where == "drop_block2d":
        with pytest.raises(ValueError, match=pattern):
            drop_block2d(X, 0.1, block_size)
    else:
        with pytest.raises(ValueError, match=pattern):
            DropBlock2d(0.1, block_size)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda m: apply_stochastic_depth(m, mode="col"), ValueError, r"mode must be one of .*got 'col'"),
    (lambda m: apply_stochastic_depth(m, schedule="cosine"), ValueError, r"schedule must be .*got 'cosine'"),
    (lambda m: apply_stochastic_depth(m, include="head.*"), NoSitesError,
     r"include='head\.\*' .* select none of the 4 residual sites"),
    (lambda m: apply_dropblock(m, stages=(0,), example_inputs=X), ValueError,
     r"stages must hold 1-based .*the model has 4 stages\), got 0"),
    (lambda m: apply_dropblock(m, stages=(5,), example_inputs=X), ValueError, r"got 5"),
    (lambda m: apply_dropblock(m, where=("middle",), example_inputs=X), ValueError,
     r"where must be a non-empty subset of \('branch', 'skip'\), got \('middle',\)"),
], ids=["mode", "schedule", "include", "stage-0", "stage-5", "where"])
def test_api_bad_options(call, exc, pattern):
    model = tiny()
    guard = Untouched(model)
    with pytest.raises(exc, match=pattern):
        call(model)
    guard.check()


@pytest.mark.parametrize("fn", [apply_stochastic_depth, lambda m: apply_dropblock(m, example_inputs=X)],
                         ids=["stochastic_depth", "dropblock"])
def test_api_not_a_module(fn):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        fn("resnet50")


# ----------------------------------------------------------------------------- API: no sites
def test_api_no_residual_sites_stochastic_depth():
    model = plain_cnn()
    guard = Untouched(model)
    with pytest.raises(NoSitesError, match=r"no residual sites found in Sequential"):
        apply_stochastic_depth(model, rate=0.1)
    guard.check()


def test_api_no_residual_sites_dropblock():
    model = plain_cnn()
    guard = Untouched(model)
    with pytest.raises(NoSitesError, match=r"hold no residual site"):
        apply_dropblock(model, rate=0.1, example_inputs=X)
    guard.check()


def test_api_no_conv_stages_dropblock():
    model = tm.TwoResiduals()  # residuals, but token maps: no (N, C, H, W) stage
    guard = Untouched(model)
    with pytest.raises(ValueError, match=r"image input \(N, C, H, W\).*got \(Tensor\(2, 4, 16\)\)"):
        apply_dropblock(model, example_inputs=torch.randn(2, 4, 16))
    guard.check()


# ----------------------------------------------------------------------------- API: example inputs
@pytest.mark.parametrize("x, pattern", [
    (torch.randn(2, 4, 32, 32), r"failed on example_inputs \(Tensor\(2, 4, 32, 32\)\).*"
                                r"expects e\.g\. a tensor of shape \(1, 3, 64, 64\)"),
    (torch.randn(3, 32, 32), r"image input \(N, C, H, W\).*got \(Tensor\(3, 32, 32\)\)"),
], ids=["channels", "rank"])
@pytest.mark.parametrize("fn", ["find_conv_stages", "apply_dropblock"])
def test_api_wrong_example_input(fn, x, pattern):
    model = tiny()
    guard = Untouched(model)
    with pytest.raises(ValueError, match=pattern):
        if fn == "find_conv_stages":
            find_conv_stages(model, x)
        else:
            apply_dropblock(model, example_inputs=x)
    guard.check()


def test_api_example_input_not_a_tensor():
    with pytest.raises(TypeError, match=r"example_inputs must be a Tensor or a tuple .*got str"):
        find_conv_stages(tiny(), "image.png")


@pytest.mark.parametrize("call, pattern", [
    (lambda: drop_path(torch.ones(2, 3, dtype=torch.long), 0.1), r"floating-point tensor, got dtype=torch\.int64"),
    (lambda: drop_path(torch.tensor(1.0), 0.1), r"needs a batch dimension, got a 0-d tensor"),
    (lambda: drop_block2d(X[0], 0.1, 3), r"x must be 4-D \(N, C, H, W\), got 3-D input of shape \(3, 32, 32\)"),
    (lambda: drop_path(X, 0.1, mode="col"), r"mode must be 'row' or 'batch', got mode='col'"),
], ids=["int", "0-d", "3-d", "mode"])
def test_api_ops_bad_tensors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_api_plan_of_another_architecture():
    plan = plan_stochastic_depth(tiny(), 0.1)
    model = tm.Net()
    guard = Untouched(model)
    with pytest.raises(PlanMismatchError, match=r"plan names scope 'layer1\.0', which this model does not have"):
        apply_plan(model, plan)
    guard.check()


# ----------------------------------------------------------------------------- CLI fixtures
@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def weights_bytes() -> bytes:
    """A TinyResNet (the regsurgery:example model) state_dict, as torch.save writes it."""
    import io

    torch.manual_seed(1)
    buf = io.BytesIO()
    torch.save(TinyResNet().state_dict(), buf)
    return buf.getvalue()


@pytest.fixture()
def weights(workdir, weights_bytes) -> Path:
    path = workdir / "weights.pth"
    path.write_bytes(weights_bytes)
    return path


PATCH = ["patch", "--drop-path", "0.1"]


# ----------------------------------------------------------------------------- CLI: options
@pytest.mark.parametrize("flag", ["--drop-path", "--drop-block"])
@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf", "abc"])
def test_cli_bad_rate(capsys, workdir, flag, value):
    assert_refused(capsys, workdir, ["patch", flag, value, "--out", "out.pt"], (2,),
                   f"argument {flag}: expected a rate in [0, 1], got '{value}'")


@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_cli_bad_block_size(capsys, workdir, value):
    assert_refused(capsys, workdir, ["patch", "--drop-block", "0.1", "--block-size", value, "--out", "out.pt"],
                   (2,), f"argument --block-size: expected a positive integer, got '{value}'")


def test_cli_no_residual_sites(capsys, workdir):
    assert_refused(capsys, workdir, ["patch", "test_bad_input:plain_cnn", "--input-shape", "1,3,32,32",
                                     "--drop-path", "0.1", "--out", "out.pt"],
                   (1,), "no residual sites found in Sequential")


@pytest.mark.parametrize("rates", [["--drop-path", "0.1"], ["--drop-block", "0.1"]], ids=["drop-path", "drop-block"])
def test_cli_wrong_input_shape(capsys, workdir, rates):
    # The message must name the shape the user gave (1,4,64,64) and the one the model expects.
    assert_refused(capsys, workdir, ["patch", *rates, "--input-shape", "1,4,64,64", "--out", "out.pt"],
                   (1, 2), "(1, 4, 64, 64)", "(1, 3, 64, 64)")


def test_cli_wrong_input_shape_inspect(capsys, workdir):
    assert_refused(capsys, workdir, ["inspect", "--input-shape", "1,4,64,64"], (1, 2),
                   "(1, 4, 64, 64)", "(1, 3, 64, 64)")


# ----------------------------------------------------------------------------- CLI: checkpoints
def test_cli_truncated_checkpoint(capsys, workdir, weights):
    bad = workdir / "truncated.pth"
    data = weights.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", bad, "--out", "out.pt"], (1,),
                   str(bad), "truncated or corrupt")


def test_cli_corrupted_checkpoint(capsys, workdir, weights):
    """Bytes flipped inside a tensor's data: the zip's CRC32 no longer matches. Loading must
    refuse it rather than train from silently corrupted weights."""
    bad = workdir / "corrupted.pth"
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", bad, "--out", "out.pt"], (1,),
                   str(bad), "corrupt")


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"hello, I am not a checkpoint", "is not a PyTorch checkpoint"),
], ids=["empty", "garbage"])
def test_cli_unreadable_checkpoint(capsys, workdir, content, needle):
    bad = workdir / "bad.pth"
    bad.write_bytes(content)
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", bad, "--out", "out.pt"], (1,), str(bad), needle)


def test_cli_pickled_checkpoint(capsys, workdir):
    path = workdir / "whole_model.pt"
    torch.save(TinyResNet(), path)
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", path, "--out", "out.pt"], (1,),
                   str(path), "pickled Python objects", "--trust-pickle")


class _Payload:
    """A pickle that would create a file when unpickled: loading must never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_cli_malicious_pickle_never_runs(capsys, workdir, writer):
    marker = workdir / "PWNED"
    path = workdir / "evil.pt"
    obj = {"state_dict": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", path, "--out", "out.pt"], (1,),
                   str(path), "pickled Python objects")
    assert not marker.exists()
    with pytest.raises(checkpoint_mod.UnsafeCheckpointError):
        regsurgery.load(path)
    assert not marker.exists()


def test_cli_checkpoint_of_another_architecture(capsys, workdir):
    path = workdir / "other.pth"
    torch.save(TinyResNet(widths=(8, 16, 32, 64)).state_dict(), path)
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", path, "--out", "out.pt"], (1,),
                   str(path), "does not fit the model", "stem.0.weight: (8, 3, 3, 3)")


def test_patched_file_of_another_architecture(capsys, workdir):
    """A patched file whose stored plan was made for another model: refused, naming the file."""
    path = workdir / "mixed.pt"
    plan = plan_stochastic_depth(tm.Net(), 0.1)
    save_patched(path, TinyResNet().state_dict(), {"model": "regsurgery:example", "plan": plan.to_dict()})
    before = snapshot(workdir)
    with pytest.raises((PlanMismatchError, checkpoint_mod.CheckpointError)) as info:
        regsurgery.load(path)
    assert str(path) in str(info.value) and "stage1.0" in str(info.value)
    assert snapshot(workdir) == before
    assert_refused(capsys, workdir, ["export", path, "--pt2", "out.pt2"], (1,), str(path), "stage1.0")


# ----------------------------------------------------------------------------- CLI: outputs
def test_cli_output_in_missing_directory(capsys, workdir):
    assert_refused(capsys, workdir, [*PATCH, "--out", "no/such/dir/out.pt"], (2,), "does not exist")


def test_cli_output_is_a_directory(capsys, workdir):
    (workdir / "outdir").mkdir()
    assert_refused(capsys, workdir, [*PATCH, "--out", "outdir"], (2,), "outdir is a directory")


def _unwritable_dir(workdir: Path) -> Path:
    """A directory the process cannot create files in: a read-only one, or /proc for root
    (which permission bits do not stop)."""
    if os.name == "posix" and os.geteuid() == 0:
        return Path("/proc")
    ro = workdir / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def test_cli_unwritable_output_path(capsys, workdir):
    target = _unwritable_dir(workdir) / "regsurgery-test-out.pt"
    try:
        assert_refused(capsys, workdir, [*PATCH, "--out", target], (1, 2), str(target))
        assert not target.exists()
    finally:
        if target.parent != Path("/proc"):
            target.parent.chmod(0o755)


def test_cli_never_overwrites_the_checkpoint(capsys, workdir, weights):
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", weights, "--out", weights], (2,),
                   "refusing to overwrite the input")
    link = workdir / "alias.pt"
    link.symlink_to(weights)
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", weights, "--out", link], (2,),
                   "refusing to overwrite the input")


def test_cli_never_overwrites_the_patched_model_file(capsys, workdir, weights):
    patched = workdir / "patched.pt"
    assert main([*PATCH, "--checkpoint", str(weights), "--out", str(patched)]) == 0
    capsys.readouterr()
    assert_refused(capsys, workdir, ["export", patched, "--onnx", patched], (2,), "refusing to overwrite the input")
    assert_refused(capsys, workdir, ["patch", patched, "--drop-path", "0.2", "--out", patched], (2,),
                   "refusing to overwrite the input")


def test_cli_failed_run_keeps_an_existing_output(capsys, workdir, weights):
    out = workdir / "out.pt"
    out.write_bytes(b"previous result")
    bad = workdir / "truncated.pth"
    bad.write_bytes(weights.read_bytes()[:100])
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", bad, "--out", out], (1,), "truncated or corrupt")
    assert out.read_bytes() == b"previous result"


def test_cli_write_failure_leaves_no_partial_output(capsys, workdir, weights, monkeypatch):
    """The disk fills up half way through the write: no output, no temporary file left."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes reach the temporary file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_mod.torch, "save", failing_save)
    assert_refused(capsys, workdir, [*PATCH, "--checkpoint", weights, "--out", "out.pt"], (1,),
                   "No space left on device")
