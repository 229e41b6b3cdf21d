"""LayerDrop on a block: an instance-level forward that skips the whole block in training.

The block keeps its object, class and ``state_dict``; its instance attribute ``forward`` becomes a
wrapper that, in training, draws :func:`regsurgery.ops.layerdrop.layer_dropped` once per call and
returns its first argument unchanged (plus a zero that reaches every parameter, for DDP) when the
block is skipped; otherwise it calls what was there before (a regsurgery-patched forward or the
class forward). In eval mode the wrapper is a plain call of the previous forward, so eval outputs
are bitwise the original's. :func:`strip_layerdrop` puts the previous forward back.

Another patch installed later (DropPath in the same block) goes *under* the wrapper:
:func:`set_inner_forward` replaces the wrapped forward, not the wrapper.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from ..ops.drop import _check_p
from ..ops.layerdrop import layer_dropped, with_zero_grads
from .forwards import new_forward, set_template

__all__ = ["LAYERDROP_STATE", "install_layerdrop", "strip_layerdrop", "layerdrop_rate", "set_inner_forward",
           "has_layerdrop"]

LAYERDROP_STATE = "_regsurgery_layerdrop"


@dataclass
class _LayerDropState:
    p: float
    inner: Optional[Callable[..., Any]]  # the instance forward that was there before, if any


def _layerdrop_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state = self.__dict__[LAYERDROP_STATE]
    # No counters or other mutable Python state here: torch.compile would guard on them and recompile.
    if self.training and args:
        x = args[0]
        if layer_dropped(state.p, True, device=x.device):
            return with_zero_grads(x, list(self.parameters()))
    if state.inner is not None:
        return state.inner(*args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


set_template(_layerdrop_forward, "layerdrop_forward")


def has_layerdrop(block: nn.Module) -> bool:
    return LAYERDROP_STATE in block.__dict__


def install_layerdrop(block: nn.Module, p: float) -> None:
    """Wrap ``block``'s forward with LayerDrop at rate ``p`` (re-installing only sets the rate)."""
    _check_p(p)
    state = block.__dict__.get(LAYERDROP_STATE)
    if state is not None:
        state.p = float(p)
        return
    block.__dict__[LAYERDROP_STATE] = _LayerDropState(p=float(p), inner=block.__dict__.get("forward"))
    # One code object per block: the graph break at the draw makes dynamo cache resume frames per
    # code object, and one shared function would hit recompile_limit on deep stacks.
    # A partial of an importable per-block copy (own code object for dynamo): it pickles.
    block.__dict__["forward"] = functools.partial(new_forward("layerdrop_forward"), block)


def set_inner_forward(block: nn.Module, forward: Optional[Callable[..., Any]]) -> None:
    """Replace the forward LayerDrop wraps (None: the class forward)."""
    block.__dict__[LAYERDROP_STATE].inner = forward


def layerdrop_rate(block: nn.Module) -> Optional[float]:
    state = block.__dict__.get(LAYERDROP_STATE)
    return None if state is None else state.p


def strip_layerdrop(model: nn.Module) -> list[str]:
    """Remove every LayerDrop wrapper under ``model``; return the scopes it was removed from."""
    removed = []
    for name, m in model.named_modules():
        state = m.__dict__.pop(LAYERDROP_STATE, None)
        if state is None:
            continue
        if state.inner is not None:
            m.__dict__["forward"] = state.inner
        else:
            m.__dict__.pop("forward", None)
        removed.append(name)
    return removed
