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
from typing import TYPE_CHECKING

from kvwctl.checkpoint import DownProjection
from kvwctl.errors import ModelError
from kvwctl.method import scale_vectors

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
    """A down-projection weight weakened as its bytes stream through :func:`copy_patched_shard`.

    A :class:`kvwctl.shardcopy.Patch` whose blocks are whole rows of the stored matrix: each
    block ``(rows, columns)`` is ``scale_vectors``'d on ``device`` with the gates of its vectors
    (all of them for columns, ``axis=1``; the block's rows' for rows, ``axis=0``). The product is
    elementwise, so the bytes are those of scaling the whole matrix at once. ``digest`` is the
    SHA-256 of the weight's new bytes, complete when the copy ends.
    """

    def __init__(
        self, projection: DownProjection, gate: torch.Tensor, *, axis: int, device: torch.device, refusal: str
    ) -> None:
        import torch

        if projection.dtype not in SCALABLE_DTYPES or len(projection.shape) != 2:
            raise ModelError(
                f"{refusal}: the down-projection weight {projection.name} in {projection.shard} is "
                f"{projection.dtype} {list(projection.shape)}; kvwctl scales floating-point matrices only",
                hint="apply needs the checkpoint's unquantized weights",
            )
        self.projection, self.gate, self.axis, self.device, self.refusal = projection, gate, axis, device, refusal
        self.dtype = getattr(torch, SCALABLE_DTYPES[projection.dtype])
        self.columns = projection.shape[1]
        self.alignment = max(1, self.columns * self.dtype.itemsize)  # one row of the stored matrix
        self.digest = hashlib.sha256()

    def rewrite(self, offset: int, block: memoryview) -> None:
        import torch

        first_row, rows = offset // self.alignment, len(block) // self.alignment
        stored = torch.frombuffer(block, dtype=self.dtype).reshape(rows, self.columns)  # a view of the block
        weight = stored.to(self.device)
        gate = self.gate if self.axis == 1 else self.gate[first_row : first_row + rows]
        weakened = scale_vectors(weight, gate, axis=self.axis)
        if not bool(torch.isfinite(weakened).all()):
            already = " (the input weight already has them)" if not torch.isfinite(weight).all() else ""
            raise ModelError(
                f"{self.refusal}: the edited weight {self.projection.name} in {self.projection.shard} "
                f"has non-finite values{already}",
                hint="check the input checkpoint's weights",
            )
        stored.copy_(weakened)
        self.digest.update(block)
