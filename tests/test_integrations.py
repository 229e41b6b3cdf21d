"""Training-loop callbacks that step a RateSchedule (Lightning here; HF in test_transformers)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import regsurgery
from regsurgery.integrations import lightning_rate_schedule_callback
from regsurgery.io.examples_models import tiny_resnet


def _schedule():
    model = tiny_resnet()
    regsurgery.apply_stochastic_depth(model, rate=0.2, schedule="uniform")
    return model, regsurgery.RateSchedule(model, total_steps=10)


def test_lightning_callback_follows_the_global_step(monkeypatch):
    class Callback:  # the API surface Lightning's Trainer calls
        pass

    fake = types.ModuleType("lightning.pytorch")
    fake.Callback = Callback
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
    model, schedule = _schedule()
    cb = lightning_rate_schedule_callback(schedule)
    assert isinstance(cb, Callback)
    trainer = types.SimpleNamespace(global_step=5)  # resumed at step 5
    cb.on_train_start(trainer, model)
    rates = [float(m.p) for m in regsurgery.inserted_modules(model).values()]
    assert rates and rates == pytest.approx([0.1] * len(rates))  # halfway up the ramp from 0 to 0.2
    trainer.global_step = 10
    cb.on_train_batch_end(trainer, model, None, None, 0)
    rates = [float(m.p) for m in regsurgery.inserted_modules(model).values()]
    assert rates == pytest.approx([0.2] * len(rates))


def test_lightning_callback_without_lightning_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    _, schedule = _schedule()
    with pytest.raises(ImportError, match="pip install lightning"):
        lightning_rate_schedule_callback(schedule)
    with pytest.raises(TypeError, match="RateSchedule"):
        lightning_rate_schedule_callback(torch.nn.Linear(1, 1))
