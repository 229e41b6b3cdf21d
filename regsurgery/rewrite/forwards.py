"""Importable names for the per-block forwards of patched models (so that they pickle).

Each patched block gets its own copy of the patched-forward template (its own code object: dynamo
caches frames per code object). Each copy is an attribute of this module, ``_patched_forward__N``,
and a name that is not there yet is made on first access (PEP 562): pickle stores a block's
``forward`` as ``functools.partial(regsurgery.rewrite.forwards._patched_forward__N, block)``, and
unpickling in a fresh process finds the name again.

The template is :func:`regsurgery.rewrite.apply._patched_forward`, handed over with
:func:`set_template` when that module is imported (``import regsurgery`` imports it), so that this
module imports nothing of the package.
"""

from __future__ import annotations

import itertools
import re
import types
from typing import Any, Callable, Optional

__all__ = ["new_forward", "set_template"]

_counter = itertools.count()
_NAME = re.compile(r"^_patched_forward__\d+$")
_template: Optional[Callable[..., Any]] = None


def set_template(fn: Callable[..., Any]) -> None:
    """The function every per-block forward is a copy of."""
    global _template
    _template = fn


def _make(name: str) -> Callable[..., Any]:
    if _template is None:
        raise RuntimeError("regsurgery.rewrite.apply is not imported: import regsurgery first")
    code = _template.__code__
    changes: dict[str, Any] = {"co_name": name}
    if hasattr(code, "co_qualname"):
        changes["co_qualname"] = name
    fn = types.FunctionType(code.replace(**changes), _template.__globals__, name)
    fn.__module__ = __name__
    fn.__qualname__ = name
    globals()[name] = fn
    return fn


def new_forward() -> Callable[..., Any]:
    """A forward function with a name (and code object) not used yet in this process."""
    while True:
        name = f"_patched_forward__{next(_counter)}"
        if name not in globals():
            return _make(name)


def __getattr__(name: str) -> Any:
    if _NAME.match(name):
        return _make(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
