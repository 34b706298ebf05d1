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
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvwctl.architectures import Architecture, get_architecture, num_decoder_layers
from kvwctl.errors import KvwError, ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FILE = "kvw_manifest.json"
MANIFEST_FORMAT = "kvwctl.manifest/1"
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "tokenizer*",
]
COPY_BLOCK_SIZE = 1 << 24  # bytes read at a time when a shard is copied and hashed
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
            raise KvwError(
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


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The header of a safetensors file: (byte offset where tensor data begins, header dict)."""
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) != 8:
            raise ModelError(f"{path} is not a safetensors file (too short)")
        (header_size,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(stream.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{path} is not a safetensors file (bad header)") from None
    return 8 + header_size, header


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

    @property
    def num_vectors(self) -> int:
        return self.shape[-1]


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
    config = json.loads(config_path.read_text(encoding="utf-8"))
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
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = sorted(set(index.get("weight_map", {}).values()))
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


@dataclass(frozen=True)
class ShardCopy:
    """The SHA-256 of a shard as it was read and of the copy as it was written."""

    input_sha256: str
    output_sha256: str


def copy_patched_shard(source: Path, target: Path, patches: dict[tuple[int, int], bytes]) -> ShardCopy:
    """Copy a shard byte for byte with the byte ranges of edited tensors replaced; hash both sides.

    Edited tensors keep their dtype and shape, so the header and every other byte of the file
    stay identical to the input: untouched tensors are byte-identical by construction. Both files
    are hashed as the bytes stream through, so neither is read a second time for its hash.
    """
    for (start, end), data in patches.items():
        if len(data) != end - start:
            raise AssertionError(f"patch for bytes {start}:{end} has {len(data)} bytes")
    input_digest, output_digest = hashlib.sha256(), hashlib.sha256()
    position = 0
    with source.open("rb") as reader, target.open("wb") as writer:
        while block := reader.read(COPY_BLOCK_SIZE):
            input_digest.update(block)
            block_end = position + len(block)
            patched = None
            for (start, end), data in patches.items():
                low, high = max(start, position), min(end, block_end)
                if low < high:
                    patched = patched if patched is not None else bytearray(block)
                    patched[low - position : high - position] = data[low - start : high - start]
            written = block if patched is None else bytes(patched)
            output_digest.update(written)
            writer.write(written)
            position = block_end
    if any(end > position for _, end in patches):
        raise AssertionError(f"a patch ends beyond the {position} bytes of {source}")
    return ShardCopy(input_sha256=input_digest.hexdigest(), output_sha256=output_digest.hexdigest())


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
