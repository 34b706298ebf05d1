"""Stage files (profiles, accessors): safetensors with string metadata (DESIGN §2).

Every file carries a ``format`` tag with a version (``kvwctl.profile/1``, ``kvwctl.accessor/1``),
the tool version, the model reference, resolved revision and fingerprint, and how it was made.
Readers check the format before anything else and name the file and both sides of any mismatch.
An accessor-format file holds exposures; ``accessor`` writes it one-shot and ``apply
--progressive`` writes the exposure it applied, both with :func:`exposure_metadata`.

Every file is validated against its format when it is read *and* before it is written
(:func:`artifact_problems`, one function per format): the metadata the stages read, and every
tensor's dtype, shape, finiteness and sign (sums and exposures >= 0, counts > 0), so a NaN, an
infinity, a negative value or a zero count never reaches the math. Stage files carry no creation
time: the same inputs give the same bytes (``files.save_safetensors_atomically`` also sorts the
metadata keys, which safetensors would write in a random order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvwctl import __version__
from kvwctl.checkpoint import Checkpoint
from kvwctl.errors import ArtifactError
from kvwctl.files import save_safetensors_atomically
from kvwctl.method import EPSILON

if TYPE_CHECKING:
    import torch

PROFILE_FORMAT = "kvwctl.profile/1"
ACCESSOR_FORMAT = "kvwctl.accessor/1"
# A shard's share of a profile (``profile --shard i/N``), merged by ``profile merge`` (kvwctl.shards),
# and the checkpoint of an unfinished profile run (``--checkpoint-every``, kvwctl.resume).
PROFILE_PART_FORMAT = "kvwctl.profile-part/1"
PROFILE_RESUME_FORMAT = "kvwctl.profile-resume/1"


def model_metadata(checkpoint: Checkpoint, fingerprint: str) -> dict[str, str]:
    return {
        "tool_version": __version__,
        "model": checkpoint.source.reference,
        "model_revision": checkpoint.source.revision or "",
        "model_fingerprint": fingerprint,
        "model_type": checkpoint.architecture.model_type,
        "num_layers": str(checkpoint.num_layers),
    }


@dataclass
class Artifact:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]

    def layer_tensor(self, layer: int, name: str) -> torch.Tensor:
        key = f"layers.{layer}.{name}"
        if key not in self.tensors:
            raise ArtifactError(f"{self.path} has no tensor {key}")
        return self.tensors[key]

    @property
    def num_layers(self) -> int:
        return int(self.metadata["num_layers"])


def write_artifact(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a stage file after checking it as a reader would: an invalid file is never written."""
    problems = artifact_problems(metadata["format"], metadata, tensors)
    if problems:
        raise ArtifactError(
            f"refusing to write {path}: {problems[0]}",
            hint="the model produced non-finite or empty coefficients; check its weights and the data",
        )
    save_safetensors_atomically(tensors, path, metadata)


def read_artifact(path: Path, expected_format: str) -> Artifact:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = dict(stream.metadata() or {})
            tensors = {name: stream.get_tensor(name) for name in stream.keys()}
    except SafetensorError as error:
        raise ArtifactError(f"{path} is not a safetensors file: {error}") from None
    found = metadata.get("format")
    if found != expected_format:
        raise ArtifactError(
            f"{path} has format {found or 'none'}; expected {expected_format}",
            hint="pass the file written by the right kvwctl stage",
        )
    problems = artifact_problems(expected_format, metadata, tensors)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ArtifactError(f"{path}: {problems[0]}{more}", hint="the file is damaged or was not written by kvwctl")
    return Artifact(path=path, metadata=metadata, tensors=tensors)


# --- validation ----------------------------------------------------------------------------------

_MODEL_KEYS = ("model", "model_fingerprint", "num_layers", "positions")
_SHARD_KEYS = ("shard_index", "shard_count", "shard_samples", "data_num_samples")
_REQUIRED_METADATA = {
    PROFILE_FORMAT: (*_MODEL_KEYS, "split"),
    ACCESSOR_FORMAT: (*_MODEL_KEYS, "mode", "batch_size"),
    PROFILE_PART_FORMAT: (*_MODEL_KEYS, "split", "batch_size", *_SHARD_KEYS),
    PROFILE_RESUME_FORMAT: (*_MODEL_KEYS, "split", "batches_done"),
}


def artifact_problems(format: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Everything wrong with a stage file of ``format``, each naming the metadata key or tensor."""
    import torch

    missing = [key for key in _REQUIRED_METADATA[format] if key not in metadata]
    if missing:
        return [f"metadata has no {', '.join(missing)}"]
    integers = ("num_layers", "batch_size") if format == ACCESSOR_FORMAT else ("num_layers",)
    for key in integers:
        if not metadata[key].isdecimal() or int(metadata[key]) < 1:
            return [f"metadata {key} is {metadata[key]!r}; expected a positive integer"]
    num_layers = int(metadata["num_layers"])
    if format in (PROFILE_FORMAT, PROFILE_PART_FORMAT):
        return _profile_problems(metadata["split"], num_layers, tensors)
    if format == PROFILE_RESUME_FORMAT:  # per-sample rows whatever the split, and where they belong
        problems = _profile_problems("forget", num_layers, tensors)
        count = tensors.get("count")
        expected = (count.numel(),) if count is not None else (-1,)
        problem = _tensor_problem("sample_indices", tensors.get("sample_indices"), torch.int64, expected)
        return problems + ([problem] if problem is not None else [])
    return _accessor_problems(num_layers, tensors)


def _profile_problems(split: str, num_layers: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    """A retain profile: ``count`` () and ``layers.N.sum`` (m,); a forget one: (samples,) and (samples, m)."""
    import torch

    if split not in ("retain", "forget"):
        return [f"metadata split is {split!r}; expected retain or forget"]
    count = tensors.get("count")
    samples_shape: tuple[int, ...] = () if split == "retain" else (-1,)
    problem = _tensor_problem("count", count, torch.int64, samples_shape)
    if problem is not None:
        return [problem]
    assert count is not None
    empty = (count.reshape(-1) <= 0).nonzero().flatten().tolist()
    if empty:
        where = "" if split == "retain" else f" for sample{'s' if len(empty) > 1 else ''} {empty[:5]}"
        return [f"tensor count is not positive{where}: every sample needs at least one profiled position"]
    problems = []
    for layer in range(num_layers):
        expected = (-1,) if split == "retain" else (count.numel(), -1)
        name = f"layers.{layer}.sum"
        problem = _tensor_problem(name, tensors.get(name), torch.float64, expected, non_negative=True)
        if problem is not None:
            problems.append(problem)
    return problems


def _accessor_problems(num_layers: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    """``layers.N.exposure`` (m,) and, if present, ``layers.N.batch_accessor`` (batches, m), all >= 0."""
    import torch

    problems = []
    for layer in range(num_layers):
        name = f"layers.{layer}.exposure"
        exposure = tensors.get(name)
        problem = _tensor_problem(name, exposure, torch.float32, (-1,), non_negative=True)
        if problem is None and f"layers.{layer}.batch_accessor" in tensors:
            assert exposure is not None
            name = f"layers.{layer}.batch_accessor"
            problem = _tensor_problem(name, tensors[name], torch.float32, (-1, exposure.numel()), non_negative=True)
        if problem is not None:
            problems.append(problem)
    return problems


def _tensor_problem(
    name: str, tensor: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], *, non_negative: bool = False
) -> str | None:
    """What is wrong with one tensor: missing, dtype, shape (-1: any size >= 1), non-finite, negative."""
    import torch

    if tensor is None:
        return f"has no tensor {name}"
    if tensor.dtype != dtype:
        return (
            f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; expected {str(dtype).removeprefix('torch.')}"
        )
    sizes = tuple(tensor.shape)
    if len(sizes) != len(shape) or any(
        size != want if want >= 0 else size < 1 for size, want in zip(sizes, shape, strict=True)
    ):
        wanted = ", ".join("n" if want < 0 else str(want) for want in shape)
        return f"tensor {name} has shape {list(sizes)}; expected ({wanted})"
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return f"tensor {name} has {bad} non-finite value{'s' if bad > 1 else ''} (NaN or infinity)"
        if non_negative and bool((tensor < 0).any()):
            return f"tensor {name} has negative values; expected every value >= 0"
    return None


def check_same_model(first: Artifact, second: Artifact) -> None:
    """Refuse two stage files made from different models."""
    left, right = first.metadata["model_fingerprint"], second.metadata["model_fingerprint"]
    if left != right:
        raise ArtifactError(
            f"{first.path} and {second.path} were made from different models: "
            f"{first.metadata['model']} (fingerprint {left[:12]}) vs "
            f"{second.metadata['model']} (fingerprint {right[:12]})",
        )


def check_fits_model(artifact: Artifact, checkpoint: Checkpoint, fingerprint: str) -> None:
    """Refuse a stage file made from another model than ``checkpoint``."""
    made_from = artifact.metadata["model_fingerprint"]
    if made_from != fingerprint:
        raise ArtifactError(
            f"{artifact.path} was made from {artifact.metadata['model']} (fingerprint {made_from[:12]}), "
            f"not from {checkpoint.source.reference} (fingerprint {fingerprint[:12]})",
            hint="profile and apply must use the same model weights",
        )


def retain_coefficients(retain: Artifact) -> list[torch.Tensor]:
    """``C_r`` per layer, float64 (m,), from a retain profile's pooled sums and count."""
    count = retain.tensors["count"]
    return [retain.layer_tensor(layer, "sum") / count for layer in range(retain.num_layers)]


def exposure_metadata(
    made_from: Artifact, *, mode: str, batches: list[range], sample_ids: str, **extra: str
) -> dict[str, str]:
    """Metadata of an exposure file (accessor format), for both one-shot and progressive runs."""
    model_keys = ("model", "model_revision", "model_fingerprint", "model_type", "num_layers")
    return {
        "format": ACCESSOR_FORMAT,
        **{key: made_from.metadata[key] for key in model_keys},
        "tool_version": __version__,
        "mode": mode,
        "positions": made_from.metadata["positions"],
        "batch_size": str(len(batches[0])),
        "num_batches": str(len(batches)),
        "batches": json.dumps([[batch.start, batch.stop] for batch in batches]),
        "sample_ids": sample_ids,
        "epsilon": repr(EPSILON),
        **extra,
    }
