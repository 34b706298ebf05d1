"""Session fixtures: tiny checkpoints of every registered architecture and small data splits.

Checkpoints are built offline from transformers configs (``kvwctl.testing``) and saved in several
shards, so every test that reads or writes weights crosses shard boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import MULTIMODAL, TEXT_ONLY, invoke

from kvwctl.testing import build_checkpoint, write_samples


@pytest.fixture(autouse=True)
def hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's fingerprint hash cache in a temporary directory, never the user's ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "kvw-cache"
    monkeypatch.setenv("KVW_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model_type -> a tiny checkpoint in the Hub on-disk layout (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {model_type: build_checkpoint(model_type, root / model_type) for model_type in (*MULTIMODAL, *TEXT_ONLY)}


@pytest.fixture(scope="session")
def module_layout_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same models (same seed) saved with the transformers 5 module-tree key names."""
    root = tmp_path_factory.mktemp("module-layout")
    return {model_type: build_checkpoint(model_type, root / model_type, layout="module") for model_type in MULTIMODAL}


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """forget/retain splits with images (multimodal) and text-only copies."""
    root = tmp_path_factory.mktemp("data")
    splits = {
        "forget": write_samples(root / "forget.jsonl", count=5, with_images=True),
        "retain": write_samples(root / "retain.jsonl", count=8, with_images=True, offset=5),
    }
    for name in ("forget", "retain"):
        records = [json.loads(line) for line in splits[name].read_text().splitlines()]
        text_path = root / f"{name}-text.jsonl"
        text_path.write_text("".join(json.dumps(record) + "\n" for record in records if "image" not in record))
        splits[f"{name}-text"] = text_path
    return splits


@pytest.fixture(scope="session")
def accessor(checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An accessor of the tiny qwen2 checkpoint (text splits, forget batch 1), made through the CLI."""
    root = tmp_path_factory.mktemp("qwen2-accessor")
    for split in ("forget", "retain"):
        result = invoke(
            "profile", "--model", checkpoints["qwen2"], "--data", data[f"{split}-text"], "--split", split,
            "--out", root / f"{split}.safetensors",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    out = root / "accessor.safetensors"
    result = invoke(
        "accessor", "--forget", root / "forget.safetensors", "--retain", root / "retain.safetensors", "--out", out
    )
    assert result.exit_code == 0, result.output
    return out
