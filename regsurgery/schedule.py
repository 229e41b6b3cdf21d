"""Training-time rate schedules for the inserted DropBlock / DropPath modules.

Ghiasi, Lin, Le (DropBlock, NeurIPS 2018, arXiv 1810.12890) decrease ``keep_prob`` linearly
from 1.0 to its target over training: a fixed rate from the first step was worse and more
sensitive to the choice of the rate. In terms of drop rates, every module ``m`` with target
rate ``p_m`` gets, at step ``t`` of ``T`` (after ``W`` warmup steps)::

    progress(t) = clip((t - W) / (T - W), 0, 1)
    factor(t)   = start                               for t < W
                = start + (1 - start) * fn(progress)  otherwise
    p_m(t)      = p_m * factor(t)

``fn`` is ``"linear"`` (``fn(x) = x``, the paper's ramp), ``"cosine"``
(``(1 - cos(pi x)) / 2``), ``"constant"`` (``1``: the fixed rate the paper compares against)
or any callable ``progress -> factor`` in [0, 1]. Targets are the modules' rates when the
schedule is built (what the plan set: per-depth DropPath rates keep their ratios).

The schedule changes the plain rate attribute of each module (``p`` for regsurgery's ops,
``drop_prob`` for timm's ``DropPath``/``DropBlock2d``, ``p`` for torchvision's
``StochasticDepth``/``DropBlock2d``), so it works the same on patched blocks and on slots a plan
reused. Step it by hand once per iteration, or :meth:`RateSchedule.bind` it to an optimizer so
every ``optimizer.step()`` advances it; :meth:`RateSchedule.state_dict` goes in the training
checkpoint so a resumed run continues where it stopped.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torch import nn

from .ops.slots import slot_kind
from .plan import check_rate

__all__ = ["RateSchedule", "ScheduleBinding", "RAMPS", "SCHEDULE_FORMAT"]

SCHEDULE_FORMAT = "regsurgery.rate_schedule/1"
KINDS = ("drop_block", "drop_path", "dropout")

#: Built-in ramps: progress in [0, 1] -> factor in [0, 1].
RAMPS: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "cosine": lambda x: 0.5 * (1.0 - math.cos(math.pi * x)),
    "constant": lambda x: 1.0,
}

RampFn = Union[str, Callable[[float], float]]


@dataclass
class _Entry:
    module: nn.Module
    attr: str
    kind: str
    target: float


def _kind_of(module: nn.Module, include_existing: bool) -> Optional[tuple[str, str]]:
    """(kind, rate attribute) of a regularizer module, None for anything else."""
    return slot_kind(module, include_existing)


def _named_candidates(model_or_modules: Any) -> list[tuple[str, nn.Module]]:
    if isinstance(model_or_modules, nn.Module):
        return [
            (name or type(m).__name__, m) for name, m in model_or_modules.named_modules()
        ]
    if isinstance(model_or_modules, Mapping):
        items = list(model_or_modules.items())
    elif isinstance(model_or_modules, Iterable) and not isinstance(model_or_modules, (str, bytes)):
        items = []
        for i, item in enumerate(model_or_modules):
            if isinstance(item, nn.Module):
                items.append((str(i), item))
            elif isinstance(item, tuple) and len(item) == 2:
                items.append(item)
            else:
                raise TypeError(
                    f"model_or_modules item {i} must be a module or a (name, module) pair, got "
                    f"{type(item).__name__}"
                )
    else:
        raise TypeError(
            "model_or_modules must be an nn.Module, a mapping name -> module or an iterable of "
            f"modules, got {type(model_or_modules).__name__}"
        )
    for name, m in items:
        if not isinstance(name, str) or not isinstance(m, nn.Module):
            raise TypeError(f"expected (str, nn.Module) pairs, got ({name!r}, {type(m).__name__})")
    return items


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _fn_name(fn: RampFn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)


class ScheduleBinding:
    """What :meth:`RateSchedule.bind` returns: ``remove()`` stops the optimizer from stepping
    the schedule (also usable as a context manager)."""

    def __init__(self, schedule: RateSchedule, optimizer: Any, handle: Any) -> None:
        self._schedule = schedule
        self._optimizer_id = id(optimizer)
        self._handle = handle

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self._schedule._bound.discard(self._optimizer_id)

    def __enter__(self) -> ScheduleBinding:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class RateSchedule:
    """Ramp the rates of every DropBlock / DropPath module of a model during training.

    Args:
        model_or_modules: the (patched) model, a mapping name -> module or an iterable of
            modules / (name, module) pairs. Every regsurgery ``DropPath``/``DropBlock2d``/
            ``DropBlock3d`` found is scheduled, and with ``include_existing`` also timm's and
            torchvision's DropPath / StochasticDepth / DropBlock modules.
        total_steps: the step at which every rate reaches its target (the paper: the whole
            training run, in iterations).
        warmup_steps: steps held at ``start * target`` before the ramp begins.
        fn: ``"linear"`` (default), ``"cosine"``, ``"constant"`` or a callable
            ``progress in [0, 1] -> factor in [0, 1]``.
        kinds: which modules to move: any of ``"drop_block"``, ``"drop_path"``, ``"dropout"``
            (regsurgery's inserted :class:`regsurgery.ops.Dropout`; reused ``nn.Dropout`` slots
            keep the rate the plan set).
        start: the factor at progress 0 (0 = regularization off at the first step).
        include_existing: also schedule third-party regularizer modules (see above).

    Building the schedule records each module's current rate as its target and sets the
    rates of step 0. ``step()`` then advances one iteration.
    """

    def __init__(
        self,
        model_or_modules: Union[nn.Module, Mapping[str, nn.Module], Iterable[Any]],
        total_steps: int,
        *,
        warmup_steps: int = 0,
        fn: RampFn = "linear",
        kinds: Iterable[str] = KINDS,
        start: float = 0.0,
        include_existing: bool = True,
    ) -> None:
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})"
            )
        self.start = check_rate("start", start)
        self.fn = self._check_fn(fn)
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.kinds = kinds
        self._entries: dict[str, _Entry] = {}
        seen: set[int] = set()
        for name, m in _named_candidates(model_or_modules):
            found = _kind_of(m, include_existing)
            if found is None or found[0] not in kinds or id(m) in seen:
                continue
            seen.add(id(m))
            kind, attr = found
            target = check_rate(f"the rate {attr} of {name}", getattr(m, attr))
            self._entries[name] = _Entry(m, attr, kind, target)
        if not self._entries:
            what = type(model_or_modules).__name__
            raise ValueError(
                f"RateSchedule found no {' / '.join(kinds)} modules in {what}; insert them first "
                "(regsurgery.apply_dropblock / apply_stochastic_depth) and build the schedule on "
                "the patched model"
            )
        self.step_count = 0
        self._bound: set[int] = set()
        self._apply()

    # ------------------------------------------------------------------ the ramp

    @staticmethod
    def _check_fn(fn: RampFn) -> RampFn:
        if isinstance(fn, str):
            if fn not in RAMPS:
                raise ValueError(f"fn must be one of {tuple(RAMPS)} or a callable, got {fn!r}")
            return fn
        if not callable(fn):
            raise ValueError(f"fn must be one of {tuple(RAMPS)} or a callable, got {fn!r}")
        return fn

    def _ramp(self, progress: float) -> float:
        if isinstance(self.fn, str):
            return RAMPS[self.fn](progress)
        value = self.fn(progress)
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(
                f"schedule fn {_fn_name(self.fn)} returned {value!r} at progress {progress:.6g}; "
                "it must return a factor in [0, 1]"
            )
        return v

    def factor(self, step: Optional[int] = None) -> float:
        """The fraction of each target rate applied at ``step`` (default: the current step)."""
        t = self.step_count if step is None else _check_int("step", step, 0)
        if t < self.warmup_steps:
            return self.start
        progress = min(1.0, (t - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.start + (1.0 - self.start) * self._ramp(progress)

    def _apply(self) -> None:
        f = self.factor()
        for e in self._entries.values():
            setattr(e.module, e.attr, e.target * f)

    # ------------------------------------------------------------------ stepping

    def step(self) -> None:
        """Advance one iteration and set every module's rate for the new step."""
        self.step_count += 1
        self._apply()

    def set_step(self, step: int) -> None:
        """Jump to ``step`` (e.g. when resuming without a saved schedule state)."""
        self.step_count = _check_int("step", step, 0)
        self._apply()

    def bind(self, optimizer: Any) -> ScheduleBinding:
        """Advance the schedule after every ``optimizer.step()``; ``.remove()`` the result to stop.

        Uses ``torch.optim.Optimizer.register_step_post_hook``; a step skipped by a GradScaler
        (inf/NaN gradients) does not call ``optimizer.step`` and so does not advance it.
        """
        register = getattr(optimizer, "register_step_post_hook", None)
        if register is None:
            raise TypeError(
                f"bind needs a torch.optim.Optimizer (register_step_post_hook), got "
                f"{type(optimizer).__name__}; call schedule.step() by hand instead"
            )
        if id(optimizer) in self._bound:
            raise ValueError(
                f"this schedule is already bound to that {type(optimizer).__name__}; each step "
                "would advance it twice (remove the first binding)"
            )

        def hook(opt: Any, args: Any, kwargs: Any) -> None:
            self.step()

        handle = register(hook)
        self._bound.add(id(optimizer))
        return ScheduleBinding(self, optimizer, handle)

    # ------------------------------------------------------------------ inspection

    @property
    def targets(self) -> dict[str, float]:
        """Qualified module name -> target rate."""
        return {name: e.target for name, e in self._entries.items()}

    @property
    def kinds_by_name(self) -> dict[str, str]:
        return {name: e.kind for name, e in self._entries.items()}

    def current_rates(self) -> dict[str, float]:
        """Qualified module name -> the rate the module holds now."""
        return {name: float(getattr(e.module, e.attr)) for name, e in self._entries.items()}

    def rates_at(self, step: int) -> dict[str, float]:
        """The rates step ``step`` sets (nothing is changed)."""
        f = self.factor(step)
        return {name: e.target * f for name, e in self._entries.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(modules={len(self._entries)}, step={self.step_count}/"
            f"{self.total_steps}, warmup_steps={self.warmup_steps}, fn={_fn_name(self.fn)!r}, "
            f"start={self.start}, factor={self.factor():.4g})"
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings; loadable with ``torch.load(weights_only=True)``)."""
        return {
            "format": SCHEDULE_FORMAT,
            "step": self.step_count,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "start": self.start,
            "fn": self.fn if isinstance(self.fn, str) else None,
            "fn_name": _fn_name(self.fn),
            "targets": self.targets,
            "kinds": self.kinds_by_name,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run: its step, length, ramp and targets replace this schedule's.

        The modules must be the same (same qualified names and kinds); otherwise a ValueError
        lists the differences. A state saved with a callable ``fn`` needs this schedule to be
        built with that callable.
        """
        if not isinstance(state, Mapping) or state.get("format") != SCHEDULE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"not a RateSchedule state (expected format {SCHEDULE_FORMAT!r}, got {found!r})"
            )
        targets = dict(state["targets"])
        missing = sorted(set(targets) - set(self._entries))
        unexpected = sorted(set(self._entries) - set(targets))
        if missing or unexpected:
            raise ValueError(
                "the saved schedule moved other modules than this model has: "
                f"saved but not here {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                f"here but not saved {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
                "apply the same plan to the model before loading"
            )
        kinds = dict(state.get("kinds", {}))
        changed = sorted(
            n for n, k in kinds.items() if n in self._entries and self._entries[n].kind != k
        )
        if changed:
            raise ValueError(f"modules changed kind since the state was saved: {changed[:8]}")
        saved_fn = state.get("fn")
        if saved_fn is None and isinstance(self.fn, str):
            raise ValueError(
                f"the state was saved with the callable fn {state.get('fn_name')!r}; build "
                "this schedule with the same callable before loading"
            )
        fn = self.fn if saved_fn is None else self._check_fn(saved_fn)
        total = _check_int("total_steps", state["total_steps"], 1)
        warmup = _check_int("warmup_steps", state["warmup_steps"], 0)
        if warmup >= total:
            raise ValueError(f"saved warmup_steps ({warmup}) >= total_steps ({total})")
        start = check_rate("start", state["start"])
        new_targets = {n: check_rate(f"the saved target of {n}", t) for n, t in targets.items()}
        step = _check_int("step", state["step"], 0)
        # Validated in full before anything changes: a rejected state leaves the schedule as is.
        self.fn, self.total_steps, self.warmup_steps, self.start = fn, total, warmup, start
        for name, target in new_targets.items():
            self._entries[name].target = target
        self.step_count = step
        self._apply()
