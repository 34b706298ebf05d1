"""The streamed shard copy (``kvwctl.shardcopy``) and the weight it weakens block by block (``kvwctl.weakened``).

The weakened bytes must be exactly ``scale_vectors`` of the whole matrix whatever the block size
(blocks of whole rows, a block smaller than one row, a last partial block), every byte outside
the patched ranges must be copied as it is, both hashes must be those of the files, and a failure
in any of the three stages must be raised in the caller's thread with no thread left running.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from kvwctl.checkpoint import DownProjection
from kvwctl.errors import ModelError
from kvwctl.method import gates, scale_vectors, tensor_bytes
from kvwctl.shardcopy import copy_with_patches
from kvwctl.weakened import WeakenedWeight

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
CPU = torch.device("cpu")


def shard_with(weight: torch.Tensor, path: Path, *, before: int = 13, after: int = 29) -> DownProjection:
    """A file of ``before`` bytes, the weight's bytes, ``after`` bytes; the weight as a DownProjection."""
    dtype = next(name for name, value in DTYPES.items() if value == weight.dtype)
    data = tensor_bytes(weight)
    path.write_bytes(bytes(range(before)) + data + bytes(range(after)))
    return DownProjection(
        name="model.layers.0.mlp.down_proj.weight",
        shard=path.name,
        dtype=dtype,
        shape=tuple(weight.shape),
        data_start=before,
        data_end=before + len(data),
        layer=0,
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("block_size", [1, 7 * 40 + 3, 1 << 20])  # < one row, rows and a remainder, all
def test_weakened_weight_is_scale_vectors_of_the_whole_matrix(
    dtype: str, axis: int, block_size: int, tmp_path: Path
) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(23, 10, generator=generator, dtype=torch.float64) * 3).to(DTYPES[dtype])  # rows of 10
    gate = gates(torch.rand(weight.shape[axis], generator=generator) * 4, 0.7)
    projection = shard_with(weight, tmp_path / "in")
    patch = WeakenedWeight(projection, gate, axis=axis, device=CPU, refusal="refusing")
    copied = copy_with_patches(
        tmp_path / "in", tmp_path / "out", {(projection.data_start, projection.data_end): patch}, block_size=block_size
    )
    expected = tensor_bytes(scale_vectors(weight, gate, axis=axis))
    original = (tmp_path / "in").read_bytes()
    written = (tmp_path / "out").read_bytes()
    assert written == original[: projection.data_start] + expected + original[projection.data_end :]
    assert expected != tensor_bytes(weight)  # the test edits something
    assert patch.digest.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert copied.input_sha256 == hashlib.sha256(original).hexdigest()
    assert copied.output_sha256 == hashlib.sha256(written).hexdigest()
    assert patch.work is None  # the work tensor is let go after the last block


def test_several_patches_and_gaps_across_blocks(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    original = source.read_bytes()
    patches: dict[tuple[int, int], bytes] = {(0, 3): b"abc", (1000, 1500): b"x" * 500, (10239, 10240): b"!"}
    copied = copy_with_patches(source, tmp_path / "out", patches, block_size=97)
    expected = bytearray(original)
    for (start, end), data in patches.items():
        expected[start:end] = data
    assert (tmp_path / "out").read_bytes() == bytes(expected)
    assert copied.output_sha256 == hashlib.sha256(expected).hexdigest()
    assert copied.input_sha256 == hashlib.sha256(original).hexdigest()


def test_an_empty_file_and_no_patches(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"")
    copied = copy_with_patches(tmp_path / "in", tmp_path / "out", {}, block_size=8)
    assert (tmp_path / "out").read_bytes() == b""
    assert copied.input_sha256 == copied.output_sha256 == hashlib.sha256(b"").hexdigest()


def stages_running() -> int:
    return threading.active_count()


def test_a_non_finite_weight_stops_every_stage(tmp_path: Path) -> None:
    weight = torch.ones(64, 8)
    weight[40, 3] = float("nan")
    projection = shard_with(weight, tmp_path / "in")
    patch = WeakenedWeight(projection, torch.full((8,), 0.5), axis=1, device=CPU, refusal="refusing to write out")
    before = stages_running()
    with pytest.raises(
        ModelError,
        match=r"refusing to write out: the edited weight .* has non-finite values \(the input weight already has them\)",
    ):
        copy_with_patches(
            tmp_path / "in", tmp_path / "out", {(projection.data_start, projection.data_end): patch}, block_size=64
        )
    assert stages_running() == before


def test_a_failing_write_is_raised_in_the_caller(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"x" * 1000)
    before = stages_running()
    with pytest.raises(FileNotFoundError):
        copy_with_patches(tmp_path / "in", tmp_path / "missing" / "out", {(5, 6): b"y"}, block_size=16)
    assert stages_running() == before


def test_a_patch_beyond_the_end_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"x" * 100)
    for patches in ({(90, 110): b"y" * 20}, {(200, 201): b"y"}):
        with pytest.raises(AssertionError, match=f"a patch ends beyond the 100 bytes of {tmp_path / 'in'}"):
            copy_with_patches(tmp_path / "in", tmp_path / "out", patches, block_size=16)


def test_an_interrupt_while_patching_stops_the_other_stages(tmp_path: Path) -> None:
    class Interrupted:
        alignment = 1

        def rewrite(self, offset: int, block: memoryview) -> None:
            raise KeyboardInterrupt

    (tmp_path / "in").write_bytes(b"x" * 10_000)
    before = stages_running()
    with pytest.raises(KeyboardInterrupt):
        copy_with_patches(tmp_path / "in", tmp_path / "out", {(5000, 5001): Interrupted()}, block_size=64)
    assert stages_running() == before


def test_refuses_weights_it_cannot_scale(tmp_path: Path) -> None:
    projection = shard_with(torch.ones(4, 4), tmp_path / "in")
    quantized = DownProjection(**{**vars(projection), "dtype": "I8"})
    with pytest.raises(ModelError, match=r"is I8 \[4, 4\]; kvwctl scales floating-point matrices only"):
        WeakenedWeight(quantized, torch.ones(4), axis=1, device=CPU, refusal="refusing")


def test_one_torch_thread_while_copying_and_as_before_after() -> None:
    from kvwctl.weakened import one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(OSError), one_torch_thread():
            assert torch.get_num_threads() == 1
            raise OSError("disk full")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
