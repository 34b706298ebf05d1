"""Stage files (profiles, accessors): safetensors with string metadata (DESIGN §2).

Every file carries a ``format`` tag with a version (``kvwctl.profile/1``, ``kvwctl.accessor/1``),
the tool version, the model reference, resolved revision and fingerprint, and how it was made.
Readers check the format before anything else and name the file and both sides of any mismatch.
An accessor-format file holds exposures; ``accessor`` writes it one-shot and ``apply
--progressive`` writes the exposure it applied, both with :func:`exposure_metadata`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl import __version__
from kvwctl.checkpoint import Checkpoint
from kvwctl.errors import ArtifactError
from kvwctl.files import now, save_safetensors_atomically
from kvwctl.method import EPSILON

if TYPE_CHECKING:
    import torch

PROFILE_FORMAT = "kvwctl.profile/1"
ACCESSOR_FORMAT = "kvwctl.accessor/1"


def model_metadata(checkpoint: Checkpoint, fingerprint: str) -> dict[str, str]:
    return {
        "tool_version": __version__,
        "model": checkpoint.source.reference,
        "model_revision": checkpoint.source.revision or "",
        "model_fingerprint": fingerprint,
        "model_type": checkpoint.architecture.model_type,
        "num_layers": str(checkpoint.num_layers),
        "created": now(),
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

    def json_field(self, name: str) -> Any:
        return json.loads(self.metadata[name])


def write_artifact(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_safetensors_atomically(tensors, path, metadata)


def artifact_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes :func:`write_artifact` writes for ``tensors`` and ``metadata``."""
    from safetensors.torch import save

    return save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata=metadata)


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
    return Artifact(path=path, metadata=metadata, tensors=tensors)


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
        "created": now(),
        "mode": mode,
        "positions": made_from.metadata["positions"],
        "batch_size": str(len(batches[0])),
        "num_batches": str(len(batches)),
        "batches": json.dumps([[batch.start, batch.stop] for batch in batches]),
        "sample_ids": sample_ids,
        "epsilon": repr(EPSILON),
        **extra,
    }
