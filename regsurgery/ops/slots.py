"""Which modules are regularizer slots, and the mode a model is run in for a look at it.

A *slot* is an existing regularizer module of a model (regsurgery's, timm's ``DropPath`` /
``DropBlock2d`` with ``drop_prob``, torchvision's ``StochasticDepth`` / ``DropBlock2d`` with ``p``)
whose rate a plan may set. Third-party classes are recognised by class name so that neither library
has to be imported; this is the one place that knows those names.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Optional

from torch import nn

from .drop import DropBlock2d, DropBlock3d, DropPath, RegularizerModule
from .dropout import Dropout

__all__ = ["is_drop_path_slot", "rate_attr", "slot_kind", "training_flags"]


def _drop_path_name(name: str) -> bool:
    return name in ("DropPath", "StochasticDepth") or name.endswith("DropPath")


def is_drop_path_slot(module: nn.Module) -> bool:
    """True for an existing stochastic-depth module: regsurgery's, timm's, torchvision's or alike."""
    if isinstance(module, RegularizerModule):
        return type(module).__name__ == "DropPath"
    return _drop_path_name(type(module).__name__)


def rate_attr(module: nn.Module) -> str:
    """The attribute holding a slot's rate: ``drop_prob`` (timm) or ``p`` (everyone else)."""
    return "drop_prob" if hasattr(module, "drop_prob") else "p"


def slot_kind(module: nn.Module, include_existing: bool = True) -> Optional[tuple[str, str]]:
    """(kind, rate attribute) of a regularizer module, None for anything else."""
    if isinstance(module, DropPath):
        return "drop_path", "p"
    if isinstance(module, (DropBlock2d, DropBlock3d)):
        return "drop_block", "p"
    if isinstance(module, Dropout):
        return "dropout", "p"
    if not include_existing or isinstance(module, RegularizerModule):
        return None
    attr = rate_attr(module)
    value = getattr(module, attr, None)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    name = type(module).__name__
    if _drop_path_name(name):
        return "drop_path", attr
    if name.startswith("DropBlock"):
        return "drop_block", attr
    return None


@contextlib.contextmanager
def training_flags(module: nn.Module, training: bool) -> Iterator[None]:
    """Run with every module's ``training`` flag set to ``training``; afterwards each module gets
    its own flag back (a model in train mode with frozen eval-mode BatchNorms stays so)."""
    saved = [(m, m.training) for m in module.modules() if m.training != training]
    try:
        for m, _ in saved:
            m.training = training
        yield
    finally:
        for m, flag in saved:
            m.training = flag
