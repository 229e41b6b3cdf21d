"""Importable names for the per-block forwards of patched models (so they pickle).

Each patched block gets its own copy of ``rewrite._patched_forward`` (its own code object: dynamo
caches frames per code object). Each copy is an attribute of this module, ``_patched_forward__N``,
and a name that is not there yet is made on first access (PEP 562): pickle stores a block's
``forward`` as ``functools.partial(regsurgery._forwards._patched_forward__N, block)``, and
unpickling in a fresh process finds the name again.
"""

from __future__ import annotations

import itertools
import re
import types
from typing import Any, Callable

_counter = itertools.count()
_NAME = re.compile(r"^_patched_forward__\d+$")


def _make(name: str) -> Callable[..., Any]:
    from .rewrite import _patched_forward

    code = _patched_forward.__code__
    changes: dict[str, Any] = {"co_name": name}
    if hasattr(code, "co_qualname"):
        changes["co_qualname"] = name
    fn = types.FunctionType(code.replace(**changes), _patched_forward.__globals__, name)
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
