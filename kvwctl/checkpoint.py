"""Checkpoints on disk: open one (its tensors, layers, files), fingerprint it, copy patched shards.

A checkpoint is a directory with ``config.json`` and safetensors weights — one
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` shards listed in
``model.safetensors.index.json``. Only safetensors are read. Where a directory comes from (a
local path or a Hub id) is ``kvwctl.source``; how its JSON files and safetensors headers are read
and checked whole is ``kvwctl.headers``.

The **model fingerprint** is a SHA-256 over the canonical ``config.json`` and every tensor of
every safetensors shard (language model, vision tower, projector: everything the coefficients
depend on): per tensor its canonical name, dtype, shape and the SHA-256 of its raw bytes, sorted.
The canonical name drops the layout's prefix (everything before the first ``<word>.<N>.`` such as
``layers.3.``, else all but the last two components), so the same weights stored in the Hub
layout (``language_model.model.layers.3.…``) or the transformers 5 layout
(``model.language_model.layers.3.…``) share a fingerprint, while swapping two layers or two
projections changes it. Per-tensor digests are cached per shard file, keyed by its resolved path,
size and mtime (``kvwctl.files.cached_digests``), so a checkpoint is hashed once, not on every run.

**Names and links are checked when a checkpoint is opened.** Every shard name in the index must
be a plain relative path (``kvwctl.files.inside``); every indexed tensor must be in the shard the
index names, and no tensor in two shards or outside the index. A file that is a **symlink** is
followed only when its target resolves inside the checkpoint directory or inside the Hub cache's
``blobs`` directory of the same repository (``huggingface_hub`` stores every snapshot file as a
link ``snapshots/<commit>/<file> -> ../../blobs/<hash>``); any other link is an error naming it
and its target. Outputs hold the targets' bytes as regular files, so an output checkpoint is
self-contained, and a link planted in a checkpoint (``tokenizer.json -> ~/.ssh/id_rsa``) can never
copy a file from elsewhere into an output that is then handed over. Symlinked directories are
refused. Copy linked files into the checkpoint (``cp -L``) to use them.

"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvwctl.architectures import Architecture, get_architecture, num_decoder_layers
from kvwctl.errors import ModelError
from kvwctl.files import cached_digests
from kvwctl.headers import CORRUPT_HINT, read_json_object, read_safetensors_header
from kvwctl.outputs import MANIFEST_FILE as MANIFEST_FILE
from kvwctl.outputs import inside
from kvwctl.shardcopy import Patch, copy_with_patches
from kvwctl.shardcopy import ShardCopy as ShardCopy
from kvwctl.source import ModelSource

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FORMAT = "kvwctl.manifest/1"
COPY_BLOCK_SIZE = 1 << 22  # bytes read at a time when a shard is copied (a few such blocks are held)
# Weight formats that are never carried into an output: they would hold the unedited weights.
FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored on disk: its shard, dtype, shape and absolute byte range."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    data_start: int  # absolute byte offset in the shard file
    data_end: int


@dataclass(frozen=True)
class DownProjection(StoredTensor):
    """One layer's down-projection weight as stored on disk."""

    layer: int = -1


@dataclass(frozen=True)
class ExpertTensor(StoredTensor):
    """An expert down projection on disk: one expert's 2-D weight, or all experts fused in 3-D."""

    layer: int = -1
    expert: int | None = None  # None: the fused (E, ., .) tensor of every expert of the layer
    axis: int = 1  # the axis of this tensor that indexes knowledge vectors


@dataclass(frozen=True)
class ExpertProjection:
    """The routed experts' down projections of one layer as stored: ``num_experts`` x ``num_vectors``."""

    layer: int
    num_experts: int
    num_vectors: int
    tensors: tuple[ExpertTensor, ...]  # one per expert (by expert), or one fused tensor


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its config, shard files, every stored tensor and the down projections."""

    source: ModelSource
    config: dict[str, Any]
    architecture: Architecture
    shards: tuple[str, ...]
    # Per layer, the down projection of a dense model; () for a mixture-of-experts model, whose
    # layers are in ``dense_by_layer`` and ``expert_projections``.
    down_projections: tuple[DownProjection, ...] = field(repr=False)
    tensors: tuple[StoredTensor, ...] = field(default=(), repr=False)  # every tensor, shard by shard
    files: tuple[str, ...] = field(default=(), repr=False)  # every other file (relative POSIX names)
    # Mixture of experts, per layer: the dense (or shared-expert) down projection, None in a layer
    # with routed experts only; and the routed experts, None in a dense layer. () for dense models.
    dense_by_layer: tuple[DownProjection | None, ...] = field(default=(), repr=False)
    expert_projections: tuple[ExpertProjection | None, ...] = field(default=(), repr=False)

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def num_layers(self) -> int:
        return len(self.expert_projections) if self.expert_projections else len(self.down_projections)

    def dense(self, layer: int) -> DownProjection | None:
        """The dense (or shared-expert) down projection of ``layer``, None in a layer with experts only."""
        return self.dense_by_layer[layer] if self.expert_projections else self.down_projections[layer]

    def num_vectors(self, layer: int) -> int:
        """The dense down projection's vectors in ``layer`` (0 in a layer with routed experts only)."""
        projection = self.dense(layer)
        return 0 if projection is None else projection.shape[self.architecture.vector_axis]

    def experts(self, layer: int) -> ExpertProjection | None:
        """The routed experts of ``layer``, or None (a dense layer or a dense model)."""
        return self.expert_projections[layer] if self.expert_projections else None

    def edited_tensor_names(self, layer: int) -> list[str]:
        """Every stored tensor that weakening ``layer`` rewrites: its dense and its expert down projections."""
        dense, experts = self.dense(layer), self.experts(layer)
        return ([dense.name] if dense is not None else []) + ([t.name for t in experts.tensors] if experts else [])

    @property
    def input_paths(self) -> list[Path]:
        """The directory and every file read from it: what no output may land on or in."""
        return [self.path, *(self.path / name for name in (*self.shards, *self.files))]

    def tensor_digests(self) -> dict[str, str]:
        """Tensor name -> SHA-256 of its raw bytes, read once per shard file and then cached."""
        digests: dict[str, str] = {}
        for shard in self.shards:
            entries = [tensor for tensor in self.tensors if tensor.shard == shard]
            digests.update(cached_digests(self.path / shard, functools.partial(_hash_tensors, tensors=entries)))
        return digests

    def fingerprint(self, digests: dict[str, str] | None = None) -> str:
        """SHA-256 over the canonical config and every tensor (see the module docstring).

        ``digests`` (tensor name -> SHA-256 of its bytes) defaults to :meth:`tensor_digests`;
        ``apply`` passes the digests of the checkpoint it wrote, derived without reading it back.
        """
        digests = self.tensor_digests() if digests is None else digests
        records = sorted(
            f"{canonical_tensor_name(tensor.name)}|{tensor.dtype}|{list(tensor.shape)}|{digests[tensor.name]}"
            for tensor in self.tensors
        )
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        for record in records:
            digest.update(f"\n{record}".encode())
        return digest.hexdigest()


_NUMBERED_MODULE = re.compile(r"(?:^|\.)([A-Za-z_][A-Za-z0-9_]*\.[0-9]+\.)")


def canonical_tensor_name(name: str) -> str:
    """A tensor's name without its layout's prefix: from the first ``<word>.<N>.`` on, else the last two parts.

    ``language_model.model.layers.3.mlp.down_proj.weight`` and
    ``model.language_model.layers.3.mlp.down_proj.weight`` are both ``layers.3.mlp.down_proj.weight``;
    ``language_model.lm_head.weight`` and ``lm_head.weight`` are both ``lm_head.weight``.
    """
    match = _NUMBERED_MODULE.search(name)
    if match:
        return name[match.start(1) :]
    return ".".join(name.split(".")[-2:])


def _hash_tensors(path: Path, tensors: list[StoredTensor]) -> dict[str, str]:
    """SHA-256 of every tensor's byte range, reading the file once in offset order."""
    digests = {}
    with path.open("rb") as stream:
        for tensor in sorted(tensors, key=lambda entry: entry.data_start):
            digest = hashlib.sha256()
            stream.seek(tensor.data_start)
            remaining = tensor.data_end - tensor.data_start
            while remaining:
                block = stream.read(min(remaining, 1 << 24))
                if not block:
                    raise ModelError(f"{path} is truncated inside tensor {tensor.name}")
                digest.update(block)
                remaining -= len(block)
            digests[tensor.name] = digest.hexdigest()
    return digests


def open_checkpoint(source: ModelSource) -> Checkpoint:
    """Read ``config.json`` and the safetensors headers, and check names, links and the index.

    No tensor data is loaded. Every indexed tensor must be in the shard the index names, every
    tensor of a shard in the index, and no tensor in two shards: transformers would otherwise
    initialise a missing weight at random or load whichever copy comes last.
    """
    config_path = source.path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{source.path} has no config.json; it is not a transformers checkpoint")
    files = _checkpoint_files(source.path)
    config = read_json_object(config_path)
    architecture = get_architecture(config.get("model_type"))
    shards, weight_map = _shard_files(source.path)
    tensors: list[StoredTensor] = []
    projections: dict[int, DownProjection] = {}
    expert_tensors: list[ExpertTensor] = []
    where: dict[str, str] = {}
    for shard in shards:
        for tensor in _stored_tensors(source.path / shard, shard):
            if tensor.name in where:
                raise ModelError(
                    f"{source.path}: tensor {tensor.name} is stored twice, in {where[tensor.name]} and {shard}"
                )
            where[tensor.name] = shard
            tensors.append(tensor)
            if architecture.experts is not None:
                matched = architecture.experts.disk_match(tensor.name)
                if matched is not None:
                    expert_layer, expert, axis = matched
                    expert_tensors.append(ExpertTensor(**vars(tensor), layer=expert_layer, expert=expert, axis=axis))
                    continue
            layer = architecture.disk_layer(tensor.name)
            if layer is None:
                continue
            if layer in projections:
                raise ModelError(
                    f"two down-projection weights for layer {layer}: {projections[layer].name} and {tensor.name}"
                )
            projections[layer] = DownProjection(**vars(tensor), layer=layer)
    if weight_map is not None:
        _check_index(source.path, weight_map, where)
    expected = num_decoder_layers(config)
    if architecture.experts is not None:
        from kvwctl.experts import dense_layers, expert_projections

        experts = expert_projections(source.path, config, architecture, expert_tensors, tensors, expected)
        return Checkpoint(
            source=source,
            config=config,
            architecture=architecture,
            shards=tuple(shards),
            down_projections=(),
            tensors=tuple(tensors),
            files=tuple(name for name in files if name not in shards),
            dense_by_layer=tuple(dense_layers(source.path, projections, experts)),
            expert_projections=tuple(experts),
        )
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
        tensors=tuple(tensors),
        files=tuple(name for name in files if name not in shards),
    )


def _stored_tensors(path: Path, shard: str) -> list[StoredTensor]:
    data_offset, header = read_safetensors_header(path)
    size = path.stat().st_size
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(offset, int) for offset in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= size - data_offset
        ):
            raise ModelError(f"{path}: tensor {name} has invalid or out-of-file data offsets {offsets!r}")
        tensors.append(
            StoredTensor(
                name=name,
                shard=shard,
                dtype=str(entry.get("dtype")),
                shape=tuple(entry.get("shape") or ()),
                data_start=data_offset + offsets[0],
                data_end=data_offset + offsets[1],
            )
        )
    return tensors


def _check_index(path: Path, weight_map: dict[str, str], where: dict[str, str]) -> None:
    """Every indexed tensor in the shard the index names; no tensor of a shard missing from the index."""
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            found = f"it is in {where[name]}" if name in where else "no shard holds it"
            raise ModelError(
                f"{path}: {INDEX_FILE} lists tensor {name} in {shard}, but {found}",
                hint="the checkpoint is incomplete or its index is stale; re-save it with save_pretrained",
            )
    for name, shard in where.items():
        if name not in weight_map:
            raise ModelError(
                f"{path}: {shard} holds tensor {name}, which {INDEX_FILE} does not list",
                hint="the checkpoint's index is stale; re-save it with save_pretrained",
            )


def _shard_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard names (checked to stay inside ``path``) and the index's weight map, if any."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ModelError(
                f"{index_path}: weight_map must be an object of tensor name -> shard file", hint=CORRUPT_HINT
            )
        roots = _link_roots(path)
        for shard in weight_map.values():
            _check_link(inside(path, shard, source=index_path), roots)
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise ModelError(f"{path}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return shards, weight_map
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    raise ModelError(
        f"{path} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})",
        hint="kvwctl reads safetensors only; convert the checkpoint with save_pretrained first",
    )


def _link_roots(path: Path) -> list[Path]:
    """Where a link in the checkpoint ``path`` may point: inside it, or its Hub cache's blobs."""
    roots = [path.resolve()]
    if path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
        roots.append((path.parent.parent / "blobs").resolve())  # a huggingface_hub cache snapshot
    return roots


def _check_link(file: Path, roots: list[Path]) -> None:
    """Refuse a file that is, or lies under, a link resolving outside every root."""
    target = file.resolve()
    if not any(target == root or root in target.parents for root in roots):
        raise ModelError(
            f"{file} is a symlink to {target}, outside the checkpoint",
            hint="kvwctl follows links only inside the checkpoint or its Hub cache; copy the file in (cp -L)",
        )


def _checkpoint_files(path: Path) -> list[str]:
    """Every file of the checkpoint (hidden entries skipped), each link checked by the rule above."""
    roots = _link_roots(path)
    names = []
    for directory, subdirectories, filenames in os.walk(path):
        base = Path(directory)
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in subdirectories:
            if (base / name).is_symlink():
                raise ModelError(
                    f"{base / name} is a symlink to a directory ({os.readlink(base / name)}); kvwctl does not follow it",
                    hint="copy the directory into the checkpoint (cp -rL)",
                )
        for name in sorted(filenames):
            file = base / name
            relative = file.relative_to(path)
            if relative.parts[0].startswith("."):
                continue
            _check_link(file, roots)
            if file.is_file():
                names.append(relative.as_posix())
    return names


# --- writing -------------------------------------------------------------------------------------


def copy_patched_shard(source: Path, target: Path, patches: Mapping[tuple[int, int], Patch | bytes]) -> ShardCopy:
    """Copy a shard byte for byte with the byte ranges of edited tensors rewritten; hash both sides.

    Edited tensors keep their dtype and shape, so the header and every other byte of the file
    stay identical to the input: untouched tensors are byte-identical by construction. A patch is
    the new bytes of its range or a :class:`kvwctl.shardcopy.Patch` that rewrites them as they
    stream through (apply's scaling); reading, patching and writing overlap in blocks of
    :data:`COPY_BLOCK_SIZE`, and both files are hashed as the bytes stream through, so neither is
    read a second time for its hash (:mod:`kvwctl.shardcopy`).
    """
    return copy_with_patches(source, target, patches, block_size=COPY_BLOCK_SIZE)


def carry_over_files(checkpoint: Checkpoint, target: Path, *, skip: set[str]) -> list[str]:
    """Copy every non-weight file of a checkpoint (tokenizer, processor, configs, templates).

    The files are those :func:`open_checkpoint` listed and checked; links are copied as the regular
    files they point to (inside the checkpoint or its Hub cache, by the rule above). Returns the
    files left out because they hold weights in another format.
    """
    left_out = []
    for name in checkpoint.files:
        if name in skip:
            continue
        if Path(name).suffix in FOREIGN_WEIGHT_SUFFIXES:
            left_out.append(name)
            continue
        destination = inside(target, name, source=checkpoint.path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint.path / name, destination)  # follows the Hub cache's links to blobs
    return left_out
