"""Reproducible stage files (issue 9, class 9): the same inputs give byte-identical profiles and accessors.

Two causes made them differ: a ``created`` timestamp in the metadata (dropped), and safetensors
serialising the metadata map in a per-process random order (``files.save_safetensors_atomically``
rewrites the header with sorted keys). Hash seeds differ per process, so each run is a subprocess.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from kvwctl.files import save_safetensors_atomically


def kvwctl(*args: str | Path, seed: int) -> None:
    environment = {**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kvwctl", *map(str, args), "--quiet"]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


def test_profile_and_accessor_are_byte_identical_across_processes(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = checkpoints["qwen2"]
    retain, forget, accessor = tmp_path / "r.safetensors", tmp_path / "f.safetensors", tmp_path / "a.safetensors"
    runs: list[dict[str, bytes]] = []
    for seed in (1, 2):  # the same paths each time: they are recorded in the metadata
        kvwctl(
            "profile", "--model", model, "--data", data["retain-text"], "--split", "retain", "--out", retain, seed=seed
        )
        kvwctl(
            "profile", "--model", model, "--data", data["forget-text"], "--split", "forget", "--out", forget, seed=seed
        )
        kvwctl("accessor", "--forget", forget, "--retain", retain, "--out", accessor, seed=seed)
        runs.append({path.name: path.read_bytes() for path in (retain, forget, accessor)})
        for path in (retain, forget, accessor):
            path.unlink()
    for name in runs[0]:
        assert runs[0][name] == runs[1][name], name
        assert b'"created"' not in runs[0][name]


def test_the_header_has_sorted_metadata_and_reads_back(tmp_path: Path) -> None:
    metadata = {key: f"value of {key} é" for key in ("zeta", "alpha", "mu", "beta", "omega-with-a-long-name")}
    tensors = {"b": torch.arange(5, dtype=torch.float64), "a": torch.ones(2, 3)}
    out = tmp_path / "x.safetensors"
    save_safetensors_atomically(tensors, out, metadata)
    raw = out.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert list(header)[0] == "__metadata__" and list(header["__metadata__"]) == sorted(metadata)
    with safe_open(str(out), framework="pt") as stream:
        assert stream.metadata() == metadata
        assert torch.equal(stream.get_tensor("b"), tensors["b"]) and torch.equal(stream.get_tensor("a"), tensors["a"])
    assert [path.name for path in tmp_path.iterdir()] == ["x.safetensors"]
