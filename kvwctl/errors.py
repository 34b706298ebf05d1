"""The user errors of kvwctl: the one place where they are defined.

Stage modules raise these; ``kvwctl.cli`` catches ``KvwError`` in a single place and prints
``Error: <message>`` plus the hint, then exits with ``exit_code`` (no traceback unless ``--debug``).
"""

from __future__ import annotations


class KvwError(Exception):
    """A problem with the user's input or environment that they can fix.

    ``exit_code`` is 1 for bad input or a failed check and 2 for usage errors (DESIGN §3).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(KvwError):
    """A required input was not given by flag or by ``kvw.toml``, or options contradict."""

    exit_code = 2


class DataError(KvwError):
    """A data file is malformed; the message names ``file:line`` and the field."""


class ModelError(KvwError):
    """A checkpoint cannot be resolved, is unsupported, or does not fit the other inputs."""


class ArtifactError(KvwError):
    """A stage file (profile, accessor) has the wrong format, shapes or model fingerprint."""
