"""Names read from files stay inside their directory; links only inside the checkpoint or its Hub cache.

Issue 9, class 1: shard names in the index and symlinked files of a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import expect_error, hub_snapshot, invoke

from kvwctl.checkpoint import INDEX_FILE, open_checkpoint
from kvwctl.errors import ModelError
from kvwctl.outputs import inside
from kvwctl.source import ModelSource

MODEL = "qwen2"


def move_a_shard_to(model: Path, name: str) -> tuple[str, Path]:
    """Point the index's first shard at ``name`` (resolved against ``model``) and move the file there."""
    index_path = model / INDEX_FILE
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    target = (model / name) if not name.startswith("/") else Path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(model / shard, target)
    index["weight_map"] = {tensor: name if where == shard else where for tensor, where in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return shard, target


@pytest.mark.parametrize("escape", ["../x.safetensors", "sub/../../x.safetensors", "ABSOLUTE"])
def test_a_shard_name_outside_the_checkpoint_is_refused(
    escape: str, checkpoints: dict[str, Path], data: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    model = tmp_path / "work" / "model"
    shutil.copytree(checkpoints[MODEL], model)
    name = str(tmp_path / "work" / "x.safetensors") if escape == "ABSOLUTE" else escape
    _, outside = move_a_shard_to(model, name)
    before = hashlib.sha256(outside.read_bytes()).hexdigest()
    out = tmp_path / "work" / "out"
    result = invoke("apply", "--model", model, "--accessor", accessor, "--out", out, "--force")
    expect_error(result, f"{model / INDEX_FILE} names the file {name!r}, which is not a plain path inside {model}")
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == before
    assert not out.exists()
    # Every command opens the checkpoint the same way.
    result = invoke("profile", "--model", model, "--data", data["retain-text"], "--split", "retain", "--out", out)
    expect_error(result, "not a plain path")
    assert not out.exists()


def test_inside_accepts_plain_relative_names_only(tmp_path: Path) -> None:
    source = tmp_path / INDEX_FILE
    assert (
        inside(tmp_path, "model-00001-of-00002.safetensors", source=source)
        == tmp_path / "model-00001-of-00002.safetensors"
    )
    assert inside(tmp_path, "sub/model.safetensors", source=source) == tmp_path / "sub" / "model.safetensors"
    for bad in (
        "",
        ".",
        "..",
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "a/./b",
        "a/",
        "..\\x",
        "a\0b",
        3,
        None,
        ["a"],
    ):
        with pytest.raises(ModelError, match="not a plain path inside"):
            inside(tmp_path, bad, source=source)


def test_a_shard_in_a_subdirectory_is_copied_there(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoints[MODEL], model)
    shard, _ = move_a_shard_to(model, f"weights/{'x.safetensors'}")
    result = invoke("apply", "--model", model, "--accessor", accessor, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "weights" / "x.safetensors").is_file() and not (tmp_path / "out" / shard).exists()


def test_a_link_out_of_the_checkpoint_is_refused(checkpoints: dict[str, Path], accessor: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    model = tmp_path / "model"
    shutil.copytree(checkpoints[MODEL], model)
    (model / "notes.txt").symlink_to(secret)
    out = tmp_path / "out"
    result = invoke("apply", "--model", model, "--accessor", accessor, "--out", out)
    expect_error(result, f"{model / 'notes.txt'} is a symlink to {secret}, outside the checkpoint")
    assert "cp -L" in result.stderr
    assert not out.exists()


def test_a_shard_linked_out_of_the_checkpoint_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoints[MODEL], model)
    shard = sorted(model.glob("*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    with pytest.raises(ModelError, match="outside the checkpoint"):
        open_checkpoint(ModelSource(model, str(model), None))


def test_a_linked_directory_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoints[MODEL], model)
    (tmp_path / "extra").mkdir()
    (model / "extra").symlink_to(tmp_path / "extra")
    with pytest.raises(ModelError, match="is a symlink to a directory"):
        open_checkpoint(ModelSource(model, str(model), None))


def test_a_link_inside_the_checkpoint_is_copied_as_a_regular_file(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoints[MODEL], model)
    (model / "extras").mkdir()
    (model / "extras" / "template.jinja").write_text("{{ messages }}")
    (model / "template-link.jinja").symlink_to("extras/template.jinja")
    out = tmp_path / "out"
    result = invoke("apply", "--model", model, "--accessor", accessor, "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / "template-link.jinja").is_symlink()
    assert (out / "template-link.jinja").read_text() == "{{ messages }}"


def test_hub_cache_links_to_blobs_are_followed_and_copied_as_files(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    snapshot = hub_snapshot(checkpoints[MODEL], tmp_path / "hub")
    out = tmp_path / "out"
    result = invoke("apply", "--model", snapshot, "--accessor", accessor, "--out", out)
    assert result.exit_code == 0, result.output
    copied = sorted(path for path in out.iterdir() if path.name != "kvw_manifest.json")
    assert copied and not any(path.is_symlink() for path in copied)
    assert (out / "config.json").read_bytes() == (checkpoints[MODEL] / "config.json").read_bytes()
    # A link in the snapshot that leaves the repository's blobs is refused like any other.
    (tmp_path / "secret.txt").write_text("private")
    (snapshot / "notes.txt").symlink_to(tmp_path / "secret.txt")
    expect_error(
        invoke("apply", "--model", snapshot, "--accessor", accessor, "--out", tmp_path / "o2"), "outside the checkpoint"
    )
