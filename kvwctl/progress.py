"""Progress on long loops: Rich bars on a terminal, plain lines in a log, nothing with ``--quiet``.

A stage takes a ``Tracker`` and wraps each long loop in ``track``, saying how many units the loop
covers in all (samples, shards) and how many each item holds; a model load goes in ``status``:

    with tracker.status(f"Loading {reference}"):
        loaded = load_model(checkpoint, device=device, dtype=dtype)
    for batch in tracker.track(batches, total=len(samples), description="profile retain",
                               unit="samples", size=len):
        ...

On a terminal (stderr is a TTY) ``RichTracker`` shows a transient bar per loop (description, bar,
``M/N unit``, rate, elapsed time and ETA) and a transient spinner while a model loads. When stderr
is not a terminal it writes a plain line at most every ``KVW_PROGRESS_INTERVAL`` seconds (10 by
default; 0 writes one after every item) and one when the loop ends, and ``Loading <model>`` once:

    profile retain: 96/252 samples (38%), 3.1 samples/s, elapsed 0:00:31, ETA 0:00:50

The lines are records of the ``kvwctl.progress`` logger, so ``--log-file`` gets them too (also
when the bars are on the terminal); ``--quiet`` shows none on stderr. Library code and tests pass
nothing and get ``NullTracker``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, TypeVar

from kvwctl.errors import UsageError

if TYPE_CHECKING:
    from rich.progress import Progress, Task
    from rich.text import Text

T = TypeVar("T")

INTERVAL_VARIABLE = "KVW_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between two plain progress lines
PROGRESS_LOGGER = logging.getLogger("kvwctl.progress")
_logger = logging.getLogger("kvwctl")


class Tracker(Protocol):
    """What a stage needs to report progress on a long loop and on a model load."""

    def track(
        self,
        items: Iterable[T],
        *,
        total: int,
        description: str,
        unit: str = "items",
        size: Callable[[T], int] | None = None,
    ) -> Iterator[T]:
        """Yield ``items``; ``total`` units in all, ``size(item)`` units per item (default 1)."""
        ...

    def status(self, description: str) -> AbstractContextManager[None]:
        """Something slow without a count (loading a model), shown while the block runs."""
        ...


class NullTracker:
    """Reports nothing; the default for library use and tests."""

    def track(
        self,
        items: Iterable[T],
        *,
        total: int,
        description: str,
        unit: str = "items",
        size: Callable[[T], int] | None = None,
    ) -> Iterator[T]:
        yield from items

    @contextmanager
    def status(self, description: str) -> Iterator[None]:
        yield


def progress_interval(environment: dict[str, str] | None = None) -> float:
    """Seconds between plain progress lines: ``KVW_PROGRESS_INTERVAL``, else 10."""
    text = (os.environ if environment is None else environment).get(INTERVAL_VARIABLE)
    if text is None:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{INTERVAL_VARIABLE} must be a number of seconds, at least 0, got {text!r}")
    return value


def _clock_text(seconds: float) -> str:
    """``H:MM:SS``, as Rich's time columns show it."""
    return str(timedelta(seconds=int(seconds)))


def _rate_text(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


def progress_line(description: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``profile retain: 96/252 samples (38%), 3.1 samples/s, elapsed 0:00:31, ETA 0:00:50``.

    The percentage is rounded down (100% only when done); rate and ETA are left out until they
    are known (nothing done yet, or no time elapsed), and the ETA once the loop is done.
    """
    percent = f" ({100 * done // total}%)" if total > 0 else ""
    parts = [f"{description}: {done}/{total} {unit}{percent}"]
    rate = done / elapsed if done > 0 and elapsed > 0 else None
    if rate is not None:
        parts.append(f"{_rate_text(rate)} {unit}/s")
    parts.append(f"elapsed {_clock_text(elapsed)}")
    if rate is not None and done < total:
        parts.append(f"ETA {_clock_text((total - done) * elapsed / done)}")  # at the rate so far
    return ", ".join(parts)


class _PlainLines:
    """The plain progress lines of one loop: at most one per ``interval``, and one at the end."""

    def __init__(self, description: str, total: int, unit: str, interval: float, clock: Callable[[], float]) -> None:
        self._description, self._total, self._unit = description, total, unit
        self._interval, self._clock = interval, clock
        self._start = self._last = clock()
        self._done, self._reported = 0, -1

    def advance(self, amount: int) -> None:
        self._done += amount
        now = self._clock()
        if now - self._last >= self._interval:
            self._report(now)

    def finish(self) -> None:
        if self._reported != self._done:
            self._report(self._clock())

    def _report(self, now: float) -> None:
        line = progress_line(self._description, self._done, self._total, self._unit, now - self._start)
        PROGRESS_LOGGER.info(line)
        self._last, self._reported = now, self._done


def _rate_column() -> type:
    """A Rich column ``3.1 samples/s`` (Rich's own speed column is for bytes)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            unit = task.fields.get("unit", "items")
            return Text(f"{_rate_text(speed)} {unit}/s" if speed else f"? {unit}/s", style="progress.data.speed")

    return RateColumn


class RichTracker:
    """Bars and a spinner on a terminal (``show_bars``), plain progress records always.

    Each loop gets its own transient ``Progress`` (a loop inside a loop adds a bar to it), so a
    spinner can run between loops: Rich allows one live display at a time.
    """

    def __init__(self, *, show_bars: bool, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._show_bars, self._interval, self._clock = show_bars, interval, clock
        self._progress: Progress | None = None

    def track(
        self,
        items: Iterable[T],
        *,
        total: int,
        description: str,
        unit: str = "items",
        size: Callable[[T], int] | None = None,
    ) -> Iterator[T]:
        lines = _PlainLines(description, total, unit, self._interval, self._clock)
        with self._bar(description, total, unit) as advance:
            for item in items:
                yield item
                amount = 1 if size is None else size(item)
                advance(amount)
                lines.advance(amount)
        lines.finish()

    @contextmanager
    def status(self, description: str) -> Iterator[None]:
        PROGRESS_LOGGER.info(description)
        start = self._clock()
        if self._show_bars and self._progress is None:
            from kvwctl.console import stderr_console

            with stderr_console().status(description):
                yield
        else:
            yield
        _logger.debug(f"{description}: done in {self._clock() - start:.2f} s")

    @contextmanager
    def _bar(self, description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        if not self._show_bars:
            yield lambda amount: None
            return
        owner = self._progress is None
        progress = self._progress = self._progress or _new_progress()
        if owner:
            progress.start()
        task = progress.add_task(description, total=total, unit=unit)
        try:
            yield lambda amount: progress.advance(task, amount)
        finally:
            progress.remove_task(task)
            if owner:
                progress.stop()
                self._progress = None


def _new_progress() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from kvwctl.console import stderr_console

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        _rate_column()(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
        redirect_stdout=False,  # stdout carries results; never draw them through the stderr console
    )


def rich_tracker() -> RichTracker:
    """The CLI's tracker: bars when stderr is a terminal and not ``--quiet``; the interval checked."""
    from kvwctl import console

    interval = progress_interval()
    return RichTracker(show_bars=not console.is_quiet() and console.stderr_console().is_terminal, interval=interval)
