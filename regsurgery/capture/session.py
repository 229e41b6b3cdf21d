"""A tracing session: many block traces for the fixed cost of one.

Every ``torch.fx.Tracer.trace`` call patches ``nn.Module.__call__`` and ``__getattr__`` (class
attribute writes that invalidate the method caches of every ``nn.Module`` subclass loaded) and
re-wraps every function registered with ``torch.fx.wrap`` in the modules that registered it;
then it reverts all of it. Capturing a model block by block pays that once per block, which costs
more than the tracing itself on models with many small blocks.

Inside :func:`tracing_session` those patches are made once: the module-global wrappers stay in
place for the whole session (fx's own wrappers call the original function when no argument is a
Proxy, so real forwards in between are unaffected), and ``nn.Module.__call__`` / ``__getattr__``
are replaced once by dispatchers that route to the wrappers of the trace running now, or to the
original methods between traces. The graphs are the same as without a session
(``tests/test_capture.py`` compares them node by node). Where this torch's fx lacks the private
hooks used here, the session does nothing and every trace patches for itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

from torch import nn

try:  # private fx internals, present since torch 2.0; checked again below
    import torch.fx._symbolic_trace as _st
except ImportError:  # pragma: no cover
    _st = None  # type: ignore[assignment]

__all__ = ["tracing_session", "session_supported"]

_ROUTED = ("__call__", "__getattr__")


def session_supported() -> bool:
    return _st is not None and all(
        hasattr(_st, name) for name in ("_Patcher", "_new_patcher", "_patch_wrapped_functions",
                                        "_orig_module_call", "_orig_module_getattr", "CURRENT_PATCHER")
    )


if session_supported():

    class _SessionPatcher(_st._Patcher):
        """Keeps its patches until the session ends; routes nn.Module's methods per trace."""

        def __init__(self) -> None:
            super().__init__()
            self.current: dict[str, Callable[..., Any]] = {}

        def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
            if cls is nn.Module and name in _ROUTED:
                self.current[name] = new_fn
                return
            super().patch_method(cls, name, new_fn, deduplicate)


_active: Optional[Any] = None


@contextlib.contextmanager
def tracing_session() -> Iterator[None]:
    """Share fx's patching among every trace made inside (re-entrant; a no-op where unsupported)."""
    global _active
    if _active is not None or not session_supported():
        yield
        return
    session = _SessionPatcher()
    orig_call, orig_getattr = _st._orig_module_call, _st._orig_module_getattr
    orig_new_patcher, orig_patch_wrapped = _st._new_patcher, _st._patch_wrapped_functions
    wrapped_once: list[bool] = []

    def dispatch_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        fn = session.current.get("__call__")
        return (fn or orig_call)(mod, *args, **kwargs)

    def dispatch_getattr(mod: nn.Module, name: str) -> Any:
        fn = session.current.get("__getattr__")
        return (fn or orig_getattr)(mod, name)

    @contextlib.contextmanager
    def new_patcher() -> Iterator[Any]:
        prior = _st.CURRENT_PATCHER
        _st.CURRENT_PATCHER = session
        try:
            yield session
        finally:
            session.current.clear()  # between traces modules run their own methods
            _st.CURRENT_PATCHER = prior

    def patch_wrapped_once(patcher: Any) -> None:
        if not wrapped_once:
            orig_patch_wrapped(patcher)
            wrapped_once.append(True)

    _active = session
    nn.Module.__call__ = dispatch_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = dispatch_getattr  # type: ignore[method-assign]
    _st._new_patcher = new_patcher
    _st._patch_wrapped_functions = patch_wrapped_once
    try:
        yield
    finally:
        _st._new_patcher = orig_new_patcher
        _st._patch_wrapped_functions = orig_patch_wrapped
        nn.Module.__call__ = orig_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = orig_getattr  # type: ignore[method-assign]
        while session.patches_made:
            session.patches_made.pop().revert()
        _active = None
