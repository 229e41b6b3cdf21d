"""Training-loop integrations: a HuggingFace ``Trainer`` callback that steps a RateSchedule.

``transformers`` is imported only when :func:`rate_schedule_callback` is called, so this module
imports without it.
"""

from __future__ import annotations

from typing import Any

from .schedule import RateSchedule

__all__ = ["rate_schedule_callback"]


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
