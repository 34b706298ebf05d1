"""``profile --checkpoint-every N`` and ``--resume``: a run interrupted after some batches, resumed,
ends with the bytes of an uninterrupted run; a sidecar of another run is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import expect_error, invoke
from safetensors import safe_open

from kvwctl.modeling import CoefficientCollector
from kvwctl.resume import sidecar_path
from kvwctl.testing import build_checkpoint, write_samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny qwen2, a 7-sample text split, and its uninterrupted profiles (batches of 2)."""
    root = tmp_path_factory.mktemp("resume")
    files = {
        "model": build_checkpoint("qwen2", root / "qwen2"),
        "data": write_samples(root / "samples.jsonl", count=7, with_images=False),
    }
    for split in ("retain", "forget"):
        files[split] = root / f"{split}.safetensors"
        result = invoke(*profile_args(files, split), "--out", files[split])
        assert result.exit_code == 0, result.output
    return files


def profile_args(files: dict[str, Path], split: str) -> list[str | Path]:
    return ["profile", "--model", files["model"], "--data", files["data"], "--split", split, "--batch-size", "2"]


def interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int, stop: Callable[[], None]) -> list[int]:
    """Call ``stop`` when the forward pass of batch ``batches + 1`` starts; returns the call counter."""
    calls = [0]
    original = CoefficientCollector.run

    def run(self: CoefficientCollector, loaded: Any, batch: Any) -> Any:
        calls[0] += 1
        if calls[0] == batches + 1:
            stop()
        return original(self, loaded, batch)

    monkeypatch.setattr(CoefficientCollector, "run", run)
    return calls


def keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("split", ["retain", "forget"])
def test_interrupted_run_resumes_to_the_same_bytes(
    split: str, setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / f"{split}.safetensors"
    sidecar = sidecar_path(out)
    args = [*profile_args(setup, split), "--out", out, "--checkpoint-every", "2"]
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3, keyboard_interrupt)  # 4 batches: checkpoint after 2, Ctrl-C in the 4th
        result = invoke(*args)
    assert result.exit_code == 130, result.output
    assert "Interrupted." in result.stderr
    assert not out.exists() and sidecar.is_file()
    with safe_open(str(sidecar), framework="pt") as stream:
        metadata = dict(stream.metadata() or {})
        indices = stream.get_tensor("sample_indices")
        rows = stream.get_tensor("layers.2.sum")
    # Checkpointed after batch 2, and batch 3 saved on the interrupt.
    assert metadata["format"] == "kvwctl.profile-resume/1" and metadata["batches_done"] == "3"
    assert (metadata["split"], metadata["batch_size"], metadata["samples"]) == (split, "2", "[0, 7]")
    assert indices.tolist() == [0, 1, 2, 3, 4, 5] and rows.shape[0] == 6
    if split == "forget":  # the checkpointed rows (positions in length order) are the uninterrupted run's
        with safe_open(str(setup["forget"]), framework="pt") as stream:
            whole = stream.get_tensor("layers.2.sum")
        matches = [[index for index in range(whole.shape[0]) if torch.equal(row, whole[index])] for row in rows]
        assert all(len(found) == 1 for found in matches) and len({found[0] for found in matches}) == 6

    # Without --resume the checkpoint is not thrown away.
    expect_error(invoke(*args), "the checkpoint of an unfinished profile run")
    calls = interrupt_after(monkeypatch, 10**6, keyboard_interrupt)  # count the forward passes only
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert calls[0] == 1  # batch 4 only
    assert out.read_bytes() == setup[split].read_bytes()
    assert not sidecar.exists()


def test_resume_refuses_another_runs_checkpoint(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "forget.safetensors"
    args = [*profile_args(setup, "forget"), "--out", out, "--checkpoint-every", "2"]

    def crash() -> None:  # not an interrupt: only the periodic checkpoint is on disk, as after a kill
        raise RuntimeError("crashed")

    with monkeypatch.context() as patch:
        interrupt_after(patch, 3, crash)
        assert isinstance(invoke(*args).exception, RuntimeError)
    with safe_open(str(sidecar_path(out)), framework="pt") as stream:
        assert (stream.metadata() or {})["batches_done"] == "2"
        assert stream.get_tensor("sample_indices").tolist() == [0, 1, 2, 3]
    other = invoke(*args, "--resume", "--positions", "all")
    expect_error(other, f"{sidecar_path(out)} was written by another run: positions is 'answer' there, 'all' now")
    # --force without --resume starts over (and the finished run removes the old checkpoint).
    assert invoke(*args, "--force").exit_code == 0
    assert out.read_bytes() == setup["forget"].read_bytes() and not sidecar_path(out).exists()
    # --resume without a checkpoint is a run from the start.
    again = tmp_path / "again.safetensors"
    assert invoke(*profile_args(setup, "forget"), "--out", again, "--resume").exit_code == 0
    assert again.read_bytes() == setup["forget"].read_bytes()


def test_resume_after_the_last_batch(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the last checkpoint but before the profile was written: nothing left to profile."""
    out = tmp_path / "retain.safetensors"
    args = [*profile_args(setup, "retain"), "--out", out, "--checkpoint-every", "1"]

    def fail_to_write(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("kvwctl.profile.write_artifact", fail_to_write)
        assert invoke(*args).exit_code == 130
    calls = interrupt_after(monkeypatch, 10**6, keyboard_interrupt)
    assert invoke(*args, "--resume").exit_code == 0
    assert calls[0] == 0
    assert out.read_bytes() == setup["retain"].read_bytes()


@pytest.mark.slow
def test_sigkill_then_resume(setup: dict[str, Path], tmp_path: Path) -> None:
    """A real kill -9 of a CLI process after its second checkpoint, then --resume."""
    out = tmp_path / "forget.safetensors"
    args = [str(arg) for arg in (*profile_args(setup, "forget"), "--out", out, "--checkpoint-every", "1")]
    driver = (
        "import os, signal, sys\n"
        "from kvwctl.modeling import CoefficientCollector\n"
        "from kvwctl.cli import main\n"
        "original, calls = CoefficientCollector.run, [0]\n"
        "def run(self, loaded, batch):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(self, loaded, batch)\n"
        "CoefficientCollector.run = run\n"
        f"sys.argv = ['kvwctl', *{json.dumps(args)}]\n"
        "main()\n"
    )
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    killed = subprocess.run([sys.executable, "-c", driver], env=environment, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert not out.exists() and sidecar_path(out).is_file()
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == setup["forget"].read_bytes()
