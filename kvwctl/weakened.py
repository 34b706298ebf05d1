"""A down-projection weight weakened as its bytes stream through a shard copy.

``apply`` writes an edited weight without loading it: :class:`WeakenedWeight` is a
:class:`kvwctl.shardcopy.Patch` that receives the weight's bytes in blocks of whole rows, as
``kvwctl.checkpoint.copy_patched_shard`` streams the shard, and rewrites each block in place with
``scale_vectors`` (float32, rounded once to the stored dtype). The product is elementwise, so the
bytes are exactly those of scaling the whole matrix at once (``kvwctl verify`` recomputes them
that way).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kvwctl.checkpoint import StoredTensor
from kvwctl.errors import ModelError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> torch dtype, for the weights apply can scale (floating point only).
SCALABLE_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class WeakenedWeight:
    """A down-projection weight weakened as its bytes stream through ``copy_patched_shard``.

    A :class:`kvwctl.shardcopy.Patch` whose blocks are whole rows of the stored matrix. Each block
    ``(rows, columns)`` is :func:`kvwctl.method.scale_vectors` computed in place: widened to a
    float32 work tensor on ``device`` (exact for every stored float type narrower than float64,
    as ``weight.float()``), multiplied by the gates of its vectors (all of them for columns,
    ``axis=1``; the block's rows' for rows, ``axis=0``), and copied back into the block, which
    rounds once to the stored dtype (as ``.to(dtype)``). The product is elementwise, so the bytes
    are those of scaling the whole matrix at once. The work tensor, the size of the first (the
    largest) block, is the only memory held besides the block; it is released after the last one.
    ``digest`` is the SHA-256 of the weight's new bytes, complete when the copy ends.
    """

    def __init__(
        self, projection: StoredTensor, gate: torch.Tensor, *, axis: int, device: torch.device, refusal: str
    ) -> None:
        import torch

        shape = projection.shape
        if projection.dtype not in SCALABLE_DTYPES or len(shape) not in (2, 3):
            raise ModelError(
                f"{refusal}: the down-projection weight {projection.name} in {projection.shard} is "
                f"{projection.dtype} {list(shape)}; kvwctl scales floating-point matrices only",
                hint="apply needs the checkpoint's unquantized weights",
            )
        # A fused (E, a, b) experts tensor streams as the rows of its (E * a, b) matrix: with vectors
        # on axis 1 each row is one vector (row gates, the (E, m) gates flattened); on axis 2 the
        # rows of expert e take the column gates gate[e] (``group`` rows per expert).
        self.group: int | None = None
        if len(shape) == 3:
            if axis not in (1, 2) or tuple(gate.shape) != (shape[0], shape[axis]):
                raise ValueError(
                    f"{projection.name} {list(shape)} with vectors on axis {axis} does not fit gates {list(gate.shape)}"
                )
            if axis == 1:
                gate, axis = gate.reshape(-1), 0
            else:
                self.group, axis = shape[1], 1
        elif gate.numel() != shape[axis]:
            raise ValueError(f"{projection.name} has {shape[axis]} vectors on axis {axis}, gate has {gate.numel()}")
        self.dtype = getattr(torch, SCALABLE_DTYPES[projection.dtype])
        self.columns = shape[-1]  # (its byte count fits the shape: kvwctl.headers checked it)
        self.projection, self.axis, self.device, self.refusal = projection, axis, device, refusal
        self.gate = gate.to(device).float()  # (m,); a fused tensor's on axis 2: (E, m)
        self.alignment = max(1, self.columns * self.dtype.itemsize)  # one row of the stored matrix
        self.digest = hashlib.sha256()
        self.work: torch.Tensor | None = None  # (rows, columns) float32 on device

    def rewrite(self, offset: int, block: memoryview) -> None:
        import torch

        first_row, rows = offset // self.alignment, len(block) // self.alignment
        stored = torch.frombuffer(block, dtype=self.dtype).reshape(rows, self.columns)  # a view of the block
        if self.work is None:
            self.work = torch.empty((rows, self.columns), dtype=torch.float32, device=self.device)
        work = self.work[:rows]
        work.copy_(stored)  # weight.float()
        if self.group is not None:  # rows of a fused (E, d, m) tensor: row r is expert r // d's
            experts = torch.arange(first_row, first_row + rows, device=self.device) // self.group
            work.mul_(self.gate[experts])  # (rows, m)
        elif self.axis == 1:
            work.mul_(self.gate.reshape(1, -1))  # column j of every row times gate[j]
        else:
            work.mul_(self.gate[first_row : first_row + rows].reshape(-1, 1))  # row i times gate[i]
        low, high = torch.aminmax(work)  # NaN if any is NaN; ±inf if any is; 30x faster than isfinite().all()
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            already = " (the input weight already has them)" if not torch.isfinite(stored).all() else ""
            raise ModelError(
                f"{self.refusal}: the edited weight {self.projection.name} in {self.projection.shard} "
                f"has non-finite values{already}",
                hint="check the input checkpoint's weights",
            )
        stored.copy_(work)  # .to(dtype): rounded once
        self.digest.update(block)
        if offset + len(block) == self.projection.data_end - self.projection.data_start:
            self.work = None  # the last block


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's CPU ops on one thread inside the block, as many as before after it.

    A block's scaling is a few elementwise passes over 4 MB while the copy's reader and writer
    threads hash and move bytes on the other cores; torch's intra-op pool would split each pass
    and then spin-wait, competing with them (measured on 2 cores: twice the CPU time and twice
    the wall time of the whole apply).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
