"""Fuzzing the readers (issue 9, class 10): whatever the bytes, a clear error and never a traceback.

JSON Lines (``data.load_samples``) raises only ``DataError``; stage files (``artifacts.read_artifact``)
and checkpoint shards (``checkpoint.read_safetensors_header``, ``open_checkpoint``) only
``KvwError`` subclasses — for random bytes, random truncations and random byte changes of valid
files, and a header length of 2^63.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvwctl.accessor import run_accessor
from kvwctl.artifacts import ACCESSOR_FORMAT, PROFILE_FORMAT, read_artifact
from kvwctl.checkpoint import open_checkpoint
from kvwctl.data import load_samples
from kvwctl.errors import DataError, KvwError
from kvwctl.headers import read_safetensors_header
from kvwctl.options import AccessorOptions, ProfileOptions
from kvwctl.profile import run_profile
from kvwctl.source import ModelSource, ModelSpec

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

OUTSIDE = b'{"model.layers.0.mlp.down_proj.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'

# What to do to a valid file: ("raw", bytes, _, _) replaces it; ("truncate", _, fraction, _) keeps
# that fraction of it; ("change", _, _, [(fraction, byte), ...]) overwrites a few bytes.
Mutation = tuple[str, bytes, float, list[tuple[float, int]]]
HUGE_HEADER: Mutation = ("raw", struct.pack("<Q", 2**63) + b'{"a": 1}', 0.0, [])
mutations = st.tuples(
    st.sampled_from(["raw", "truncate", "change"]),
    st.binary(max_size=600),
    st.floats(0, 1, exclude_max=True),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
)


def mutate(valid: bytes, mutation: Mutation) -> bytes:
    kind, raw, fraction, changes = mutation
    if kind == "raw":
        return raw
    if kind == "truncate":
        return valid[: int(len(valid) * fraction)]
    changed = bytearray(valid)
    for where, byte in changes:
        changed[int(len(valid) * where)] = byte
    return bytes(changed)


def survives(errors: type[KvwError], call: Callable[[], object]) -> None:
    """``call()`` succeeds or raises ``errors``; anything else fails the test with its traceback."""
    try:
        call()
    except errors as error:
        assert error.message


# --- JSON Lines ------------------------------------------------------------------------------


@FUZZ
@given(mutation=mutations)
@example(mutation=("raw", b'{"question": "q", "answer": "\xff"}\n', 0.0, []))  # not UTF-8: was a traceback
@example(mutation=("raw", b"[" * 100_000 + b"\n", 0.0, []))  # nested too deep for json: RecursionError
@example(mutation=("raw", b'{"question": 1' + b"0" * 5000 + b"}\n", 0.0, []))  # an int beyond 4300 digits
@example(mutation=("raw", b'{"question": "q", "answer": "a", "image": "' + b"x" * 5000 + b'"}\n', 0.0, []))
def test_load_samples_raises_only_data_errors(
    mutation: Mutation, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_bytes(mutate(data["forget"].read_bytes(), mutation))
    survives(DataError, lambda: load_samples(path))


# --- stage files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_files(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("fuzz-stages")
    model = ModelSpec(str(checkpoints["qwen2"]))
    retain = run_profile(model, data["retain-text"], root / "r.safetensors", ProfileOptions(split="retain")).path
    forget = run_profile(model, data["forget-text"], root / "f.safetensors", ProfileOptions(split="forget")).path
    accessor = run_accessor(forget, retain, root / "a.safetensors", AccessorOptions(save_batches=True)).path
    return {
        "retain": (retain, PROFILE_FORMAT),
        "forget": (forget, PROFILE_FORMAT),
        "accessor": (accessor, ACCESSOR_FORMAT),
    }


@FUZZ
@given(which=st.sampled_from(["retain", "forget", "accessor"]), mutation=mutations)
@example(which="accessor", mutation=HUGE_HEADER)
def test_read_artifact_raises_only_kvw_errors(
    which: str, mutation: Mutation, stage_files: dict[str, tuple[Path, str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    valid, format = stage_files[which]
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(mutate(valid.read_bytes(), mutation))
    survives(KvwError, lambda: read_artifact(path, format))


# --- checkpoint shards -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_checkpoint(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, bytes]:
    """A copy of a checkpoint, one of its shards' names and that shard's valid bytes."""
    copy = tmp_path_factory.mktemp("fuzz-checkpoint") / "qwen2"
    shutil.copytree(checkpoints["qwen2"], copy)
    shard = sorted(path.name for path in copy.glob("*.safetensors"))[0]
    return copy, shard, (copy / shard).read_bytes()


@FUZZ
@given(mutation=mutations)
@example(mutation=HUGE_HEADER)  # was an OverflowError traceback (read(2**63))
@example(mutation=("raw", struct.pack("<Q", 2) + b"[]", 0.0, []))  # a header that is not an object
@example(mutation=("raw", struct.pack("<Q", len(OUTSIDE)) + OUTSIDE, 0.0, []))  # data beyond the file
def test_checkpoint_shards_raise_only_kvw_errors(
    mutation: Mutation, fuzzed_checkpoint: tuple[Path, str, bytes]
) -> None:
    directory, shard, valid = fuzzed_checkpoint
    (directory / shard).write_bytes(mutate(valid, mutation))
    survives(KvwError, lambda: read_safetensors_header(directory / shard))
    survives(KvwError, lambda: open_checkpoint(ModelSource(directory, str(directory), None)))
