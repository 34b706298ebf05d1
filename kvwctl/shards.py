"""Profiles made in pieces: which samples a shard holds, partial profiles, and their merge.

    kvwctl profile --model M --data retain.jsonl --split retain --shard 1/2 --out r-1.safetensors
    kvwctl profile --model M --data retain.jsonl --split retain --shard 2/2 --out r-2.safetensors
    kvwctl profile merge r-1.safetensors r-2.safetensors --out profile-retain.safetensors

A data split's samples are cut into the batches a single run forms (``--batch-size`` consecutive
samples of the split in length order, ``modeling.length_order``), and shard ``K/N`` (1 <= K <= N, numbered from 1 as ``eval --fold``) takes the K-th of N
contiguous runs of whole batches. Each shard therefore profiles exactly the batches the single run
would, and a forget profile merged from its shards holds the very same per-sample rows; a retain
profile's pooled sums are added shard by shard, in shard order, so they equal the single run's to
float64 rounding. ``torchrun`` ranks (``kvwctl.distributed``) take the same shares, rank r being
shard r+1 of the world size, and are merged by the same function.

A **partial profile** (format ``kvwctl.profile-part/1``) holds a shard's tensors exactly as a profile
of its samples would (retain: pooled ``layers.N.sum`` (m,) and ``count`` (); forget: per-sample rows)
and the metadata of the whole run, except that ``num_samples``, ``num_positions`` and ``sample_ids``
describe the shard, plus ``shard_index`` (K), ``shard_count`` (N), ``shard_samples`` (``[start,
stop]``, the half-open range of positions in the length order it holds), ``sample_order`` (a JSON
list: the data index of each sample it holds, in its row order) and ``data_num_samples`` (the
split's size). Merging puts the rows back in data order by ``sample_order``. No stage but ``merge`` reads it: the accessor given several files merges them first.

``merge_parts`` refuses parts that disagree on anything that decides the numbers (model
fingerprint, data sha256, split, positions, batch size, dtype, the shard count, the tool version,
redaction) and a set of shards that is incomplete, duplicated or whose ranges are not the ones the
split's size and batch size give. The merged profile is the one the single run writes: ``data`` is
the first shard's, ``device`` the shards' devices (joined by commas where they differ).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvwctl.artifacts import PROFILE_FORMAT, PROFILE_PART_FORMAT, Artifact, read_artifact, write_artifact
from kvwctl.errors import ArtifactError, UsageError
from kvwctl.outputs import check_outputs

if TYPE_CHECKING:
    import torch

SHARD_KEYS = ("shard_index", "shard_count", "shard_samples", "sample_order", "data_num_samples")
# Metadata that may differ between the parts of one profile: it describes the part, not the run.
_PER_PART_KEYS = frozenset({*SHARD_KEYS, "format", "num_samples", "num_positions", "sample_ids", "data", "device"})


@dataclass(frozen=True)
class Shard:
    """Shard ``number`` of ``count`` (1-based, as ``--shard K/N`` spells it)."""

    number: int
    count: int

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``K/N`` -> ``Shard(K, N)``, 1 <= K <= N."""
    left, slash, right = text.partition("/")
    if slash and left.strip().isdigit() and right.strip().isdigit():
        number, count = int(left), int(right)
        if 1 <= number <= count:
            return Shard(number, count)
    raise UsageError(f"{text!r} is not K/N with 1 <= K <= N", hint="e.g. --shard 2/4 for the second of four shards")


def shard_samples(num_samples: int, batch_size: int, shard: Shard) -> range:
    """The sample indices shard ``K/N`` profiles: the K-th of N contiguous runs of whole batches."""
    batches = -(-num_samples // batch_size)
    if shard.count > batches:
        raise UsageError(
            f"--shard {shard}: {num_samples} samples make {batches} batch{'es' if batches != 1 else ''} "
            f"of {batch_size}, too few for {shard.count} shards",
            hint=f"use at most {batches} shards (or a smaller --batch-size)",
        )
    first = (shard.number - 1) * batches // shard.count
    last = shard.number * batches // shard.count
    return range(first * batch_size, min(last * batch_size, num_samples))


def part_metadata(
    metadata: dict[str, str], shard: Shard, samples: range, data_num_samples: int, sample_order: Sequence[int]
) -> dict[str, str]:
    """A profile's metadata (of the shard's samples) marked as shard ``K/N`` of a split.

    ``samples`` are positions in the length order; ``sample_order`` the data index of each."""
    return metadata | {
        "format": PROFILE_PART_FORMAT,
        "shard_index": str(shard.number),
        "shard_count": str(shard.count),
        "shard_samples": json.dumps([samples.start, samples.stop]),
        "sample_order": json.dumps(list(sample_order)),
        "data_num_samples": str(data_num_samples),
    }


def merge_parts(parts: Sequence[Artifact]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the profile the single run writes, from all of its shards."""
    import torch

    if not parts:
        raise UsageError("no partial profiles to merge")
    ordered = _check_parts(parts)
    first = ordered[0]
    split = first.metadata["split"]
    names = sorted(first.tensors)
    for part in ordered[1:]:
        if sorted(part.tensors) != names:
            raise ArtifactError(f"{part.path} holds other tensors than {first.path}: they profile different models")
    tensors: dict[str, torch.Tensor] = {}
    for name in names:  # layers.N.sum, layers.N.experts.sum and .count, count
        if split == "retain":
            total = (
                ordered[0].tensors[name].clone()
            )  # (m,) float64 (experts (E, m), counts int64), added in shard order
            for part in ordered[1:]:
                total += part.tensors[name]
            tensors[name] = total
        else:
            tensors[name] = torch.cat([part.tensors[name] for part in ordered])  # (samples, ...), length order
    sample_ids = [sample_id for part in ordered for sample_id in _sample_ids(part)]
    order = [index for part in ordered for index in _sample_order(part)]  # the data index of each row
    if sorted(order) != list(range(int(first.metadata["data_num_samples"]))):
        raise ArtifactError(
            "the shards' sample_order do not cover the split's samples once each",
            hint="the files were altered or not written by kvwctl profile --shard",
        )
    if len(sample_ids) != len(order):
        raise ArtifactError(
            f"the shards hold {len(order)} samples but list {len(sample_ids)} sample_ids",
            hint="the files were altered or not written by kvwctl profile --shard",
        )
    rows = sorted(range(len(order)), key=order.__getitem__)  # rows in data order
    sample_ids = [sample_ids[row] for row in rows]
    if split == "forget":
        permutation = torch.tensor(rows, dtype=torch.int64)
        tensors = {name: tensor.index_select(0, permutation) for name, tensor in tensors.items()}
    devices = sorted({part.metadata.get("device", "") for part in ordered})
    metadata = {key: value for key, value in first.metadata.items() if key not in SHARD_KEYS}
    metadata |= {
        "format": PROFILE_FORMAT,
        "num_samples": first.metadata["data_num_samples"],
        "num_positions": str(int(tensors["count"].sum())),
        "sample_ids": json.dumps(sample_ids),
    }
    if "device" in first.metadata:
        metadata["device"] = ",".join(devices)
    return tensors, metadata


def _check_parts(parts: Sequence[Artifact]) -> list[Artifact]:
    """The parts in shard order, after every check of the module docstring."""
    first = parts[0]
    for part in parts[1:]:
        for key in sorted((part.metadata.keys() | first.metadata.keys()) - _PER_PART_KEYS):
            if part.metadata.get(key) != first.metadata.get(key):
                raise ArtifactError(
                    f"{first.path} and {part.path} are not parts of one profile: {key} is "
                    f"{first.metadata.get(key)!r} vs {part.metadata.get(key)!r}",
                    hint="merge the shards of one run: the same model, data and options",
                )
    count = _positive_int(first, "shard_count")
    by_number: dict[int, Artifact] = {}
    for part in parts:
        if part.metadata["shard_count"] != str(count):
            raise ArtifactError(
                f"{first.path} is one of {count} shards but {part.path} one of {part.metadata['shard_count']}",
                hint="merge the shards of one run",
            )
        number = _positive_int(part, "shard_index")
        if number > count:
            raise ArtifactError(f"{part.path}: shard_index {number} is beyond shard_count {count}")
        if number in by_number:
            raise ArtifactError(
                f"shard {number}/{count} is given twice: {by_number[number].path} and {part.path}",
                hint="pass each shard once",
            )
        by_number[number] = part
    missing = [number for number in range(1, count + 1) if number not in by_number]
    if missing:
        shown = ", ".join(f"{number}/{count}" for number in missing)
        raise ArtifactError(
            f"the shards are incomplete: {shown} missing ({len(parts)} of {count} given)",
            hint="pass every shard of the run",
        )
    num_samples = _positive_int(first, "data_num_samples")
    batch_size = _positive_int(first, "batch_size")
    ordered = [by_number[number] for number in range(1, count + 1)]
    for number, part in enumerate(ordered, start=1):
        expected = shard_samples(num_samples, batch_size, Shard(number, count))
        found = part.metadata["shard_samples"]
        if found != json.dumps([expected.start, expected.stop]):
            raise ArtifactError(
                f"{part.path}: shard {number}/{count} holds samples {found}; {num_samples} samples in batches "
                f"of {batch_size} give it [{expected.start}, {expected.stop}]",
                hint="the file was altered or not written by kvwctl profile --shard",
            )
        held = len(expected) if part.metadata["split"] == "forget" else 1
        rows = part.tensors["count"].reshape(-1).numel()
        if rows != held:
            raise ArtifactError(f"{part.path}: {rows} count entries for samples {found}; expected {held}")
    return ordered


def _sample_ids(part: Artifact) -> list[str]:
    """A part's ``sample_ids`` (a JSON list of strings), one per sample it holds."""
    try:
        ids = json.loads(part.metadata.get("sample_ids", "[]"))
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(sample_id, str) for sample_id in ids):
        raise ArtifactError(f"{part.path}: metadata sample_ids is not a JSON list of strings")
    return ids


def _sample_order(part: Artifact) -> list[int]:
    """A part's ``sample_order`` (a JSON list of data indices), one per sample it holds."""
    try:
        order = json.loads(part.metadata.get("sample_order", ""))
    except ValueError:
        order = None
    if not isinstance(order, list) or not all(isinstance(index, int) and index >= 0 for index in order):
        raise ArtifactError(f"{part.path}: metadata sample_order is not a JSON list of sample indices")
    return order


def _positive_int(part: Artifact, key: str) -> int:
    text = part.metadata[key]
    if not text.isdecimal() or int(text) < 1:
        raise ArtifactError(f"{part.path}: metadata {key} is {text!r}; expected a positive integer")
    return int(text)


def read_parts(paths: Sequence[Path]) -> list[Artifact]:
    """Partial profiles, each read and checked as its format says (kvwctl.artifacts)."""
    parts = []
    for path in paths:
        if format_of(path) == PROFILE_FORMAT:
            raise ArtifactError(
                f"{path} is a complete profile, not a shard of one",
                hint="merge only the files written by kvwctl profile --shard K/N",
            )
        parts.append(read_artifact(path, PROFILE_PART_FORMAT))
    return parts


def format_of(path: Path) -> str | None:
    """The ``format`` tag of a safetensors file, or None if it is not one (read_artifact reports it)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as stream:
            return (stream.metadata() or {}).get("format")
    except SafetensorError:
        return None


def merged_artifact(paths: Sequence[Path]) -> Artifact:
    """The profile the shards at ``paths`` merge into, in memory (the accessor's several files)."""
    tensors, metadata = merge_parts(read_parts(paths))
    return Artifact(path=paths[0], metadata=metadata, tensors=tensors)


@dataclass(frozen=True)
class MergeResult:
    path: Path
    split: str
    num_samples: int
    num_positions: int
    num_shards: int

    def summary(self) -> dict[str, object]:
        """What ``--json`` prints beside the path."""
        return {
            "split": self.split,
            "samples": self.num_samples,
            "positions": self.num_positions,
            "shards": self.num_shards,
        }


def run_merge(paths: Sequence[Path], out: Path, *, force: bool) -> MergeResult:
    """Merge the partial profiles at ``paths`` into the complete profile ``out``."""
    check_outputs(files=[out], inputs=list(paths), force=force)
    parts = read_parts(paths)
    tensors, metadata = merge_parts(parts)
    write_artifact(out, tensors, metadata)
    return MergeResult(
        path=out,
        split=metadata["split"],
        num_samples=int(metadata["num_samples"]),
        num_positions=int(metadata["num_positions"]),
        num_shards=len(parts),
    )
