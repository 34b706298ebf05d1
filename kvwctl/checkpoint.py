"""Checkpoints on disk: resolve a local directory or Hub id, read shards lazily, copy patched shards.

A checkpoint is a directory with ``config.json`` and safetensors weights — one
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards listed in
``model.safetensors.index.json``. Only safetensors are read. A Hub id is resolved with
``huggingface_hub.snapshot_download`` (safetensors, JSON, tokenizer and template files only), which
honours ``HF_HUB_OFFLINE`` and the cache; the resolved commit is recorded in every output.

The **model fingerprint** is a SHA-256 over the canonical ``config.json`` and the dtype, shape and
raw bytes of every down-projection weight, in layer order. Tensor names are not hashed, so the
same weights stored in the Hub layout or the transformers 5 layout have the same fingerprint.

Outputs are written through ``kvwctl.files`` (staging directories, atomic files).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvwctl.architectures import Architecture, get_architecture, num_decoder_layers
from kvwctl.errors import ModelError, UsageError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FILE = "kvw_manifest.json"
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "tokenizer*",
]
# Weight formats that are never carried into an output: they would hold the unedited weights.
FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the user names it: a local directory or Hub id, and a revision for Hub ids."""

    reference: str
    revision: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint came from: the user's reference and the resolved revision."""

    path: Path
    reference: str
    revision: str | None  # the commit for Hub models; None for a local directory

    def describe(self) -> dict[str, Any]:
        return {"reference": self.reference, "revision": self.revision, "path": str(self.path)}


def resolve_model(reference: str, revision: str | None = None) -> ModelSource:
    """A local directory as it is, or a Hub id downloaded (or found in the cache)."""
    local = Path(reference).expanduser()
    if local.is_dir():
        if revision is not None:
            raise UsageError(
                f"--revision {revision} was given but {reference} is a local directory",
                hint="--revision applies to Hub ids only",
            )
        return ModelSource(path=local.resolve(), reference=reference, revision=None)
    if local.exists():
        raise ModelError(f"{reference} is a file; a model is a checkpoint directory or a Hub id")
    if _names_a_local_path(reference):
        raise ModelError(
            f"model directory {reference} does not exist",
            hint="check the path (a Hub id has the form owner/name and names no local directory)",
        )
    return _resolve_hub(reference, revision)


def _names_a_local_path(reference: str) -> bool:
    """Whether ``reference`` can only be meant as a local path, never as a Hub id (``owner/name``).

    Absolute, ``./``, ``../`` and ``~`` paths, a trailing slash, more than one ``/``, or a first
    component that is an existing directory (``kvw-run/unlearned``).
    """
    if reference.startswith(("/", "./", "../", "~", ".\\")) or reference.endswith(("/", "\\")):
        return True
    parts = reference.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _resolve_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except HFValidationError:
        raise ModelError(
            f"{repo_id} is neither a local directory nor a valid Hub id",
            hint="pass a checkpoint directory or an id such as llava-hf/llava-1.5-7b-hf",
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"model {repo_id} was not found on the Hub") from None
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision} of {repo_id} was not found on the Hub") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the Hub cache and cannot be downloaded{offline}",
            hint="download it once with network access, or pass a local checkpoint directory",
        ) from None
    except HfHubHTTPError as error:
        raise ModelError(f"cannot download {repo_id}: {error}") from None
    path = Path(snapshot)
    # The cache stores every snapshot under its commit hash (…/snapshots/<commit>/).
    return ModelSource(path=path, reference=repo_id, revision=path.name)


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config, index, manifest) that must hold one JSON object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not UTF-8 text", hint=_CORRUPT_HINT) from None
    except json.JSONDecodeError as error:
        raise ModelError(f"{path} is not valid JSON: {error}", hint=_CORRUPT_HINT) from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} must be a JSON object, got {type(value).__name__}", hint=_CORRUPT_HINT)
    return value


_CORRUPT_HINT = "the checkpoint is corrupt or incomplete: download or save it again"
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
            raise ModelError(f"{path} is not a safetensors file (too short)", hint=_CORRUPT_HINT)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            raise ModelError(
                f"{path} is not a safetensors file: its header length {header_size} does not fit a "
                f"file of {size} bytes",
                hint=_CORRUPT_HINT,
            )
        try:
            header = json.loads(stream.read(header_size).decode("utf-8"))
        except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
            raise ModelError(f"{path} is not a safetensors file (bad header)", hint=_CORRUPT_HINT) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a JSON object)", hint=_CORRUPT_HINT)
    data_size = size - 8 - header_size
    ranges = sorted(
        (_tensor_range(path, name, entry, data_size), name) for name, entry in header.items() if name != "__metadata__"
    )
    for ((_, previous_end), previous), ((begin, _), name) in zip(ranges, ranges[1:], strict=False):
        if begin < previous_end:
            raise ModelError(f"{path}: the bytes of tensors {previous} and {name} overlap", hint=_CORRUPT_HINT)
    return 8 + header_size, header


def _tensor_range(path: Path, name: str, entry: Any, data_size: int) -> tuple[int, int]:
    """A header entry's ``data_offsets``, checked against its dtype and shape and the file's size."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise ModelError(f"{where}: its header entry is not a JSON object", hint=_CORRUPT_HINT)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelError(f"{where}: unknown dtype {dtype!r}", hint=_CORRUPT_HINT)
    if not isinstance(shape, list) or not all(_natural(value) for value in shape):
        raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers", hint=_CORRUPT_HINT)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(value) for value in offsets)):
        raise ModelError(f"{where}: data_offsets {offsets!r} are not two byte offsets", hint=_CORRUPT_HINT)
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise ModelError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes; "
            f"{dtype} of shape {shape} needs {expected}",
            hint=_CORRUPT_HINT,
        )
    if end > data_size:
        raise ModelError(
            f"{where} ends at byte {end} of the data but the file holds {data_size}: the file is truncated",
            hint=_CORRUPT_HINT,
        )
    return begin, end


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class DownProjection:
    """One layer's down-projection weight as stored on disk."""

    layer: int
    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    data_start: int  # absolute byte offset in the shard file
    data_end: int


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its config, shard files and down-projection weights."""

    source: ModelSource
    config: dict[str, Any]
    architecture: Architecture
    shards: tuple[str, ...]
    down_projections: tuple[DownProjection, ...] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def num_layers(self) -> int:
        return len(self.down_projections)

    def num_vectors(self, layer: int) -> int:
        return self.down_projections[layer].shape[self.architecture.vector_axis]

    def fingerprint(self) -> str:
        """SHA-256 over the canonical config and every down-projection's dtype, shape, bytes."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        for projection in self.down_projections:
            digest.update(f"|{projection.layer}|{projection.dtype}|{list(projection.shape)}|".encode())
            with (self.path / projection.shard).open("rb") as stream:
                stream.seek(projection.data_start)
                remaining = projection.data_end - projection.data_start
                while remaining:
                    block = stream.read(min(remaining, 1 << 24))
                    if not block:
                        raise ModelError(f"{projection.shard} is truncated")
                    digest.update(block)
                    remaining -= len(block)
        return digest.hexdigest()


def open_checkpoint(source: ModelSource) -> Checkpoint:
    """Read ``config.json`` and the safetensors headers; no tensor data is loaded."""
    config_path = source.path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{source.path} has no config.json; it is not a transformers checkpoint")
    config = read_json_object(config_path)
    architecture = get_architecture(config.get("model_type"))
    shards = _shard_files(source.path)
    projections: dict[int, DownProjection] = {}
    for shard in shards:
        data_offset, header = read_safetensors_header(source.path / shard)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            layer = architecture.disk_layer(name)
            if layer is None:
                continue
            if layer in projections:
                raise ModelError(f"two down-projection weights for layer {layer}: {projections[layer].name} and {name}")
            begin, end = entry["data_offsets"]
            projections[layer] = DownProjection(
                layer=layer,
                name=name,
                shard=shard,
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                data_start=data_offset + begin,
                data_end=data_offset + end,
            )
    expected = num_decoder_layers(config)
    if sorted(projections) != list(range(expected)):
        found = ", ".join(str(layer) for layer in sorted(projections)) or "none"
        raise ModelError(
            f"{source.path}: config.json declares {expected} decoder layers but the down-projection "
            f"weights found on disk are for layers [{found}]",
            hint=f"expected tensors named like {architecture.disk_patterns[0]!r}",
        )
    return Checkpoint(
        source=source,
        config=config,
        architecture=architecture,
        shards=tuple(shards),
        down_projections=tuple(projections[layer] for layer in range(expected)),
    )


def _shard_files(path: Path) -> list[str]:
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ModelError(
                f"{index_path}: weight_map must be an object of tensor name -> shard file", hint=_CORRUPT_HINT
            )
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise ModelError(f"{path}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return shards
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise ModelError(
        f"{path} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})",
        hint="kvwctl reads safetensors only; convert the checkpoint with save_pretrained first",
    )


# --- writing -------------------------------------------------------------------------------------


def copy_patched_shard(source: Path, target: Path, patches: dict[tuple[int, int], bytes]) -> None:
    """Copy a shard byte for byte, then overwrite the byte ranges of edited tensors in place.

    Edited tensors keep their dtype and shape, so the header and every other byte of the file
    stay identical to the input: untouched tensors are byte-identical by construction.
    """
    shutil.copyfile(source, target)
    with target.open("r+b") as stream:
        for (start, end), data in patches.items():
            if len(data) != end - start:
                raise AssertionError(f"patch for bytes {start}:{end} has {len(data)} bytes")
            stream.seek(start)
            stream.write(data)


def carry_over_files(source: Path, target: Path, *, skip: set[str]) -> list[str]:
    """Copy every non-weight file of a checkpoint (tokenizer, processor, configs, templates).

    Returns the files left out because they hold weights in another format.
    """
    left_out = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0].startswith(".") or not path.is_file():
            continue
        name = relative.as_posix()
        if name in skip:
            continue
        if path.suffix in FOREIGN_WEIGHT_SUFFIXES:
            left_out.append(name)
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)  # follows the Hub cache's symlinks to blobs
    return left_out
