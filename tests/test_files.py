"""files: atomic files and staging directories leave nothing behind on failure; checks and hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kvwctl.errors import KvwError
from kvwctl.files import atomic_file, file_sha256, staged_output_dir, write_json_atomically, write_text_atomically
from kvwctl.outputs import check_outputs
from kvwctl.testing import build_checkpoint


class Boom(Exception):
    pass


def test_atomic_file_replaces_the_target_on_success(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out.bin"
    with atomic_file(out) as temporary:
        assert temporary.parent == out.parent and temporary != out
        temporary.write_bytes(b"new")
        assert not out.exists()
    assert out.read_bytes() == b"new"
    assert sorted(path.name for path in out.parent.iterdir()) == ["out.bin"]


def test_atomic_file_leaves_the_target_and_no_temporary_when_the_block_raises(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(Boom), atomic_file(out) as temporary:
        temporary.write_bytes(b"half-writ")
        raise Boom
    assert out.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.bin"]


def test_staged_output_dir_renames_into_place_on_success(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with staged_output_dir(out, force=False) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".model.kvw-")
        (staging / "weights").write_text("new")
        assert not out.exists()
    assert (out / "weights").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_staged_output_dir_leaves_no_staging_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(Boom), staged_output_dir(out, force=False) as staging:
        (staging / "weights").write_text("half")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_staged_output_dir_with_force_keeps_the_old_dir_when_the_block_fails(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(Boom), staged_output_dir(out, force=True) as staging:
        (staging / "weights").write_text("half")
        raise Boom
    assert (out / "weights").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_staged_output_dir_with_force_replaces_the_old_dir_and_removes_it(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "kvw_manifest.json").write_text('{"tool": "kvwctl"}')  # only kvwctl's own outputs are replaced
    with staged_output_dir(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(path.name for path in out.iterdir()) == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_staged_output_dir_refuses_an_output_that_appeared_without_force(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KvwError, match="already exists"), staged_output_dir(out, force=False) as staging:
        (staging / "weights").write_text("new")
        out.mkdir()  # another process got there first
    assert list(out.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000  # more than one read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_write_json_atomically_bytes(tmp_path: Path) -> None:
    obj = {"name": "Mira Okafor – Ōsaka", "values": [1, 2.5, None, True], "nested": {}}
    out = tmp_path / "report.json"
    write_json_atomically(out, obj)
    assert out.read_bytes() == (
        b'{\n  "name": "Mira Okafor \xe2\x80\x93 \xc5\x8csaka",\n  "values": [\n    1,\n    2.5,\n    null,\n'
        b'    true\n  ],\n  "nested": {}\n}\n'
    )
    assert out.read_bytes() == (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_json_atomically(out, obj, ensure_ascii=True)  # the manifest's bytes: non-ASCII escaped
    assert out.read_bytes() == (json.dumps(obj, indent=2) + "\n").encode("ascii")
    assert b'"Mira Okafor \\u2013 \\u014csaka"' in out.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_write_text_atomically_writes_utf8_without_newline_translation(tmp_path: Path) -> None:
    out = tmp_path / "text"
    write_text_atomically(out, "a\r\nb\n–")
    assert out.read_bytes() == b"a\r\nb\n\xe2\x80\x93"


def test_check_output_file_errors(tmp_path: Path) -> None:
    out = tmp_path / "profile.safetensors"
    check_outputs(files=[out], inputs=[], force=False)  # absent: fine
    out.write_bytes(b"")
    with pytest.raises(KvwError, match="already exists") as error:
        check_outputs(files=[out], inputs=[], force=False)
    assert error.value.message == f"output {out} already exists"
    assert error.value.hint == "pass --force to replace it"
    check_outputs(files=[out], inputs=[], force=True)
    with pytest.raises(KvwError) as error:
        check_outputs(files=[tmp_path], inputs=[], force=True)
    assert error.value.message == f"output {tmp_path} is a directory; expected a file path"


def test_check_output_dir_errors(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "out"
    check_outputs(directories=[out], inputs=[model], force=False)  # absent: fine
    for overlapping, how in ((model, "the same file"), (model / "inside", "inside it"), (tmp_path, "it contains it")):
        with pytest.raises(KvwError) as error:
            check_outputs(directories=[overlapping], inputs=[model], force=True)
        assert error.value.message == f"output {overlapping} overlaps the input {model} ({how})"
        assert error.value.hint == "kvwctl never writes into or over its inputs: choose another output path"
    out.mkdir()
    with pytest.raises(KvwError) as error:
        check_outputs(directories=[out], inputs=[model], force=False)
    assert error.value.message == f"output {out} already exists"
    check_outputs(directories=[out], inputs=[model], force=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(KvwError) as error:
        check_outputs(directories=[tmp_path / "file"], inputs=[model], force=True)
    assert error.value.message == f"output {tmp_path / 'file'} exists and is not a directory"


def test_module_layout_rename_leaves_no_temporary_files(tmp_path: Path) -> None:
    from safetensors import safe_open

    out = build_checkpoint("qwen2_vl", tmp_path / "tiny", layout="module")
    assert [path.name for path in out.rglob(".*")] == []
    assert not [path for path in out.rglob("*.tmp")]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(name.startswith(("model.language_model.", "model.visual.", "lm_head.")) for name in index["weight_map"])
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as stream:
            assert stream.metadata() == {"format": "pt"}
            assert sorted(stream.keys()) == sorted(
                name for name, where in index["weight_map"].items() if where == shard
            )
