"""The user errors of kvwctl and the one rule for exit codes.

Stage modules raise these; ``kvwctl.cli`` catches them in a single place and prints
``Error: <message>`` plus the hint as plain text (never as Rich markup: a message may contain
``[splits]`` or a path with brackets), then exits with ``exit_code_for(error)``. No traceback is
shown unless ``--debug``.

The rule, followed by every command:

====  =====================================================================================
code  meaning
====  =====================================================================================
0     success
1     bad input file or failed check: a data file, kvw.toml, a stage file or a checkpoint
      that is malformed or does not fit, a failed ``--require``, an existing output
2     usage: a malformed or out-of-range option value (flag or ``KVW_*`` variable), an
      unknown choice, a missing required input, options that contradict each other
130   interrupted (Ctrl-C), also when the interrupt arrives wrapped in another exception
129   hung up (SIGHUP), 128 + the signal number as a shell reports it
143   terminated (SIGTERM), likewise
====  =====================================================================================

SIGTERM and SIGHUP are handled as SIGINT is: while a command runs, the CLI turns them into
:class:`Terminated`, a ``BaseException`` like ``KeyboardInterrupt``, so every ``finally`` and
context manager on the way up runs (staging directories and temporary files are removed) and no
stage code can swallow it with ``except Exception``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SIGNAL_EXIT_BASE = 128  # a process ended by signal N exits 128 + N, as shells report it


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP while a command ran (exit 128 + the signal number)."""

    def __init__(self, signal_number: int) -> None:
        import signal

        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name
        super().__init__(f"received {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_BASE + self.signal_number


class KvwError(Exception):
    """A problem with the user's input or environment that they can fix (exit 1)."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(KvwError):
    """A malformed or out-of-range option value, an unknown choice, a missing required input,
    or options that contradict each other (exit 2)."""

    exit_code = EXIT_USAGE


class DataError(KvwError):
    """A data file is malformed; the message names ``file:line`` and the field."""


class ModelError(KvwError):
    """A checkpoint cannot be resolved, is unsupported, or does not fit the other inputs."""


class ArtifactError(KvwError):
    """A stage file (profile, accessor) has the wrong format, shapes or model fingerprint."""


class VerificationError(KvwError):
    """``kvwctl verify`` found a checkpoint that differs from its manifest or from the edit it claims."""


def interruption(error: BaseException) -> KeyboardInterrupt | Terminated | None:
    """The ``KeyboardInterrupt`` or :class:`Terminated` that ``error`` is or was raised while handling.

    Libraries sometimes catch an interrupt and raise their own error from it (or while it is
    being handled), so the ``__cause__`` / ``__context__`` chain is searched as well.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (KeyboardInterrupt, Terminated)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe(error: BaseException) -> tuple[str, str, str | None]:
    """What the catch site prints for an error with an exit code: (label, message, hint)."""
    cause = interruption(error)
    if isinstance(cause, Terminated):
        return "", f"Terminated ({cause.signal_name}).", None
    if cause is not None:
        return "", "Interrupted.", None
    return "Error:", getattr(error, "message", str(error)), getattr(error, "hint", None)


def exit_code_for(error: BaseException) -> int | None:
    """The exit code for an exception that reached the command line; None for a bug (traceback)."""
    cause = interruption(error)
    if isinstance(cause, Terminated):
        return cause.exit_code
    if cause is not None:
        return EXIT_INTERRUPTED
    if isinstance(error, KvwError):
        return error.exit_code
    return None


TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def termination_signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise ``Terminated``; the previous handlers after.

    Raising (rather than exiting in the handler) unwinds the stack like Ctrl-C does, so every
    ``finally`` removes what it staged. A repeated signal is ignored once the first one has been
    raised, so that the cleanup it started is not itself cut short (SIGKILL still ends the process).
    Signal handlers can only be set from the main thread; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signal_number: int, frame: FrameType | None) -> None:
        for number in TERMINATION_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Terminated(signal_number)

    previous = {number: signal.signal(number, handler) for number in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
