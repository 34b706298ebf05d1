"""Faults and hostile inputs: signals, failed writes, corrupt checkpoints, oversized data, file modes.

Every case ends in ``Error: …`` (or ``Terminated``/``Interrupted``) with the documented exit code,
no traceback, and no staging debris (``.NAME.kvw-*``) beside the outputs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import invoke
from typer.testing import Result

from kvwctl.errors import KvwError, Terminated, exit_code_for
from kvwctl.files import atomic_file, committed_together, staged_output_dir

ROOT = Path(__file__).resolve().parents[1]


def expect_error(result: Result, message: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def debris(directory: Path) -> list[Path]:
    """Staging directories and temporary files that kvwctl left behind."""
    return sorted(path for path in directory.rglob("*") if ".kvw-" in path.name)


# --- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("number", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_termination_signals_have_exit_codes(number: int, code: int) -> None:
    assert exit_code_for(Terminated(number)) == code
    try:
        try:
            raise Terminated(number)
        except Terminated:
            raise OSError("write interrupted") from None  # the signal stays in __context__
    except OSError as wrapped:
        assert exit_code_for(wrapped) == code


def test_signal_handlers_are_restored_after_a_command(tmp_path: Path) -> None:
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    expect_error(invoke("accessor", "--forget", tmp_path / "x", "--retain", tmp_path / "y"), "does not exist")
    assert {number: signal.getsignal(number) for number in before} == before


SLOW_APPLY = """
import sys, time
import kvwctl.apply
copy = kvwctl.apply.copy_patched_shard
def slow_copy(*args, **kwargs):
    copy(*args, **kwargs)
    time.sleep(60)  # the signal arrives while the staging directory is half-written
kvwctl.apply.copy_patched_shard = slow_copy
from kvwctl.cli import app
sys.argv = ["kvwctl", *sys.argv[1:]]
app()
"""


@pytest.mark.parametrize(("number", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_signal_during_apply_removes_the_staging_directory(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path, number: int, code: int, name: str
) -> None:
    out = tmp_path / "unlearned"
    command = [sys.executable, "-c", SLOW_APPLY, "apply", "--model", str(checkpoints["qwen2"])]
    command += ["--accessor", str(accessor), "--out", str(out)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 120
    while not any((path / "config.json").exists() for path in tmp_path.glob(".unlearned.kvw-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the staging directory never appeared"
        time.sleep(0.05)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert f"Terminated ({name})." in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert debris(tmp_path) == [] and not out.exists()


# --- failed writes -------------------------------------------------------------------------------


def full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_apply_is_an_error(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvwctl.checkpoint.shutil.copyfile", full_disk)
    out = tmp_path / "unlearned"
    result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", out)
    expect_error(result, f"Error: cannot write {out}: No space left on device")
    assert "Hint: the disk is full" in result.stderr
    assert debris(tmp_path) == [] and not out.exists()


def test_file_size_limit_in_a_real_process_is_an_error(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    """A real failing write(2): RLIMIT_FSIZE makes writes past 16 KB fail with EFBIG."""
    import resource

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    out = tmp_path / "unlearned"
    command = [sys.executable, "-m", "kvwctl", "apply", "--model", str(checkpoints["qwen2"])]
    command += ["--accessor", str(accessor), "--out", str(out)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment, preexec_fn=limit_file_size, timeout=120
    )
    assert completed.returncode == 1, completed.stderr
    assert f"Error: cannot write {out}: File too large" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert debris(tmp_path) == [] and not out.exists()


def test_output_directory_removed_mid_run_is_an_error(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvwctl.checkpoint import copy_patched_shard as copy

    parent = tmp_path / "runs"

    def remove_the_output_directory(*args: Any) -> None:
        shutil.rmtree(parent)
        copy(*args)

    monkeypatch.setattr("kvwctl.apply.copy_patched_shard", remove_the_output_directory)
    result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", parent / "unlearned")
    expect_error(result, f"Error: cannot write {parent / 'unlearned'}: No such file or directory")
    assert "removed or renamed while kvwctl ran" in result.stderr


def test_unwritable_output_location_is_an_error(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr("kvwctl.files.tempfile.mkdtemp", refused)
    out = tmp_path / "unlearned"
    result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", out)
    expect_error(result, f"Error: cannot write {out}: Permission denied ({tmp_path})")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_output_parent_is_refused_before_work(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", parent / "out")
    finally:
        parent.chmod(0o755)
    expect_error(result, f"the directory {parent} is not writable")


# --- outputs committed together ------------------------------------------------------------------


def test_outputs_committed_together_are_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "report.json", tmp_path / "samples.jsonl"
    old_report, old_samples = (
        '{"format": "kvwctl.eval/2"}',
        '{"role": "model", "split": "s", "id": "1", "generation": ""}\n',
    )
    first.write_text(old_report)  # kvwctl's own outputs: only those may be replaced
    second.write_text(old_samples)
    replace = os.replace

    def second_rename_fails(source: Any, target: Any) -> None:
        if Path(target) == second and ".kvw-old-" not in str(source):  # not the rollback's rename
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(source, target)

    monkeypatch.setattr("kvwctl.files.os.replace", second_rename_fails)
    with pytest.raises(KvwError, match="No space left on device"), committed_together() as outputs:
        outputs.file(first).write_text("new report")
        outputs.file(second).write_text("new samples")
    assert (first.read_text(), second.read_text()) == (old_report, old_samples)  # the old pair, both
    assert debris(tmp_path) == []

    with pytest.raises(RuntimeError), committed_together() as outputs:
        outputs.file(tmp_path / "a").write_text("a")
        outputs.directory(tmp_path / "b", force=False)
        raise RuntimeError("the stage failed")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and debris(tmp_path) == []


def test_eval_writes_neither_file_when_the_report_fails(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvwctl.evaluate

    out = tmp_path / "eval.json"
    arguments: list[str | Path] = ["eval", "--model", checkpoints["qwen2"], "--data", f"qa={data['forget-text']}"]
    arguments += ["--max-new-tokens", "1", "--out", out]
    with monkeypatch.context() as patch:
        patch.setattr(kvwctl.evaluate, "write_json_atomically", full_disk)
        expect_error(
            invoke(*arguments), f"Error: cannot write {tmp_path / 'eval.samples.jsonl'} and {out}: No space left"
        )
    assert sorted(tmp_path.iterdir()) == []  # no orphan per-sample file to block the rerun
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "eval.samples.jsonl").is_file()


def test_progressive_writes_neither_checkpoint_nor_exposure_on_failure(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    retain = tmp_path / "retain.safetensors"
    result = invoke(
        "profile", "--model", checkpoints["qwen2"], "--data", data["retain-text"], "--split", "retain", "--out", retain
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "unlearned"
    replace = os.replace

    def checkpoint_rename_fails(source: Any, target: Any) -> None:
        if Path(target) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(source, target)

    monkeypatch.setattr("kvwctl.files.os.replace", checkpoint_rename_fails)
    result = invoke(
        "apply", "--model", checkpoints["qwen2"], "--progressive", "--forget-data", data["forget-text"],
        "--retain", retain, "--out", out,
    )  # fmt: skip
    expect_error(result, f"Error: cannot write {out}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["retain.safetensors"]


# --- corrupt checkpoints -------------------------------------------------------------------------


def first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


def read_header(shard: Path) -> tuple[int, dict[str, Any]]:
    raw = shard.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return size, json.loads(raw[8 : 8 + size])


def rewrite_header(model: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite the header of the shard with the most tensors."""
    shard = max(sorted(model.glob("*.safetensors")), key=lambda path: len(read_header(path)[1]))
    size, header = read_header(shard)
    new = json.dumps(change(header)).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + shard.read_bytes()[8 + size :])


def overlap(header: dict[str, Any]) -> dict[str, Any]:
    names = [name for name in header if name != "__metadata__"]
    first, second = header[names[0]], header[names[1]]
    length = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + length]
    return header


def wrong_byte_count(header: dict[str, Any]) -> dict[str, Any]:
    name = next(name for name in header if name != "__metadata__")
    header[name]["shape"] = [*header[name]["shape"], 2]
    return header


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "config not UTF-8": (lambda m: (m / "config.json").write_bytes(b"\xff\xfe{}"), "config.json is not UTF-8 text"),
    "config not JSON": (lambda m: (m / "config.json").write_text("{"), "config.json is not valid JSON"),
    "config not object": (lambda m: (m / "config.json").write_text("[]"), "config.json must be a JSON object"),
    "index not JSON": (
        lambda m: (m / "model.safetensors.index.json").write_text("{'x'"),
        "model.safetensors.index.json is not valid JSON",
    ),
    "index not object": (
        lambda m: (m / "model.safetensors.index.json").write_text("3"),
        "model.safetensors.index.json must be a JSON object, got int",
    ),
    "weight_map not object": (
        lambda m: (m / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'),
        "weight_map must be an object of tensor name -> shard file",
    ),
    "header length 2^63": (
        lambda m: first_shard(m).write_bytes(struct.pack("<Q", 2**63) + first_shard(m).read_bytes()[8:]),
        f"its header length {2**63} does not fit a file of",
    ),
    "header not JSON": (
        lambda m: first_shard(m).write_bytes(struct.pack("<Q", 4) + b"{{{{"),
        "is not a safetensors file (bad header)",
    ),
    "header not object": (lambda m: rewrite_header(m, lambda header: [header]), "its header is not a JSON object"),
    "truncated": (
        lambda m: first_shard(m).write_bytes(first_shard(m).read_bytes()[:-10]),
        "the file is truncated",
    ),
    "overlapping tensors": (lambda m: rewrite_header(m, overlap), "overlap"),
    "byte count": (lambda m: rewrite_header(m, wrong_byte_count), "needs"),
    "unknown dtype": (
        lambda m: rewrite_header(
            m, lambda h: {n: {**e, "dtype": "F7"} if n != "__metadata__" else e for n, e in h.items()}
        ),
        "unknown dtype 'F7'",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_an_error(checkpoints: dict[str, Path], tmp_path: Path, corruption: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoints["qwen2"], model)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(model)
    result = invoke("apply", "--model", model, "--accessor", tmp_path / "accessor", "--out", tmp_path / "out")
    expect_error(result, message)
    assert "\nError: " in result.stderr and "\nHint: " in result.stderr


def test_non_utf8_kvw_toml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "kvw.toml").write_bytes(b'model = "\xff"\n')
    expect_error(invoke("accessor", "--config", tmp_path / "kvw.toml"), "kvw.toml is not UTF-8 text")


def test_brackets_in_an_output_path_are_printed_as_text(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path
) -> None:
    out = tmp_path / "a[/]b[bold]"
    result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.stderr


# --- bounds on work ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [9000, 12000])  # PIL warns above 64 MP (81 MP) and raises above 128 (144 MP)
def test_decompression_bomb_image_is_a_data_error(checkpoints: dict[str, Path], tmp_path: Path, side: int) -> None:
    from PIL import Image

    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few kB on disk
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"image": "bomb.png", "question": "q?", "answer": "a"}) + "\n")
    out = tmp_path / "profile.safetensors"
    result = invoke("profile", "--model", checkpoints["llava"], "--data", samples, "--split", "retain", "--out", out)
    expect_error(result, f"{samples}:1: image: {tmp_path / 'bomb.png'} has more than 64 megapixels")
    assert not out.exists()


def test_sample_longer_than_the_context_is_refused_before_model_work(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoints["qwen2"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    samples = tmp_path / "samples.jsonl"
    records = [{"id": "short", "question": "q?", "answer": "a"}, {"id": "long", "question": "q?", "answer": "a " * 200}]
    samples.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = invoke("profile", "--model", model, "--data", samples, "--split", "retain", "--out", tmp_path / "p")
    expect_error(result, f"{samples}:2: sample 'long' has ")
    assert "tokens, more than the model's context of 64 (max_position_embeddings)" in result.stderr
    assert not (tmp_path / "p").exists()


# --- file modes ----------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    with atomic_file(tmp_path / "file") as temporary:
        temporary.write_text("x")
    with staged_output_dir(tmp_path / "dir", force=False) as staging:
        (staging / "inner").write_text("y")
    assert mode(tmp_path / "file") == 0o666 & ~umask
    assert mode(tmp_path / "dir") == 0o777 & ~umask
    assert mode(tmp_path / "dir" / "inner") == 0o666 & ~umask


def test_checkpoint_files_honour_the_umask(
    checkpoints: dict[str, Path], accessor: Path, tmp_path: Path, umask: int
) -> None:
    out = tmp_path / "unlearned"
    result = invoke("apply", "--model", checkpoints["qwen2"], "--accessor", accessor, "--out", out)
    assert result.exit_code == 0, result.output
    assert mode(out) == 0o777 & ~umask
    files = [path for path in out.rglob("*") if path.is_file()]
    assert files and {path.name: mode(path) for path in files} == {path.name: 0o666 & ~umask for path in files}


# --- eval --json ---------------------------------------------------------------------------------


def test_eval_json_prints_the_report_when_a_requirement_fails(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    result = invoke(
        "eval", "--model", checkpoints["qwen2"], "--data", f"qa={data['forget-text']}", "--max-new-tokens", "1",
        "--out", out, "--require", "qa.keyword_acc > 2", "--json",
    )  # fmt: skip
    expect_error(result, "Error: 1 requirement failed: qa.keyword_acc > 2 failed")
    printed = json.loads(result.stdout)
    assert printed["path"] == str(out)
    assert [outcome["passed"] for outcome in printed["requirements"]] == [False]
    assert printed["requirements"] == json.loads(out.read_text())["requirements"]
