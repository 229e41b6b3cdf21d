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
from typing import Any, Callable

__all__ = ["new_forward", "set_template"]

_counter = itertools.count()
_NAME = re.compile(r"^_([a-z_]+)__\d+$")
_templates: dict[str, Callable[..., Any]] = {}


def set_template(fn: Callable[..., Any], kind: str = "patched_forward") -> None:
    """The function every per-block forward of ``kind`` is a copy of (``patched_forward``: the
    rewritten train forward; ``layerdrop_forward``: the LayerDrop wrapper)."""
    _templates[kind] = fn


def _make(name: str) -> Callable[..., Any]:
    m = _NAME.match(name)
    template = _templates.get(m.group(1)) if m else None
    if template is None:
        raise RuntimeError(f"no forward template for {name!r}: import regsurgery first")
    code = template.__code__
    changes: dict[str, Any] = {"co_name": name}
    if hasattr(code, "co_qualname"):
        changes["co_qualname"] = name
    fn = types.FunctionType(code.replace(**changes), template.__globals__, name)
    fn.__module__ = __name__
    fn.__qualname__ = name
    globals()[name] = fn
    return fn


def new_forward(kind: str = "patched_forward") -> Callable[..., Any]:
    """A forward function of ``kind`` with a name (and code object) not used yet in this process."""
    while True:
        name = f"_{kind}__{next(_counter)}"
        if name not in globals():
            return _make(name)


def __getattr__(name: str) -> Any:
    m = _NAME.match(name)
    if m and m.group(1) in _templates:
        return _make(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
