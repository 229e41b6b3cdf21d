"""Checkpoints: safe loading, key normalisation, mismatch messages, atomic writes, recipe files."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from regsurgery.api import plan_stochastic_depth
from regsurgery.io.checkpoint import (
    PATCHED_FORMAT,
    CheckpointError,
    KeyMismatchError,
    OutputPathError,
    UnsafeCheckpointError,
    atomic_save,
    atomic_write_bytes,
    extract_state_dict,
    load,
    load_patched,
    load_state_dict_file,
    load_weights_into,
    read_patched,
    save_patched,
)
from regsurgery.io.examples_models import TinyResNet
from regsurgery.plan import Plan
from regsurgery.rewrite.apply import inserted_modules, is_patched, strip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyResNet()


@pytest.fixture(scope="module")
def sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _no_temp_files(directory):
    return [p for p in os.listdir(directory) if p.startswith(".") and ".tmp" in p]


# --------------------------------------------------------------------------- reading
def test_plain_state_dict_roundtrip(tmp_path, sd):
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    _equal(load_state_dict_file(path), sd)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_ema"])
def test_nested_weights_are_found(tmp_path, sd, wrap):
    path = tmp_path / "w.pt"
    torch.save({wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    _equal(load_state_dict_file(path), sd)


def test_ddp_and_compile_prefixes_removed(tmp_path, sd):
    path = tmp_path / "ddp.pt"
    torch.save({"model_ema": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, path)
    _equal(load_state_dict_file(path), sd)


def test_prefix_kept_when_not_on_every_key():
    t = torch.zeros(1)
    out = extract_state_dict({"module.a": t, "b": t})
    assert set(out) == {"module.a", "b"}


def test_explicit_key_picks_ema_over_model(tmp_path, sd):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "both.pt"
    torch.save({"model": sd, "model_ema": ema}, path)
    _equal(load_state_dict_file(path), sd)  # default order: model first
    _equal(load_state_dict_file(path, key="model_ema"), ema)
    with pytest.raises(CheckpointError, match="no 'ema' entry; top-level keys: \\[model, model_ema\\]"):
        load_state_dict_file(path, key="ema")


def test_no_weights_found_lists_the_keys(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"no weights found.*found keys \[epoch, args\]"):
        load_state_dict_file(path)


def test_safetensors(tmp_path, sd):
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    _equal(load_state_dict_file(path), sd)


def test_pickled_module_refused_unless_trusted(tmp_path, model, sd):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict_file(path)
    msg = str(err.value)
    assert "regsurgery.io.examples_models.TinyResNet" in msg  # names what it would have to import
    assert "weights_only" in msg and "--trust-pickle" in msg and "arbitrary code" in msg
    _equal(load_state_dict_file(path, trust_pickle=True), sd)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "missing", "bad_safetensors"])
def test_unreadable_files_name_the_file(tmp_path, sd, kind):
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    data = good.read_bytes()
    path = tmp_path / ("x.safetensors" if kind == "bad_safetensors" else "x.pt")
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("garbage", "bad_safetensors"):
        path.write_bytes(b"\x89PNG not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)  # --trust-pickle would not help


# --------------------------------------------------------------------------- fitting
def test_load_weights_into_roundtrip(sd):
    fresh = TinyResNet()
    load_weights_into(fresh, sd)
    _equal(fresh.state_dict(), sd)


def test_key_mismatch_names_keys_and_counts(sd):
    bad = dict(sd)
    del bad["fc.weight"], bad["fc.bias"]
    bad["head.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as err:
        load_weights_into(TinyResNet(), bad, source="ck.pt")
    msg = str(err.value)
    assert "ck.pt does not fit the model" in msg
    assert "2 missing keys (fc.weight, fc.bias)" in msg
    assert "1 unexpected key (head.weight)" in msg


def test_many_missing_keys_are_summarised(sd):
    bad = {k: v for k, v in sd.items() if not k.startswith("layer4")}
    # torch's BatchNorm loader fills in a missing num_batches_tracked (old checkpoints lack it)
    n = sum(k.startswith("layer4") and not k.endswith("num_batches_tracked") for k in sd)
    assert n == 25
    with pytest.raises(KeyMismatchError, match=rf"{n} missing keys \(layer4\.0\.conv1\.weight, .*\.\.\. {n - 5} more\)"):
        load_weights_into(TinyResNet(), bad)


def test_shape_mismatch_is_reported_before_copying(sd):
    target = TinyResNet(num_classes=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(KeyMismatchError, match=r"fc\.weight: \(10, 128\) in checkpoint, \(5, 128\) in the model.*num_classes"):
        load_weights_into(target, sd)
    _equal(target.state_dict(), before)


# --------------------------------------------------------------------------- writing
def test_atomic_save_replaces_and_sets_normal_permissions(tmp_path):
    path = tmp_path / "out.pt"
    path.write_bytes(b"old")
    atomic_save({"a": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert _no_temp_files(tmp_path) == []


def test_failed_write_leaves_destination_untouched(tmp_path, monkeypatch):
    path = tmp_path / "out.pt"
    path.write_bytes(b"old")

    def broken_save(obj, f):
        f.write(b"partial data")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": 1}, path)
    assert path.read_bytes() == b"old"
    assert _no_temp_files(tmp_path) == []
    fresh = tmp_path / "new.pt"
    with pytest.raises(RuntimeError):
        atomic_save({"a": 1}, fresh)
    assert not fresh.exists() and _no_temp_files(tmp_path) == []


def test_input_is_never_overwritten(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"input")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    for target in (src, tmp_path / "sub" / ".." / "in.pt", link):
        with pytest.raises(OutputPathError, match="refusing to overwrite the input"):
            atomic_write_bytes(b"new", target, inputs=[src])
    assert src.read_bytes() == b"input"


def test_output_path_errors(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        atomic_write_bytes(b"x", tmp_path / "nope" / "out.pt")
    with pytest.raises(OutputPathError, match="is a directory"):
        atomic_write_bytes(b"x", tmp_path)


# --------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def plan(model):
    return plan_stochastic_depth(model, 0.2)


def _recipe(plan):
    return {"model": "regsurgery:example", "kwargs": {}, "plan": plan.to_dict(), "input_shape": [1, 3, 64, 64]}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_patched_file_roundtrip_and_load(tmp_path, model, sd, plan, suffix):
    path = tmp_path / f"patched{suffix}"
    save_patched(path, sd, _recipe(plan))
    if suffix == ".pt":  # plain data all the way down: the safe loader reads the whole file
        raw = torch.load(path, weights_only=True)
        assert raw["format"] == PATCHED_FORMAT and set(raw) == {"format", "state_dict", "recipe"}
        assert raw["recipe"]["versions"]["torch"] == str(torch.__version__)
    state, recipe = read_patched(path)
    _equal(state, sd)
    assert recipe["model"] == "regsurgery:example" and Plan.from_dict(recipe["plan"]).ops == plan.ops

    rebuilt = load(path)
    assert rebuilt.training and is_patched(rebuilt)
    assert len(inserted_modules(rebuilt)) == sum(op.kind == "drop_path" for op in plan.ops) == 8
    rates = sorted(m.p for m in inserted_modules(rebuilt).values())
    assert rates == pytest.approx([0.2 * i / 7 for i in range(8)])
    _equal(rebuilt.state_dict(), sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # eval: DropPath is the identity, so the patched model equals the original
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    strip(rebuilt)
    assert not is_patched(rebuilt)


def test_load_patched_returns_recipe(tmp_path, sd, plan):
    path = tmp_path / "p.pt"
    save_patched(path, sd, _recipe(plan))
    model, recipe = load_patched(path)
    assert recipe["input_shape"] == [1, 3, 64, 64] and is_patched(model)


def test_recipe_must_be_plain_data(tmp_path, sd, plan):
    recipe = _recipe(plan)
    recipe["kwargs"] = {"act": torch.nn.ReLU}
    with pytest.raises(TypeError, match=r"recipe\['kwargs'\]\['act'\] is a builtins.type"):
        save_patched(tmp_path / "p.pt", sd, recipe)
    assert not (tmp_path / "p.pt").exists()


def test_plain_checkpoint_is_not_a_patched_file(tmp_path, sd):
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="not a regsurgery patched file.*--checkpoint"):
        read_patched(path)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "regsurgery.patched/9", "state_dict": sd, "recipe": {}}, newer)
    with pytest.raises(CheckpointError, match="newer than this regsurgery"):
        read_patched(newer)
