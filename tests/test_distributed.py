"""``torchrun -m kvwctl profile``: two gloo ranks on the CPU give the single run's profile; rank 1
prints nothing. The ranks are forked from the test process (torch already imported: fast) with the
variables torchrun sets; a slow test runs the real ``torchrun``."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import invoke
from safetensors import safe_open
from typer.testing import CliRunner

from kvwctl.cli import app
from kvwctl.distributed import World, _world_variables, environment_rank, rank_device
from kvwctl.errors import UsageError
from kvwctl.options import ProfileOptions
from kvwctl.profile import plan_profile
from kvwctl.source import ModelSpec
from kvwctl.testing import build_checkpoint, write_samples


def test_world_from_torchrun_variables() -> None:
    assert _world_variables({}) is None
    assert _world_variables({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # one process: no group
    assert _world_variables({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert environment_rank({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == 1
    assert environment_rank({}) == 0
    with pytest.raises(UsageError, match="RANK 2 is not below WORLD_SIZE 2"):
        _world_variables({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(UsageError, match="torchrun's variables are not integers"):
        _world_variables({"WORLD_SIZE": "two", "RANK": "0"})
    assert rank_device("cpu", 3) == "cpu"
    with pytest.raises(UsageError, match="--device cuda:1 under torchrun: every rank runs on cuda:LOCAL_RANK"):
        rank_device("cuda:1", 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny qwen2, 7 forget and 9 retain text samples, profiled by one process (batches of 2)."""
    root = tmp_path_factory.mktemp("distributed")
    files = {
        "model": build_checkpoint("qwen2", root / "qwen2"),
        "forget-data": write_samples(root / "forget.jsonl", count=7, with_images=False),
        "retain-data": write_samples(root / "retain.jsonl", count=9, with_images=False, offset=7),
    }
    for split in ("forget", "retain"):
        files[split] = root / f"{split}.safetensors"
        result = invoke(*profile_args(files, split), "--out", files[split])
        assert result.exit_code == 0, result.output
    return files


def profile_args(files: dict[str, Path], split: str) -> list[str]:
    args = ["profile", "--model", files["model"], "--data", files[f"{split}-data"], "--split", split]
    return [str(arg) for arg in [*args, "--batch-size", "2", "--device", "cpu"]]


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
        return port


def rank_main(rank: int, port: int, commands: list[list[str]], results: Any) -> None:
    """One forked rank: torchrun's variables, then every command through the CLI."""
    torch.set_num_threads(1)
    for command in commands:
        os.environ.update(
            WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        result = CliRunner().invoke(app, command)
        results.put((rank, command[command.index("--split") + 1], result.exit_code, result.stdout, result.stderr))
        port += 1


def run_ranks(commands: list[list[str]]) -> dict[tuple[int, str], tuple[int, str, str]]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=rank_main, args=(rank, port, commands, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    found = {}
    try:
        for _ in range(2 * len(commands)):
            rank, split, code, stdout, stderr = results.get(timeout=240)
            found[(rank, split)] = (code, stdout, stderr)
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return found


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as stream:
        return {name: stream.get_tensor(name) for name in stream.keys()}, dict(stream.metadata() or {})


def test_two_gloo_ranks_give_the_single_run(setup: dict[str, Path], tmp_path: Path) -> None:
    outs = {split: tmp_path / f"{split}.safetensors" for split in ("forget", "retain")}
    found = run_ranks([[*profile_args(setup, split), "--out", str(outs[split])] for split in ("forget", "retain")])
    for split in ("forget", "retain"):
        code, stdout, stderr = found[(0, split)]
        assert code == 0, stderr
        assert stdout.strip() == str(outs[split])
        assert found[(1, split)] == (0, "", "")  # rank 1 prints nothing
    # Forget: the per-sample rows in sample order, each rank having profiled whole batches of the single run.
    assert outs["forget"].read_bytes() == setup["forget"].read_bytes()
    # Retain: the pooled sums of the two ranks added, equal to the single run's to float64 rounding.
    merged, merged_metadata = tensors_and_metadata(outs["retain"])
    whole, whole_metadata = tensors_and_metadata(setup["retain"])
    assert merged_metadata == whole_metadata
    assert torch.equal(merged["count"], whole["count"])
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-13, atol=0)


def test_shard_options_are_refused_under_torchrun(setup: dict[str, Path], tmp_path: Path) -> None:
    world = World(rank=0, size=2, local_rank=0, device="cpu", backend="gloo")
    for given, flags in (("--shard", {"shard": "1/2"}), ("--resume", {"resume": True})):
        options = ProfileOptions(split="forget", **flags)
        with pytest.raises(UsageError, match=f"{given} does not apply under torchrun"):
            plan_profile(ModelSpec(str(setup["model"])), setup["forget-data"], tmp_path / "f", options, world=world)
    big = World(rank=0, size=5, local_rank=0, device="cpu", backend="gloo")
    with pytest.raises(UsageError, match="7 samples make 4 batches of 2, too few for 5 torchrun ranks"):
        options = ProfileOptions(split="forget", batch_size=2)
        plan_profile(ModelSpec(str(setup["model"])), setup["forget-data"], tmp_path / "f", options, world=big)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun on PATH")
def test_real_torchrun(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "forget.safetensors"
    command = ["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "kvwctl"]
    command += [*profile_args(setup, "forget")[0:], "--out", str(out)]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)  # rank 0's line only
    assert out.read_bytes() == setup["forget"].read_bytes()
