"""A dependency-free progress bar on stderr.

Drawn only where someone can see it: when the stream is a TTY, or when forced (``force=True`` or
``REGSURGERY_PROGRESS=1``; ``REGSURGERY_PROGRESS=0`` turns it off everywhere). Nothing is drawn for
work that ends within ``delay`` seconds, so quick commands stay quiet. When not drawing, the bar
prints nothing, or one final line if ``summary=True`` (useful in logs).

A background ticker redraws the line while a single long step runs (tracing or exporting a large
model is one opaque call), so the elapsed time keeps moving::

    with Progress(total=4, desc="export") as bar:
        bar.step("tracing")      # sets the description, advances after the previous step
        ...
    for item in Progress(items, desc="sites"):
        ...
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, Optional

__all__ = ["Progress", "progress_enabled"]

_SPINNER = "|/-\\"


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


def _fmt_time(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:4.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}:{sec:02d}"


class Progress:
    """A one-line progress bar: ``desc [#####-----] 3/6 step-name 1.2s``.

    Args:
        iterable: optional iterable to wrap; iterating the bar yields its items and advances.
        total: number of steps (taken from ``len(iterable)`` when possible); ``None`` shows a
            spinner instead of a bar.
        desc: label printed first.
        stream: where to draw (default ``sys.stderr``, looked up at construction).
        force: draw even when the stream is not a TTY (``False``: never draw).
        delay: seconds of work before anything is drawn.
        interval: seconds between redraws from the background ticker.
        summary: when not drawing, print one final line on close.
        width: bar width in characters.
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
        interval: float = 0.1,
        summary: bool = False,
        width: int = 24,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(self.stream, force)
        self.delay = delay
        self.interval = interval
        self.summary = summary
        self.width = width
        self.n = 0
        self.status = ""
        self.start = time.monotonic()
        self.closed = False
        self._drawn_width = 0
        self._ticks = 0
        self._steps_started = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name="regsurgery-progress", daemon=True)
            self._thread.start()

    # ----------------------------------------------------------------- public API
    def update(self, n: int = 1, status: Optional[str] = None) -> None:
        """Advance by ``n`` steps (and optionally set the status text)."""
        with self._lock:
            self.n += n
            if status is not None:
                self.status = status
        self._draw()

    def set_status(self, status: str) -> None:
        """Set the text shown after the counter (the step now running)."""
        with self._lock:
            self.status = status
        self._draw()

    def step(self, status: str) -> None:
        """Start a named step: the first call only sets the status, later ones also advance by 1."""
        with self._lock:
            if self._steps_started:
                self.n += 1
            self._steps_started = True
            self.status = status
        self._draw()

    def close(self) -> None:
        """Finish: complete the counter, draw or print the final line once, stop the ticker."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        with self._lock:
            if self._steps_started and self.total is not None:
                self.n = max(self.n, min(self.n + 1, self.total))
            self.status = "done"
        if self.enabled:
            if self._drawn_width:  # a bar was shown: leave it, finished, on its own line
                self._write(self._line(final=True) + "\n", final=True)
        elif self.summary:
            self.stream.write(self._line(final=True) + "\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._abort()
        else:
            self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Progress was created without an iterable to wrap")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        except BaseException:
            self._abort()
            raise
        self.close()

    # ------------------------------------------------------------------ internals
    def _abort(self) -> None:
        """Stop and erase the bar without a success line (the error message follows)."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self.enabled and self._drawn_width:
            self._write("\r" + " " * self._drawn_width + "\r", final=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._ticks += 1
            self._draw()

    def _line(self, final: bool = False) -> str:
        elapsed = _fmt_time(time.monotonic() - self.start)
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(1.0, self.n / self.total)
            filled = int(round(frac * self.width))
            parts.append("[" + "#" * filled + "-" * (self.width - filled) + "]")
            parts.append(f"{min(self.n, self.total)}/{self.total}")
        else:
            parts.append("done" if final else _SPINNER[self._ticks % len(_SPINNER)])
            if self.n:
                parts.append(str(self.n))
        if self.status and not (final and not self.total and self.status == "done"):
            parts.append(self.status)
        parts.append(elapsed)
        return " ".join(parts)

    def _draw(self) -> None:
        if not self.enabled or self.closed:
            return
        if time.monotonic() - self.start < self.delay:
            return
        self._write(self._line())

    def _write(self, text: str, final: bool = False) -> None:
        with self._lock:
            if final and text.endswith("\n"):  # finished line: overwrite the bar, keep it
                body = text[:-1]
                line = "\r" + body + " " * max(0, self._drawn_width - len(body)) + "\n"
            elif final:  # erase sequence, written as is
                line = text
            else:
                line = "\r" + text + " " * max(0, self._drawn_width - len(text))
                self._drawn_width = max(self._drawn_width, len(text))
            try:
                self.stream.write(line)
                self.stream.flush()
            except (ValueError, OSError):  # stream closed under us: progress is best-effort
                self.enabled = False
