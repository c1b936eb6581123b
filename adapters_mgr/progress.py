"""Progress reports that keep logs readable: a live bar on a terminal, a few plain lines elsewhere.

Why: a tqdm bar redraws itself with ``\\r`` on every step. On a terminal that is one line updated in
place, but in a log file, a CI job or ``| tee`` every redraw is kept, and the MovieLens demo's log was
60 KB of them. So every progress report of the package goes through :func:`progress_bar`, which
gives a tqdm bar only when its stream is a terminal (or a notebook), and otherwise a
:class:`LineProgress` that prints one line every ``ADAPTERS_MGR_PROGRESS_EVERY`` seconds (10 by
default) and one at the end.

``ADAPTERS_MGR_PROGRESS`` forces a mode: ``bar``, ``lines`` or ``off`` (``auto`` by default).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Protocol

MODES = ("auto", "bar", "lines", "off")
DEFAULT_EVERY_S = 10.0


class Progress(Protocol):
    """What callers use of a progress report (tqdm's names, so a tqdm bar is one)."""

    def __iter__(self) -> Iterator[Any]: ...
    def update(self, n: float = 1) -> Any: ...
    def set_postfix(self, **values: Any) -> Any: ...
    def close(self) -> Any: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> Any: ...


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineProgress:
    """A progress report for logs: a whole line at most every ``every`` seconds, and one at the end.

    Never writes ``\\r``; a run shorter than ``every`` writes exactly one line. ``clock`` is
    injectable so the cadence can be tested without sleeping.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", stream: IO[str] | None = None, every: float = DEFAULT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream
        self.every, self.clock = every, clock
        self.n = 0.0
        self.postfix = ""
        self.started = self.last_line = clock()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_line >= self.every:
            self._write(self._running(now))
            self.last_line = now

    def set_postfix(self, **values: Any) -> None:
        """Shown on the next line written (tqdm redraws at once; a log need not)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._write(self._final(self.clock()))

    def _count(self) -> str:
        n = f"{self.n:g}"
        return f"{n}/{self.total} {self.unit}" if self.total else f"{n} {self.unit}"

    def _running(self, now: float) -> str:
        elapsed = now - self.started
        parts = [self._count()]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{duration(elapsed)} elapsed")
        if self.total and self.n > 0:
            parts.append(f"~{duration(elapsed * (self.total - self.n) / self.n)} left")
        return self._line(parts)

    def _final(self, now: float) -> str:
        elapsed = now - self.started
        rate = f" ({self.n / elapsed:.3g} {self.unit}/s)" if elapsed > 0 and self.n else ""
        return self._line([f"{self._count()} in {duration(elapsed)}{rate}"])

    def _line(self, parts: list[str]) -> str:
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr  # looked up late: tests and tools swap sys.stderr
        print(line, file=stream, flush=True)


class _Off:
    """A disabled report: iterates, counts nothing, writes nothing."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float = 1) -> None:
        return None

    def set_postfix(self, **values: Any) -> None:
        return None

    def close(self) -> None:
        return None


def _in_notebook() -> bool:
    """A Jupyter kernel: its output widget updates in place although its stream is not a tty."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return bool(get and type(get()).__name__ == "ZMQInteractiveShell")


def mode(stream: IO[str] | None = None) -> str:
    """``bar``, ``lines`` or ``off``: forced by ``ADAPTERS_MGR_PROGRESS``, else by what ``stream`` is."""
    forced = os.environ.get("ADAPTERS_MGR_PROGRESS", "auto").strip().lower() or "auto"
    if forced not in MODES:
        forced = "auto"
    if forced != "auto":
        return forced
    stream = stream or sys.stderr
    is_tty = getattr(stream, "isatty", None)
    return "bar" if (is_tty is not None and is_tty()) or _in_notebook() else "lines"


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("ADAPTERS_MGR_PROGRESS_EVERY", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, leave: bool = True,
                 stream: IO[str] | None = None) -> Progress:
    """A progress report over ``iterable`` (or updated by hand with ``update(n)``), used as tqdm is.

    ``leave=False`` clears a terminal bar when it is done (a log keeps its final line: the log is the
    record). Wrap a DataLoader in a generator first: tqdm calls ``iter()`` on what it wraps when
    created, and every ``iter()`` of a seeded DataLoader draws a new order.
    """
    chosen = mode(stream) if enabled else "off"
    if chosen == "off":
        return _Off(iterable)
    if chosen == "lines":
        return LineProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, every=_every())
    from tqdm.auto import tqdm  # only when a bar is drawn

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream)


__all__ = ["LineProgress", "Progress", "duration", "mode", "progress_bar"]
