"""Paths on stderr are shown one way: relative to the working directory under it, else absolute."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import invoke

from kvwctl.console import shown_path


def test_shown_path_is_relative_under_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert shown_path(Path("kvw-run/a.safetensors")) == "kvw-run/a.safetensors"
    assert shown_path(tmp_path / "kvw-run" / "a.safetensors") == "kvw-run/a.safetensors"
    assert shown_path(Path("sub/../b.json")) == "b.json"
    assert shown_path(tmp_path) == "."
    assert shown_path(Path("/elsewhere/x.json")) == "/elsewhere/x.json"
    assert shown_path(Path("../up.json")) == str(tmp_path.parent / "up.json")


def test_kvw_toml_paths_and_flag_paths_look_the_same(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kvw.toml makes its paths absolute and a flag gives them relative: stderr shows both relative."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "retain.jsonl").write_bytes(data["retain-text"].read_bytes())
    (tmp_path / "kvw.toml").write_text(f'model = "{checkpoints["qwen2"]}"\n[splits]\nretain = "retain.jsonl"\n')
    result = invoke("profile", "--split", "retain", "--dry-run")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1] for line in result.stderr.splitlines()[1:] if len(line.split()) == 2}
    assert rows["data"] == "retain.jsonl" and rows["out"] == "kvw-run/profile-retain.safetensors"
    flagged = invoke(
        "profile", "--split", "retain", "--data", "retain.jsonl", "--out", "kvw-run/p.safetensors", "--dry-run"
    )
    assert flagged.exit_code == 0, flagged.output
    rows = {line.split()[0]: line.split()[1] for line in flagged.stderr.splitlines()[1:] if len(line.split()) == 2}
    assert rows["data"] == "retain.jsonl" and rows["out"] == "kvw-run/p.safetensors"
