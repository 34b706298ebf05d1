"""A checkpoint's JSON files and safetensors headers, read and checked whole before any use.

Whatever the bytes, a file that is not what it claims is a ``ModelError`` naming it: not UTF-8,
not JSON, not an object; a safetensors header whose length does not fit the file, that is not a
JSON object, or whose entries lack a known dtype, a shape or byte offsets that match them and lie
inside the file without overlapping.

    data_start, header = read_safetensors_header(Path("model-00001-of-00002.safetensors"))
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from kvwctl.errors import ModelError


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config, index, manifest) that must hold one JSON object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not UTF-8 text", hint=CORRUPT_HINT) from None
    except json.JSONDecodeError as error:
        raise ModelError(f"{path} is not valid JSON: {error}", hint=CORRUPT_HINT) from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} must be a JSON object, got {type(value).__name__}", hint=CORRUPT_HINT)
    return value


CORRUPT_HINT = "the checkpoint is corrupt or incomplete: download or save it again"
# Bytes per element of every safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The header of a safetensors file: (byte offset where tensor data begins, header dict).

    The header is checked whole, so that what transformers later loads is what was checked:
    a length that fits the file, a JSON object, and for every tensor a known dtype, a shape and
    data offsets whose byte count matches them, inside the file and overlapping no other tensor.
    Whatever the bytes, a file that is not a safetensors file is a ``ModelError``.
    """
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) != 8:
            raise ModelError(f"{path} is not a safetensors file (too short)", hint=CORRUPT_HINT)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            raise ModelError(
                f"{path} is not a safetensors file: its header length {header_size} does not fit a "
                f"file of {size} bytes",
                hint=CORRUPT_HINT,
            )
        try:
            header = json.loads(stream.read(header_size).decode("utf-8"))
        except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
            raise ModelError(f"{path} is not a safetensors file (bad header)", hint=CORRUPT_HINT) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a JSON object)", hint=CORRUPT_HINT)
    data_size = size - 8 - header_size
    ranges = sorted(
        (_tensor_range(path, name, entry, data_size), name) for name, entry in header.items() if name != "__metadata__"
    )
    for ((_, previous_end), previous), ((begin, _), name) in zip(ranges, ranges[1:], strict=False):
        if begin < previous_end:
            raise ModelError(f"{path}: the bytes of tensors {previous} and {name} overlap", hint=CORRUPT_HINT)
    return 8 + header_size, header


def _tensor_range(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """A header entry's ``data_offsets``, checked against its dtype and shape and the file's size."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise ModelError(f"{where}: its header entry is not a JSON object", hint=CORRUPT_HINT)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelError(f"{where}: unknown dtype {dtype!r}", hint=CORRUPT_HINT)
    if not isinstance(shape, list) or not all(_natural(value) for value in shape):
        raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers", hint=CORRUPT_HINT)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(value) for value in offsets)):
        raise ModelError(f"{where}: data_offsets {offsets!r} are not two byte offsets", hint=CORRUPT_HINT)
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise ModelError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes; "
            f"{dtype} of shape {shape} needs {expected}",
            hint=CORRUPT_HINT,
        )
    if end > data_size:
        raise ModelError(
            f"{where} ends at byte {end} of the data but the file holds {data_size}: the file is truncated",
            hint=CORRUPT_HINT,
        )
    return begin, end


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
