"""Stage files (profiles, accessors): safetensors with string metadata (DESIGN §2).

Every file carries a ``format`` tag with a version (``kvwctl.profile/2``, ``kvwctl.accessor/2``),
the tool version, the model reference, resolved revision and fingerprint, and how it was made.
Readers check the format before anything else and name the file and both sides of any mismatch;
a file of an earlier version (``/1``, before mixture-of-experts layers gave the formats an expert
axis) is refused with the command that regenerates it.

Per layer a file holds the parts the model has (``kvwctl.method.dense_part``/``experts_part``): a
dense (or shared-expert) down projection, ``layers.N.sum`` / ``layers.N.exposure``, and routed
experts, ``layers.N.experts.sum`` with their own ``layers.N.experts.count`` /
``layers.N.experts.exposure``; every layer has at least one.
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
from kvwctl.method import EPSILON, dense_part, experts_part, part_layer, pooled_coefficient

if TYPE_CHECKING:
    import torch

PROFILE_FORMAT = "kvwctl.profile/2"
ACCESSOR_FORMAT = "kvwctl.accessor/2"
# A shard's share of a profile (``profile --shard i/N``), merged by ``profile merge`` (kvwctl.shards),
# and the checkpoint of an unfinished profile run (``--checkpoint-every``, kvwctl.resume).
PROFILE_PART_FORMAT = "kvwctl.profile-part/1"
PROFILE_RESUME_FORMAT = "kvwctl.profile-resume/1"
# What regenerates a stage file of an earlier format version.
_REGENERATE = {
    PROFILE_FORMAT: "kvwctl profile --split retain|forget",
    ACCESSOR_FORMAT: "kvwctl accessor (from profiles made by this kvwctl), or apply --progressive again",
}


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

    def parts(self, leaf: str) -> list[str]:
        """The parts (``layers.N``, ``layers.N.experts``) with a tensor ``<part>.<leaf>``, by layer, dense first."""
        return sorted(
            (name.removesuffix(f".{leaf}") for name in self.tensors if name.endswith(f".{leaf}")),
            key=lambda part: (part_layer(part), part),
        )

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
    family = expected_format.rsplit("/", 1)[0]
    if found is not None and found != expected_format and found.rsplit("/", 1)[0] == family:
        raise ArtifactError(
            f"{path} has format {found}, written by an earlier kvwctl; this kvwctl reads {expected_format} "
            "(the formats gained an expert axis for mixture-of-experts models)",
            hint=f"regenerate it with {_REGENERATE[expected_format]}",
        )
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
_SHARD_KEYS = ("shard_index", "shard_count", "shard_samples", "sample_order", "data_num_samples")
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
    samples = () if split == "retain" else (count.numel(),)
    for layer in range(num_layers):
        dense, experts = dense_part(layer), experts_part(layer)
        if f"{dense}.sum" not in tensors and f"{experts}.sum" not in tensors:
            problems.append(f"has no tensor {dense}.sum (nor {experts}.sum)")
            continue
        if f"{dense}.sum" in tensors:
            name = f"{dense}.sum"
            problem = _tensor_problem(name, tensors[name], torch.float64, (*samples, -1), non_negative=True)
            if problem is not None:
                problems.append(problem)
        if f"{experts}.sum" in tensors:
            problems += _expert_problems(experts, samples, tensors)
    return problems


def _expert_problems(part: str, samples: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> list[str]:
    """A layer's experts: ``sum`` (*samples, E, m) float64 >= 0 and ``count`` (*samples, E) int64 >= 0."""
    import torch

    sums = tensors[f"{part}.sum"]
    problem = _tensor_problem(f"{part}.sum", sums, torch.float64, (*samples, -1, -1), non_negative=True)
    if problem is not None:
        return [problem]
    name = f"{part}.count"
    counts = tensors.get(name)
    problem = _tensor_problem(name, counts, torch.int64, tuple(sums.shape[:-1]))
    if problem is not None:
        return [problem]
    assert counts is not None
    if bool((counts < 0).any()):
        return [f"tensor {name} has negative values; expected every count >= 0"]
    return []


def _accessor_problems(num_layers: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    """``layers.N.exposure`` (m,) and, if present, ``layers.N.batch_accessor`` (batches, m), all >= 0."""
    import torch

    problems = []
    for layer in range(num_layers):
        parts = [(dense_part(layer), (-1,)), (experts_part(layer), (-1, -1))]
        present = [(part, shape) for part, shape in parts if f"{part}.exposure" in tensors]
        if not present:
            problems.append(f"has no tensor {dense_part(layer)}.exposure (nor {experts_part(layer)}.exposure)")
        for part, shape in present:
            name = f"{part}.exposure"
            exposure = tensors[name]
            problem = _tensor_problem(name, exposure, torch.float32, shape, non_negative=True)
            if problem is None and f"{part}.batch_accessor" in tensors:
                name = f"{part}.batch_accessor"
                problem = _tensor_problem(name, tensors[name], torch.float32, (-1, *exposure.shape), non_negative=True)
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


def retain_parts(retain: Artifact) -> dict[str, torch.Tensor]:
    """``C_r`` of every part (dense ``(m,)``, experts ``(E, m)``, float64) from a retain profile.

    A dense part divides by the split's ``count``; an expert by its own count, 0 where no retain
    position was routed to it (``kvwctl.method.pooled_coefficient``).
    """
    coefficients = {}
    for part in retain.parts("sum"):
        counts = retain.tensors.get(f"{part}.count", retain.tensors["count"])
        coefficients[part] = pooled_coefficient(retain.tensors[f"{part}.sum"].unsqueeze(0), counts.unsqueeze(0))
    return coefficients


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
