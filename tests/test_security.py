"""Files are data (issue 14): a patched checkpoint or a plan file never runs code or sets arbitrary
attributes; what the user gives on the command line or registers in code stays allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import regsurgery
from regsurgery.cli import main
from regsurgery.io.checkpoint import load, save_patched
from regsurgery.io.examples_models import TinyResNet
from regsurgery.io.modelspec import ModelSpecError
from regsurgery.io.trust import UntrustedFileError, validate_plan_ops
from regsurgery.plan import PLAN_FORMAT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMPTY_PLAN = {"format": PLAN_FORMAT, "meta": {}, "ops": []}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _attack_recipe(marker):
    return {"model": "subprocess:run", "kwargs": {"args": f"touch {marker}", "shell": True},
            "plan": EMPTY_PLAN, "input_shape": [1, 3, 64, 64]}


@pytest.fixture(params=[".pt", ".safetensors"])
def attack_file(request, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"evil{request.param}"
    save_patched(path, TinyResNet().state_dict(), _attack_recipe(marker))
    return path, marker


# --------------------------------------------------------------------------- model builders
def test_load_refuses_a_callable_named_by_the_file(attack_file):
    path, marker = attack_file
    with pytest.raises(UntrustedFileError, match=r"subprocess:run.*--trust-code"):
        load(path)
    with pytest.raises(UntrustedFileError, match="register_builder"):
        regsurgery.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["inspect"], ["inspect", "--format", "json"], ["export", "--onnx", "{d}/o.onnx"],
    ["export", "--torchscript", "{d}/o.ts"], ["patch", "--drop-path", "0.1", "--out", "{d}/o.pt"],
])
def test_cli_refuses_a_callable_named_by_the_file(capsys, attack_file, command):
    path, marker = attack_file
    argv = [a.format(d=path.parent) for a in command]
    code, out, err = run(capsys, argv[0], str(path), *argv[1:])
    assert code == 1, err
    assert "subprocess:run" in one_line(err) and "--trust-code" in err
    assert not marker.exists()
    assert sorted(os.listdir(path.parent)) == [path.name]  # nothing written


def test_trust_code_is_the_explicit_opt_in(attack_file):
    path, marker = attack_file
    # With trust, the file's callable runs (here: it returns no module, so loading fails after).
    with pytest.raises(ModelSpecError, match="not a torch.nn.Module"):
        load(path, trust_code=True)
    assert marker.exists()


def test_registered_builder_is_allowed_in_files(tmp_path):
    calls = []

    def build(width=8):
        calls.append(width)
        return TinyResNet(widths=(width, 16), depths=(1, 1))

    regsurgery.register_builder("tests:tiny", build)
    try:
        model = build(8)
        plan = regsurgery.plan_stochastic_depth(model, 0.2)
        path = tmp_path / "reg.pt"
        save_patched(path, model.state_dict(), {"model": "tests:tiny", "kwargs": {"width": 8},
                                                "plan": plan.to_dict()})
        loaded = load(path)
        assert calls == [8, 8] and regsurgery.is_patched(loaded)
        assert "tests:tiny" in regsurgery.io.trust.registered_builders()
    finally:
        regsurgery.io.trust.unregister_builder("tests:tiny")
    with pytest.raises(UntrustedFileError, match="tests:tiny"):
        load(path)


def test_callable_given_on_the_command_line_stays_allowed(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = run(capsys, "inspect", "regsurgery.io.examples_models:tiny_resnet", "--format", "json")
    assert code == 0, err
    # and the file written from it needs --trust-code to be read back
    out_path = tmp_path / "own.pt"
    code, _, err = run(capsys, "patch", "regsurgery.io.examples_models:tiny_resnet", "--drop-path", "0.1",
                       "--out", str(out_path))
    assert code == 0, err
    code, _, err = run(capsys, "inspect", str(out_path))
    assert code == 1 and "--trust-code" in err
    code, _, err = run(capsys, "inspect", str(out_path), "--trust-code")
    assert code == 0, err
    assert regsurgery.is_patched(load(out_path, trust_code=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ({"num_classes": {"__class__": "os.system"}}, "num_classes"),
])
def test_file_kwargs_are_checked_against_the_signature(tmp_path, kwargs, match):
    path = tmp_path / "k.pt"
    save_patched(path, TinyResNet().state_dict(), {"model": "regsurgery:example", "kwargs": kwargs,
                                                   "plan": EMPTY_PLAN})
    with pytest.raises(ValueError, match=match):
        load(path)


def test_file_may_not_pass_file_reading_timm_kwargs(tmp_path):
    path = tmp_path / "t.pt"
    save_patched(path, {"x": torch.zeros(1)}, {"model": "timm:resnet18",
                                               "kwargs": {"checkpoint_path": str(tmp_path / "x.pth")},
                                               "plan": EMPTY_PLAN})
    with pytest.raises(UntrustedFileError, match="checkpoint_path"):
        load(path)


# --------------------------------------------------------------------------- plans
def _bn_eps_plan():
    return {"format": PLAN_FORMAT, "meta": {}, "ops": [{
        "kind": "set_rate", "scope": "", "anchor": "", "user": None, "role": "branch", "depth": 0,
        "site": None, "params": {"module": "stem.1", "attr": "eps", "p": 0.5}}]}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_stored_plan_cannot_set_arbitrary_attributes(tmp_path, suffix):
    path = tmp_path / f"eps{suffix}"
    save_patched(path, TinyResNet().state_dict(), {"model": "regsurgery:example", "plan": _bn_eps_plan()})
    with pytest.raises(UntrustedFileError, match=r"plan op 0 \(set_rate\) would set attribute 'eps'"):
        load(path)


def test_set_rate_only_on_regularizer_slots():
    model = TinyResNet()
    plan = _bn_eps_plan()
    plan["ops"][0]["params"]["attr"] = "p"  # 'p' of a BatchNorm: still not a regularizer slot
    with pytest.raises(UntrustedFileError, match=r"would change 'stem.1', a BatchNorm2d"):
        validate_plan_ops(plan, model)
    model.stem.append(torch.nn.Dropout(0.1))
    plan["ops"][0]["params"]["module"] = "stem.3"
    validate_plan_ops(plan, model)  # nn.Dropout.p is a rate slot
    regsurgery.apply_plan(model, regsurgery.io.trust.validate_plan_dict(plan, model))
    assert model.stem[3].p == 0.5


@pytest.mark.parametrize("edit, match", [
    (lambda op: op.update(kind="exec"), "unknown kind 'exec'"),
    (lambda op: op.update(code="import os"), "unknown field.*'code'"),
    (lambda op: op["params"].update(fn="subprocess:run"), "unknown parameter.*'fn'"),
    (lambda op: op.update(scope="__class__"), "scope '__class__'"),
    (lambda op: op.update(scope="layer9.0"), "scope 'layer9.0'"),
    (lambda op: op["params"].update(trace_example={"args": [{"shape": [1], "dtype": "load"}], "kwargs": {}}),
     "dtype"),
    (lambda op: op["params"].update(p="0.1"), "must be a real number"),
    (lambda op: op["params"].update(p=True), "must be a real number"),
])
def test_plan_json_is_validated_naming_the_problem(capsys, tmp_path, edit, match):
    marker = tmp_path / "PWNED"
    code, out, err = run(capsys, "inspect", "--format", "json", "--drop-path", "0.2")
    assert code == 0, err
    doc = json.loads(out)
    op = doc["plan"]["ops"][0]
    edit(op)
    doc["plan"]["meta"]["cmd"] = f"touch {marker}"
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(doc))
    out_path = tmp_path / "out.pt"
    code, _, err = run(capsys, "patch", "--plan", str(plan_file), "--out", str(out_path))
    assert code != 0
    line = one_line(err)
    if match:
        import re

        assert re.search(match, line), line
    assert not out_path.exists() and not marker.exists()


def test_patch_applies_a_hand_edited_plan(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", "--format", "json", "--drop-path", "0.2")
    assert code == 0, err
    doc = json.loads(out)
    for op in doc["plan"]["ops"]:
        op["params"]["p"] = 0.05 if op["scope"].startswith("layer1") else 0.3
    doc["plan"]["ops"] = doc["plan"]["ops"][:-1]  # and drop the last site
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(doc))
    out_path = tmp_path / "out.pt"
    code, out, err = run(capsys, "patch", "--plan", str(plan_file), "--out", str(out_path))
    assert code == 0, err
    model = load(out_path)
    rates = sorted(round(m.p, 6) for m in regsurgery.inserted_modules(model).values())
    assert rates == [0.05, 0.05] + [0.3] * 5
    # Plan.to_json() works as well
    plan_file.write_text(regsurgery.plan_of(model).to_json())
    code, _, err = run(capsys, "patch", "--plan", str(plan_file), "--out", str(tmp_path / "again.pt"))
    assert code == 0, err
    code, _, err = run(capsys, "patch", "--plan", str(plan_file), "--drop-path", "0.1", "--out",
                       str(tmp_path / "x.pt"))
    assert code == 2 and "--plan" in err


# --------------------------------------------------------------------------- rates
@pytest.mark.parametrize("rate", ["0.1", True, b"0.1", None])
def test_rates_must_be_real_numbers(rate):
    model = TinyResNet()
    for call in (lambda: regsurgery.apply_stochastic_depth(model, rate=rate),
                 lambda: regsurgery.DropPath(rate), lambda: regsurgery.drop_path(torch.ones(2, 3), rate),
                 lambda: regsurgery.plan.check_rate("rate", rate)):
        with pytest.raises(TypeError, match=r"(rate|p) must be a real number"):
            call()
        with pytest.raises(ValueError):  # the same error is a ValueError, as rates always raised
            call()
    assert not regsurgery.is_patched(model)


def test_one_rate_check(monkeypatch):
    """plan.check_rate, the ops' _check_p and the CLI's --drop-path all go through ops.check_rate."""
    import regsurgery.cli as cli
    import regsurgery.ops.drop as drop
    import regsurgery.plan as plan

    # plan and cli hold the one function (imported at module level: no second copy of the rule)
    assert plan._check_rate is drop.check_rate and cli.check_rate is drop.check_rate
    real, seen = drop.check_rate, []

    def spy(name, value, **kw):
        seen.append(name)
        return real(name, value, **kw)

    monkeypatch.setattr(drop, "check_rate", spy)
    regsurgery.DropPath(0.1)
    assert seen == ["p"]
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match="rate"):
            plan.check_rate("rate", bad)
    assert cli._rate("0.25") == 0.25


# --------------------------------------------------------------------------- CLI usage
@pytest.mark.parametrize("argv, code, match", [
    (["inspect", "--stages", "9"], 2, "--drop-block"),
    (["patch", "--drop-path", "0.1", "--stages", "3,4", "--out", "{d}/o.pt"], 2, "--drop-block"),
    (["inspect", "--stages", "9", "--drop-block", "0.1"], 2, r"group of residual blocks.*got 9"),
    (["export", "--onnx", "{d}/o.onnx", "--opset", "6"], 2, r"opsets 7 to \d+"),
    (["export", "--onnx", "{d}/o.onnx", "--opset", "99"], 2, r"opsets 7 to \d+"),
])
def test_usage_errors_exit_2(capsys, tmp_path, argv, code, match):
    import re

    got, _, err = run(capsys, *[a.format(d=tmp_path) for a in argv])
    assert got == code, err
    assert re.search(match, one_line(err)), err
    assert os.listdir(tmp_path) == []


def test_stages_are_residual_stages_on_a_resnet(capsys):
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64",
                         "--format", "json", "--drop-block", "0.1", "--stages", "3,4", "--drop-path", "0")
    assert code == 0, err
    doc = json.loads(out)
    scopes = {op["scope"].split(".")[0] for op in doc["plan"]["ops"]}
    assert scopes == {"layer3", "layer4"}
    assert [s["stage"] for s in doc["stages"]] == [None, 1, 2, 3, 4]  # the stem is not a residual stage
    code, out, err = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64")
    assert "'stage' is the number --stages takes" in out


# --------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("fmt", ["--torchscript", "--pt2", "--onnx"])
def test_export_on_a_full_disk_fails_cleanly(tmp_path, fmt):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    out = tmp_path / "model.out"
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "regsurgery", "export", fmt, str(out)], cwd=tmp_path,
                          capture_output=True, text=True, preexec_fn=limit, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regsurgery: error:"), proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_export_to_an_unwritable_directory_fails_cleanly(capsys, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        for fmt in ("--torchscript", "--pt2", "--onnx"):
            code, _, err = run(capsys, "export", fmt, str(d / "m.out"))
            assert code in (1, 2) and one_line(err).startswith("regsurgery: error:")
            assert os.listdir(d) == []
    finally:
        d.chmod(0o700)


# --------------------------------------------------------------------------- patched models are plain modules
class _ToyViT(torch.nn.Module):
    """Two transformer blocks without BatchNorm: skip mode really skips here."""

    def __init__(self):
        super().__init__()
        import toy_models as tm

        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.Sequential(tm.TwoResiduals(16), tm.TwoResiduals(16))
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def _patched(kind):
    torch.manual_seed(0)
    if kind == "skip":
        model = _ToyViT()
        regsurgery.apply_stochastic_depth(model, 0.5, skip_dropped=True)
        from regsurgery.ops.skip import SkipDropPath

        assert any(isinstance(m, SkipDropPath) for m in regsurgery.inserted_modules(model).values())
        return model
    if kind == "timm":
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)
    else:
        model = TinyResNet()
    regsurgery.apply_stochastic_depth(model, 0.5, skip_dropped=(kind == "skip"))
    if kind == "example":
        regsurgery.apply_dropblock(model, 0.2, block_size=3, example_inputs=torch.randn(2, 3, 64, 64))
    return model


def _assert_regularized(model, n_inserted):
    shape = (6, 5, 8) if isinstance(model, _ToyViT) else (4, 3, 64, 64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert len(regsurgery.inserted_modules(model)) == n_inserted
    model.train()
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.equal(a, b)  # still stochastic in train mode
    torch.manual_seed(0)
    assert torch.equal(model(x), a)
    model.eval()
    ref = model(x)
    regsurgery.strip(model)
    assert not regsurgery.is_patched(model) and regsurgery.inserted_modules(model) == {}
    assert torch.equal(model(x), ref)


def _roundtrip(model, how):
    import copy
    import io
    import pickle

    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    return copy.deepcopy(model)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
@pytest.mark.parametrize("kind", ["example", "timm", "skip"])
def test_patched_model_survives_pickle_and_copies(kind, how):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _patched(kind)
    n = len(regsurgery.inserted_modules(model))
    copy_ = _roundtrip(model, how)
    assert regsurgery.plan_of(copy_).to_dict() == regsurgery.plan_of(model).to_dict()
    _assert_regularized(copy_, n)
    _assert_regularized(model, n)  # the original is untouched by the copy


def _spawn_child(model, result_path):
    try:
        _assert_regularized(model, 20)
        open(result_path, "w").write("ok")
    except BaseException as e:  # noqa: BLE001
        open(result_path, "w").write(repr(e))


def test_patched_model_crosses_a_spawn(tmp_path):
    import torch.multiprocessing as mp

    model = _patched("example")
    assert len(regsurgery.inserted_modules(model)) == 20
    result = tmp_path / "result"
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_spawn_child, args=(model, str(result)))
    proc.start()
    proc.join(240)
    assert proc.exitcode == 0 and result.read_text() == "ok", result.read_text() if result.exists() else None


# --------------------------------------------------------------------------- export: dropout, dynamic batch
class _WithDropout(torch.nn.Module):
    def __init__(self, live=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.drop = torch.nn.Dropout(0.2)
        self.live = live

    def forward(self, x):
        y = self.drop(self.conv(x))
        return y + 0 * torch.rand_like(y) if self.live else y


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_eval_dropout_is_accepted_live_random_ops_refused(tmp_path, fmt):
    from regsurgery.io import export as ex

    fn = getattr(ex, f"export_{fmt}")
    x = torch.randn(1, 3, 8, 8)
    report = fn(_WithDropout(), x, tmp_path / f"m.{fmt}")
    assert report.random_nodes == [] and (tmp_path / f"m.{fmt}").exists()
    with pytest.raises(ex.ExportError, match="random"):
        fn(_WithDropout(live=True), x, tmp_path / f"live.{fmt}")
    assert not (tmp_path / f"live.{fmt}").exists()


def test_cli_exports_a_timm_model_with_dropout(capsys, tmp_path):
    code, out, err = run(capsys, "export", "timm:resnet18", "--kwargs", '{"drop_rate": 0.2}', "--input-shape",
                         "1,3,64,64", "--torchscript", str(tmp_path / "m.ts"), "--pt2", str(tmp_path / "m.pt2"))
    assert code == 0, err


def test_onnx_has_a_dynamic_batch_unless_static(capsys, tmp_path):
    import numpy as np
    import onnxruntime as ort

    dyn, static = tmp_path / "dyn.onnx", tmp_path / "static.onnx"
    code, out, err = run(capsys, "export", "--onnx", str(dyn))
    assert code == 0, err
    assert "checked with onnxruntime at batch 2 and 3" in out
    model = TinyResNet()
    session = ort.InferenceSession(str(dyn), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64)).astype(np.float32)
        assert session.run(None, {name: x})[0].shape == (batch, 10)
    del model
    code, out, err = run(capsys, "export", "--onnx", str(static), "--static")
    assert code == 0, err
    session = ort.InferenceSession(str(static), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        session.run(None, {name: np.zeros((2, 3, 64, 64), np.float32)})


# --------------------------------------------------------------------------- hf:DIR
def test_local_huggingface_directory_builds_without_remote_code(tmp_path):
    pytest.importorskip("transformers")
    from regsurgery.io.modelspec import build_model

    cfg = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 16}
    good = tmp_path / "bert"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(cfg))
    model = build_model(f"hf:{good}")
    assert type(model).__name__ == "BertModel"
    path = tmp_path / "bert.pt"
    save_patched(path, model.state_dict(), {"model": f"hf:{good}", "plan": EMPTY_PLAN})
    assert type(load(path)).__name__ == "BertModel"  # hf:DIR is allowed in files
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({**cfg, "model_type": "evil",
                                                  "auto_map": {"AutoConfig": "code.EvilConfig"}}))
    (evil / "code.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ModelSpecError):
        build_model(f"hf:{evil}")
    assert not marker.exists()
