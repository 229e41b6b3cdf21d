"""The check a patch passes before ``apply_*`` returns: one train-mode forward of the example.

A patched block's train forward is compiled from a capture specialized on the example call; a
forward that the specialization got wrong would fail at the first train step, far from its cause.
:func:`check_train_forward` runs the model once in train mode (no grad, RNG state and buffers such
as BatchNorm statistics restored, training flags restored) and, if it fails, names the block.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..capture.inline import call_forward, default_example

__all__ = ["PatchCheckError", "check_train_forward"]

_GENERATED = re.compile(r"<regsurgery train forward of (.*) #\d+>")


class PatchCheckError(RuntimeError):
    """A patched block's train-mode forward failed on the example inputs."""

    def __init__(self, message: str, scope: Optional[str]) -> None:
        super().__init__(message)
        self.scope = scope


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index for b, _ in buffers if b.device.type == "cuda"} |
                     {p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for b, saved in buffers:
            b.copy_(saved)
        for m, flag in flags:
            m.training = flag


def _failing_scope(exc: BaseException) -> Optional[str]:
    tb = exc.__traceback__
    scope = None
    while tb is not None:  # the innermost generated frame is the block that failed
        m = _GENERATED.fullmatch(tb.tb_frame.f_code.co_filename)
        if m:
            scope = "" if m.group(1) == "root" else m.group(1)
        tb = tb.tb_next
    if scope is None:
        m = re.search(r"block (\S+) \(", str(exc))
        scope = m.group(1) if m else None
    return scope


def check_train_forward(model: nn.Module, example_inputs: Any) -> bool:
    """Run ``model`` once in train mode on ``example_inputs`` (or its ``dummy_inputs``); raise
    :class:`PatchCheckError` naming the block whose patched forward fails. False if there is no
    example to run."""
    if example_inputs is None:
        example_inputs = default_example(model)
    if example_inputs is None:
        return False
    with _restored(model):
        model.train()
        try:
            call_forward(model, example_inputs)
        except Exception as exc:
            scope = _failing_scope(exc)
            where = f"block {scope or '<root>'}" if scope is not None else "a block"
            raise PatchCheckError(
                f"regsurgery: the patched train-mode forward of {where} fails on the example inputs "
                f"({type(exc).__name__}: {str(exc).strip()[:300]}); the patch was refused and the model "
                "left as it was. Exclude that block (exclude=...) or pass example_inputs like the "
                "training call", scope) from exc
    return True
