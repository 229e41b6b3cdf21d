"""CLI: ``patch --dropout`` and ``prune`` (LayerDrop's inference-time pruning)."""

from __future__ import annotations

import json

import pytest
import torch

import regsurgery
from regsurgery.cli import main

VIT = "timm:vit_tiny_patch16_224"
KW = json.dumps({"img_size": 16, "patch_size": 8, "depth": 4, "embed_dim": 16, "num_heads": 2, "num_classes": 3})


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_patch_dropout_reuses_slots_and_loads(tmp_path, capsys) -> None:
    out = tmp_path / "vit_do.pt"
    code, text, err = run(capsys, "patch", VIT, "--kwargs", KW, "--input-shape", "1,3,16,16", "--dropout", "0.2", "--dropout-where", "mlp,head",
                          "--out", str(out))
    assert code == 0, err
    assert "Dropout 0.2 at 5 places (mlp+head), 5 existing slots reused" in text
    model = regsurgery.load(out)
    assert model.blocks[3].mlp.drop1.p == pytest.approx(0.2) and model.head_drop.p == pytest.approx(0.2)
    code, text, err = run(capsys, "inspect", VIT, "--kwargs", KW, "--input-shape", "1,3,16,16", "--dropout", "0.1", "--format", "json")
    assert code == 0, err
    plan = json.loads(text)["plan"]
    assert sum(op["role"] == "hidden" for op in plan["ops"]) == 4


def test_prune_every_other_writes_smaller_model(tmp_path, capsys) -> None:
    out = tmp_path / "vit_half.pt"
    code, text, err = run(capsys, "prune", VIT, "--kwargs", KW, "--input-shape", "1,3,16,16", "--keep", "every_other", "--out", str(out))
    assert code == 0, err
    assert "blocks 4 -> 2" in text
    model = regsurgery.load(out)
    assert len(model.blocks) == 2
    again = tmp_path / "vit_quarter.pt"
    code, text, err = run(capsys, "prune", str(out), "--keep", "1", "--out", str(again))
    assert code == 0, err
    sd_full = regsurgery.load(out).state_dict()
    sd = regsurgery.load(again).state_dict()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], sd_full["blocks.1.attn.qkv.weight"])
    model.eval()(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("argv", [
    ["--keep", "half"], ["--keep", "1.5"], ["--keep", "9"],
])
def test_prune_bad_args_exit_2_and_write_nothing(tmp_path, capsys, argv) -> None:
    out = tmp_path / "never.pt"
    code, _, err = run(capsys, "prune", VIT, "--kwargs", KW, "--input-shape", "1,3,16,16", *argv, "--out", str(out))
    assert code == 2, err
    assert not out.exists()


def test_prune_never_overwrites_input(tmp_path, capsys) -> None:
    out = tmp_path / "vit_half.pt"
    assert run(capsys, "prune", VIT, "--kwargs", KW, "--input-shape", "1,3,16,16", "--out", str(out))[0] == 0
    before = out.read_bytes()
    code, _, err = run(capsys, "prune", str(out), "--out", str(out))
    assert code == 2 and out.read_bytes() == before
