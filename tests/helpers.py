"""Shared test helpers: the architecture groups and small functions the tests import.

Fixtures live in ``conftest.py``; this is a plain module. ``tests/`` has no ``__init__.py``, so
pytest's default ``prepend`` import mode puts it on ``sys.path`` and ``from helpers import ...``
works in the tests and in ``conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MULTIMODAL = ("llava", "qwen2_vl", "qwen2_5_vl")
TEXT_ONLY = ("llama", "qwen2", "mistral")


def split_for(model_type: str, data: dict[str, Path], name: str) -> Path:
    """The multimodal split for a multimodal model, else its text-only copy."""
    return data[name] if model_type in MULTIMODAL else data[f"{name}-text"]


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A writable copy of a (read-only) session checkpoint."""
    shutil.copytree(source, target)
    return target
