"""Hub ids resolved offline from a cache directory in the layout huggingface_hub uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hub_snapshot

from kvwctl.artifacts import PROFILE_FORMAT, read_artifact

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "kvw-tests/tiny-llava"


def kvwctl(*args: str | Path, cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}
    return subprocess.run(
        [sys.executable, "-m", "kvwctl", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def cache(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub-cache")
    hub_snapshot(checkpoints["llava"], root / "hub", repo=REPO, commit=COMMIT)
    return root / "hub"


def test_hub_id_is_resolved_from_the_cache_offline(cache: Path, data: dict[str, Path], tmp_path: Path) -> None:
    retain = kvwctl(
        "profile",
        "--model",
        REPO,
        "--data",
        data["retain"],
        "--split",
        "retain",
        "--out",
        "r.safetensors",
        cache=cache,
        cwd=tmp_path,
    )
    assert retain.returncode == 0, retain.stderr
    metadata = read_artifact(tmp_path / "r.safetensors", PROFILE_FORMAT).metadata
    assert metadata["model"] == REPO
    assert metadata["model_revision"] == COMMIT
    forget = kvwctl(
        "profile",
        "--model",
        REPO,
        "--revision",
        "main",
        "--data",
        data["forget"],
        "--split",
        "forget",
        "--out",
        "f.safetensors",
        cache=cache,
        cwd=tmp_path,
    )
    assert forget.returncode == 0, forget.stderr
    assert (
        kvwctl(
            "accessor",
            "--forget",
            "f.safetensors",
            "--retain",
            "r.safetensors",
            "--out",
            "a.safetensors",
            cache=cache,
            cwd=tmp_path,
        ).returncode
        == 0
    )
    applied = kvwctl(
        "apply",
        "--model",
        REPO,
        "--accessor",
        "a.safetensors",
        "--layers",
        "1",
        "--out",
        "out",
        "--json",
        cache=cache,
        cwd=tmp_path,
    )
    assert applied.returncode == 0, applied.stderr
    import json

    manifest = json.loads((tmp_path / "out" / "kvw_manifest.json").read_text())
    assert manifest["input_model"]["reference"] == REPO
    assert manifest["input_model"]["revision"] == COMMIT
    # The output holds real files, not links into the cache.
    assert not any(path.is_symlink() for path in (tmp_path / "out").iterdir())


def test_missing_revision_offline_is_a_clear_error(cache: Path, tmp_path: Path) -> None:
    result = kvwctl(
        "apply", "--model", REPO, "--revision", "v2", "--accessor", "a.safetensors", cache=cache, cwd=tmp_path
    )
    assert result.returncode == 1
    assert "is not in the Hub cache and cannot be downloaded (HF_HUB_OFFLINE is set)" in result.stderr
    unknown = kvwctl("apply", "--model", "nobody/nothing", "--accessor", "a.safetensors", cache=cache, cwd=tmp_path)
    assert unknown.returncode == 1 and "Error:" in unknown.stderr
