"""Shared test helpers: the architecture groups and small functions the tests import.

Fixtures live in ``conftest.py``; this is a plain module. ``tests/`` has no ``__init__.py``, so
pytest's default ``prepend`` import mode puts it on ``sys.path`` and ``from helpers import ...``
works in the tests and in ``conftest.py``.
"""

from __future__ import annotations

import hashlib
import os
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


def hub_snapshot(checkpoint: Path, cache: Path, *, repo: str = "kvw-tests/tiny", commit: str = "0" * 40) -> Path:
    """``checkpoint`` laid out as huggingface_hub caches it under ``cache``:
    ``models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(checkpoint.iterdir()):
        content = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot
