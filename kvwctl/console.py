"""Everything kvwctl shows a person goes to stderr, through this module.

stdout is reserved for machine-readable results (paths, or JSON with ``--json``). Progress bars
are transient and disappear entirely when stderr is not a terminal, so logs from shell pipelines
and CI stay clean. Stage modules never print: they take a ``Tracker`` and call ``track`` on their
long loops; the CLI passes ``RichTracker`` and tests pass nothing (``NullTracker``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

_console: Console | None = None
_quiet = False
_silence_libraries = False


def stderr_console() -> Console:
    """The one stderr console; created on first use, not at import time."""
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False)
    return _console


def set_quiet(quiet: bool) -> None:
    """With ``--quiet`` only errors reach stderr: no messages, tables or progress bars."""
    global _quiet
    _quiet = quiet


def info(message: str) -> None:
    """A message for the person at the terminal (stderr; silenced by ``--quiet``).

    Plain text, never Rich markup: messages hold paths, and a path may contain ``[/]``.
    """
    if not _quiet:
        from rich.text import Text

        stderr_console().print(Text(message))


def error(message: str, *, hint: str | None = None, label: str = "Error:") -> None:
    """An error and its hint on stderr, shown even with ``--quiet``.

    Printed as plain text, never parsed as Rich markup: messages hold paths and TOML names such
    as ``[splits]`` that markup would swallow (or fail on, for ``[/]``).
    """
    from rich.text import Text

    stderr = stderr_console()
    line = Text.assemble((label, "bold red"), " ", message) if label else Text(message)
    stderr.print(line, soft_wrap=True, highlight=False)
    if hint:
        stderr.print(Text(f"Hint: {hint}"), soft_wrap=True, highlight=False)


def show(renderable: object) -> None:
    """A Rich table or other renderable on stderr (silenced by ``--quiet``)."""
    if not _quiet:
        stderr_console().print(renderable)


def show_inputs(title: str, values: dict[str, Any]) -> None:
    """The resolved inputs of a command, as a table on stderr."""
    from kvwctl.tables import inputs_table

    show(inputs_table(title, values))


def set_library_output(show: bool) -> None:
    """Whether transformers may print its own progress bars and warnings (the CLI: ``--debug``)."""
    global _silence_libraries
    _silence_libraries = not show


def quiet_transformers() -> None:
    """Called where transformers is loaded: keep its bars and warnings off stderr if asked to."""
    if _silence_libraries:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()


class Tracker(Protocol):
    """What a stage needs to report progress on a long loop."""

    def track(self, items: Iterable[T], *, total: int, description: str) -> Iterator[T]: ...


class NullTracker:
    """Reports nothing; the default for library use and tests."""

    def track(self, items: Iterable[T], *, total: int, description: str) -> Iterator[T]:
        yield from items


class RichTracker:
    """Transient Rich progress bars on stderr, shown only when stderr is a terminal."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def track(self, items: Iterable[T], *, total: int, description: str) -> Iterator[T]:
        task = self._progress.add_task(description, total=total)
        try:
            for item in items:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)


@contextmanager
def progress_tracker() -> Iterator[Tracker]:
    """A tracker whose bars live for the duration of the ``with`` block."""
    console = stderr_console()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=_quiet or not console.is_terminal,
    )
    with progress:
        yield RichTracker(progress)
