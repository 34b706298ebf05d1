"""Shared test helpers: the architecture groups and small functions the tests import.

Fixtures live in ``conftest.py``; this is a plain module. ``tests/`` has no ``__init__.py``, so
pytest's default ``prepend`` import mode puts it on ``sys.path`` and ``from helpers import ...``
works in the tests and in ``conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner, Result

from kvwctl.cli import app

MULTIMODAL = ("llava", "qwen2_vl", "qwen2_5_vl")
TEXT_ONLY = ("llama", "qwen2", "mistral")


def split_for(model_type: str, data: dict[str, Path], name: str) -> Path:
    """The multimodal split for a multimodal model, else its text-only copy."""
    return data[name] if model_type in MULTIMODAL else data[f"{name}-text"]


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A writable copy of a (read-only) session checkpoint."""
    shutil.copytree(source, target)
    return target


def invoke(*args: str | Path) -> Result:
    """Run ``kvwctl ARGS`` in-process (stdout and stderr kept apart)."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def expect_error(result: Result, message: str, exit_code: int = 1) -> None:
    """A user error as a pipeline sees it: the exit code, ``Error: …`` with ``message`` on stderr,
    no traceback, nothing on stdout."""
    assert result.exit_code == exit_code, result.output
    assert "Error: " in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
