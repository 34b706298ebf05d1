"""Everything kvwctl shows a person goes to stderr, through this module and the ``kvwctl`` logger.

stdout is reserved for machine-readable results (paths, or JSON with ``--json``). Messages
(``info``, ``error``, ``debug``), tables (``show``) and progress lines (``kvwctl.progress``) are
records of the stdlib ``logging`` logger ``kvwctl``. While a command runs, ``session`` routes them:

* to stderr, through a Rich handler that prints them as plain text (no time, level or path
  columns; an error's label in bold red, never wrapped, its hint below): INFO and up by default,
  DEBUG with ``-v/--verbose`` (the command's arguments, timings), warnings and errors only with
  ``-q/--quiet``. Plain progress lines reach stderr only when it is not a terminal (on a
  terminal the bars of ``kvwctl.progress`` show instead).
* with ``--log-file PATH``, to that file (appended): every record at DEBUG level with a
  timestamp, tables as plain text, the plain progress lines, and the libraries' warnings.

Library warnings are captured too: Python ``warnings`` (``logging.captureWarnings``) reach
stderr unless ``--quiet``; the ``transformers`` and ``huggingface_hub`` loggers reach stderr only
with ``--verbose`` or ``--debug`` (as before: their chatter is not for the person at the
terminal), and the log file always. Stage modules never print: they take a ``Tracker``
(``kvwctl.progress``) and raise errors.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.errors import KvwError

if TYPE_CHECKING:
    from rich.console import Console, ConsoleRenderable
    from rich.logging import RichHandler

    from kvwctl.progress import Tracker

LOGGER = logging.getLogger("kvwctl")
PROGRESS_LOGGER_NAME = "kvwctl.progress"
LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "accelerate")  # shown on stderr with --verbose or --debug
WARNINGS_LOGGER = "py.warnings"  # where logging.captureWarnings sends Python warnings
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_console: Console | None = None
_quiet = False
_show_library_output = False


def stderr_console() -> Console:
    """The one stderr console; created on first use, not at import time."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False)
    return _console


def is_quiet() -> bool:
    return _quiet


def info(message: str) -> None:
    """A message for the person at the terminal (stderr; silenced by ``--quiet``).

    Plain text, never Rich markup: messages hold paths, and a path may contain ``[/]``.
    """
    LOGGER.info(message)


def debug(message: str) -> None:
    """A detail shown with ``-v/--verbose`` and written to ``--log-file``."""
    LOGGER.debug(message)


def error(message: str, *, hint: str | None = None, label: str = "Error:") -> None:
    """An error (or, with ``label="Warning:"``, a warning) and its hint, shown even with ``--quiet``.

    Printed as plain text, never parsed as Rich markup: messages hold paths and TOML names such
    as ``[splits]`` that markup would swallow (or fail on, for ``[/]``).
    """
    level = logging.WARNING if label == "Warning:" else logging.ERROR
    LOGGER.log(level, message, extra={"label": label, "hint": hint})


def show(renderable: object) -> None:
    """A Rich table or other renderable on stderr (silenced by ``--quiet``)."""
    LOGGER.info("%s", type(renderable).__name__, extra={"renderable": renderable})


def shown_path(path: Path) -> str:
    """How a path is shown on stderr, the same way everywhere: relative to the working directory
    when it lies under it (``kvw-run/accessor.safetensors``), else absolute. stdout keeps paths
    as the command received or made them, for scripts."""
    import os

    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return str(absolute)


def show_inputs(title: str, values: dict[str, Any]) -> None:
    """The resolved inputs of a command, as a table on stderr."""
    from kvwctl.tables import inputs_table

    show(inputs_table(title, values))


def plain_text(record: logging.LogRecord) -> str:
    """A record's message as one plain text: the label and hint of an error, a table rendered."""
    renderable = getattr(record, "renderable", None)
    if renderable is not None:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=120, color_system=None, highlight=False).print(renderable)
        return "".join("\n" + line.rstrip() for line in buffer.getvalue().rstrip().splitlines())
    label, hint = getattr(record, "label", ""), getattr(record, "hint", None)
    text = f"{label} {record.getMessage()}" if label else record.getMessage()
    return f"{text}\nHint: {hint}" if hint else text


class _FileFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg, copy.args = plain_text(record), None
        return super().format(copy)


def _stderr_handler(level: int) -> RichHandler:
    """Records printed as kvwctl always printed its messages (see the module docstring)."""
    from rich.console import Group
    from rich.logging import RichHandler
    from rich.text import Text

    class StderrHandler(RichHandler):
        def emit(self, record: logging.LogRecord) -> None:
            # Errors, progress lines and debug details are never wrapped (a path stays whole, a line
            # one line for logs and grep); other messages and tables wrap to the console as ever.
            whole = hasattr(record, "label") or record.name == PROGRESS_LOGGER_NAME or record.levelno <= logging.DEBUG
            try:
                self.console.print(self.render_message(record, record.getMessage()), soft_wrap=whole)
            except Exception:
                self.handleError(record)

        def render_message(self, record: logging.LogRecord, message: str) -> ConsoleRenderable:
            renderable = getattr(record, "renderable", None)
            if renderable is not None:
                return renderable  # type: ignore[no-any-return]
            label, hint = getattr(record, "label", None), getattr(record, "hint", None)
            if label is None:
                library = not record.name.startswith("kvwctl") and record.name != WARNINGS_LOGGER
                return Text(f"[{record.name}] {message}" if library else message)
            line = Text.assemble((label, "bold red"), " ", message) if label else Text(message)
            return Group(line, *([Text(f"Hint: {hint}")] if hint else []))

    handler = StderrHandler(level, console=stderr_console(), show_time=False, show_level=False, show_path=False)
    handler.addFilter(_stderr_filter)
    return handler


def _stderr_filter(record: logging.LogRecord) -> bool:
    """Plain progress lines only when stderr is not a terminal; file-only records never."""
    if getattr(record, "file_only", False):
        return False
    return not (record.name == PROGRESS_LOGGER_NAME and stderr_console().is_terminal)


class Session:
    """The logging of one command; see ``session``."""

    def __init__(self, *, quiet: bool, verbose: bool, debug: bool) -> None:
        self.handlers: list[logging.Handler] = []
        level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
        self.stderr = _stderr_handler(level)
        self._show_libraries = (verbose or debug) and not quiet
        self._warnings_on_stderr = not quiet
        self._saved: dict[str, tuple[list[logging.Handler], bool, int]] = {}
        # huggingface_hub installs its own stderr handler when imported (a cheap import): do it
        # now, so that the handler is replaced below rather than appear in the middle of the command.
        import huggingface_hub.utils.logging  # noqa: F401

        for name in ("kvwctl", WARNINGS_LOGGER, *LIBRARY_LOGGERS):
            logger = logging.getLogger(name)
            self._saved[name] = (list(logger.handlers), logger.propagate, logger.level)
        self._attach(self.stderr)

    def _wants(self, handler: logging.Handler, name: str) -> bool:
        if handler is not self.stderr or name == "kvwctl":
            return True
        return self._warnings_on_stderr if name == WARNINGS_LOGGER else self._show_libraries

    def _attach(self, handler: logging.Handler) -> None:
        self.handlers.append(handler)
        self.adopt_libraries()

    def adopt_libraries(self) -> None:
        """Our handlers, and only ours, on kvwctl's and the libraries' loggers (called again once
        transformers is imported: it installs its own stderr handler then)."""
        for name in self._saved:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if handler not in self.handlers:
                    logger.removeHandler(handler)
            for handler in self.handlers:
                if self._wants(handler, name) and handler not in logger.handlers:
                    logger.addHandler(handler)
            if not logger.handlers:  # none wanted: not Python's last-resort stderr handler either
                logger.addHandler(logging.NullHandler())
            logger.propagate = False
        logging.getLogger("kvwctl").setLevel(logging.DEBUG)

    def open_log(self, path: Path | None) -> None:
        """Append every record to ``path`` (``--log-file``) from now until the session ends."""
        if path is None:
            return
        if path.is_dir() or not path.parent.is_dir():
            problem = "is a directory" if path.is_dir() else f"is in {path.parent}, which is not a directory"
            raise KvwError(f"--log-file {path} {problem}", hint="pass a file in an existing directory")
        try:
            handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as error:
            raise KvwError(f"cannot open --log-file {path}: {error.strerror}") from error
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(_FileFormatter(FILE_FORMAT))
        self._attach(handler)

    def close(self) -> None:
        for name, (handlers, propagate, level) in self._saved.items():
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate, logger.level = propagate, level
        for handler in self.handlers:
            handler.close()


_session: Session | None = None


@contextmanager
def session(*, quiet: bool, verbose: bool = False, debug: bool = False) -> Iterator[Session]:
    """Route kvwctl's and the libraries' records for one command (the CLI's ``command`` wrapper)."""
    global _session, _quiet, _show_library_output
    saved = (_session, _quiet, _show_library_output)
    _quiet, _show_library_output = quiet, debug
    current = _session = Session(quiet=quiet, verbose=verbose, debug=debug)
    logging.captureWarnings(True)
    start = time.monotonic()
    try:
        yield current
    finally:
        LOGGER.debug(f"finished in {time.monotonic() - start:.2f} s")
        logging.captureWarnings(False)
        current.close()
        _session, _quiet, _show_library_output = saved


def log_traceback(error: BaseException) -> None:
    """The traceback of an error the catch site reports, for ``--log-file`` only (not stderr)."""
    LOGGER.debug("traceback:", exc_info=(type(error), error, error.__traceback__), extra={"file_only": True})


def capture_transformers() -> None:
    """Called where transformers is loaded, during a command: its records go to kvwctl's handlers
    (not its own stderr handler, installed on import); its progress bars are off unless ``--debug``."""
    if _session is None:
        return
    from transformers.utils import logging as transformers_logging

    _session.adopt_libraries()
    if not _show_library_output:
        transformers_logging.disable_progress_bar()


@contextmanager
def progress_tracker() -> Iterator[Tracker]:
    """The CLI's tracker for a command's stage (``kvwctl.progress``)."""
    from kvwctl.progress import rich_tracker

    yield rich_tracker()
