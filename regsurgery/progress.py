"""Progress bars on stderr, drawn by tqdm.

Drawn only where someone can see it: when the stream is a TTY, or when forced (``force=True`` or
``REGSURGERY_PROGRESS=1``; ``REGSURGERY_PROGRESS=0`` turns it off everywhere). Nothing is drawn for
work that ends within ``delay`` seconds. When not drawing, the bar prints nothing, or one final
line if ``summary=True`` (useful in logs). A failed step erases the bar so that the error message
stands alone::

    with Progress(total=4, desc="export") as bar:
        bar.step("tracing")      # sets the status, advances after the previous step
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any, Optional

from tqdm import tqdm

__all__ = ["Progress", "progress_enabled"]

_FORMAT = "{desc} [{bar:24}] {n_fmt}/{total_fmt} {postfix} {elapsed}"
_FORMAT_UNKNOWN = "{desc} {n_fmt} {postfix} {elapsed}"


def progress_enabled(stream: Optional[IO[str]] = None, force: Optional[bool] = None) -> bool:
    """Should a bar be drawn on ``stream``? ``force`` wins, then ``REGSURGERY_PROGRESS``, then isatty."""
    if force is not None:
        return bool(force)
    env = os.environ.get("REGSURGERY_PROGRESS", "").strip().lower()
    if env in ("1", "true", "yes", "on", "always"):
        return True
    if env in ("0", "false", "no", "off", "never"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or fake stream
        return False


class Progress:
    """A one-line bar, ``desc [#####-----] 3/6 step-name 00:01``; a context manager and iterable.

    Args:
        iterable: optional iterable to wrap; iterating the bar yields its items and advances.
        total: number of steps (taken from ``len(iterable)`` when possible).
        desc: label printed first.
        stream: where to draw (default ``sys.stderr``).
        force: draw even when the stream is not a TTY (``False``: never draw).
        delay: seconds of work before anything is drawn.
        summary: when not drawing, print one final line on close.
    """

    def __init__(
        self,
        iterable: Optional[Iterable[Any]] = None,
        total: Optional[int] = None,
        desc: str = "",
        *,
        stream: Optional[IO[str]] = None,
        force: Optional[bool] = None,
        delay: float = 0.5,
        summary: bool = False,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(self.stream, force)
        self.summary = summary
        self.n = 0
        self.status = ""
        self._steps_started = False
        self._bar = tqdm(
            total=total, desc=desc, file=self.stream, disable=not self.enabled, delay=delay,
            ascii=" #", dynamic_ncols=False, ncols=100, leave=True,
            bar_format=_FORMAT if total is not None else _FORMAT_UNKNOWN,
        )

    def update(self, n: int = 1, status: Optional[str] = None) -> None:
        """Advance by ``n`` steps (and optionally set the status text)."""
        self.n += n
        if status is not None:
            self.set_status(status)
        self._bar.update(n)

    def set_status(self, status: str) -> None:
        self.status = status
        self._bar.set_postfix_str(status, refresh=True)

    def step(self, status: str) -> None:
        """Start a named step: the previous step (if any) counts as done."""
        if self._steps_started:
            self.update(1)
        self._steps_started = True
        self.set_status(status)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Progress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        except BaseException:
            self.close(failed=True)
            raise
        self.close()

    def close(self, failed: bool = False) -> None:
        if self._bar.disable:
            if self.summary and not failed and not self.enabled:
                total = self.total if self.total is not None else self.n
                self.stream.write(f"{self.desc} [{'#' * 24}] {self.n}/{total} {self.status}\n")
                self.stream.flush()
            self._bar.disable = True
            self._bar.close()
            return
        if failed:
            self._bar.leave = False  # erase: the error message stands alone
        elif self._steps_started and self.total is not None and self.n < self.total:
            self._bar.update(self.total - self.n)
            self.n = self.total
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)
