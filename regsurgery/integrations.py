"""Training-loop integrations: HuggingFace ``Trainer`` and Lightning callbacks that step a RateSchedule.

``transformers`` and ``lightning`` are imported only when a callback is made, so this module
imports without them.
"""

from __future__ import annotations

from typing import Any

from .schedule import RateSchedule

__all__ = ["rate_schedule_callback", "lightning_rate_schedule_callback"]


def rate_schedule_callback(schedule: RateSchedule) -> Any:
    """A ``transformers.TrainerCallback`` that keeps ``schedule`` at the Trainer's global step.

    The rates follow ``state.global_step`` (optimizer steps, after gradient accumulation), set at
    the start of training (a resumed run starts at its checkpoint's step) and after every step::

        model = apply_stochastic_depth(model, rate=0.1, example_inputs=batch)
        schedule = RateSchedule(model, total_steps=args.max_steps)
        trainer = Trainer(model, args, callbacks=[rate_schedule_callback(schedule)], ...)
    """
    if not isinstance(schedule, RateSchedule):
        raise TypeError(f"schedule must be a regsurgery.RateSchedule, got {type(schedule).__name__}")
    from transformers import TrainerCallback

    class RateScheduleCallback(TrainerCallback):
        def __init__(self) -> None:
            self.schedule = schedule

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.schedule.set_step(int(state.global_step))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.schedule.set_step(int(state.global_step))

    return RateScheduleCallback()


def _lightning_callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError(
                "lightning_rate_schedule_callback needs Lightning: pip install lightning "
                "(or pytorch-lightning); with a plain loop, call schedule.step() after optimizer.step()"
            ) from None
    return Callback


def lightning_rate_schedule_callback(schedule: RateSchedule) -> Any:
    """A Lightning ``Callback`` that keeps ``schedule`` at the trainer's ``global_step`` (optimizer
    steps), set when training starts (a resumed run starts at its step) and after every batch::

        trainer = lightning.Trainer(callbacks=[lightning_rate_schedule_callback(schedule)])
    """
    if not isinstance(schedule, RateSchedule):
        raise TypeError(f"schedule must be a regsurgery.RateSchedule, got {type(schedule).__name__}")
    base = _lightning_callback_base()

    class LightningRateScheduleCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.schedule = schedule

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.schedule.set_step(int(trainer.global_step))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
            self.schedule.set_step(int(trainer.global_step))

    return LightningRateScheduleCallback()
