"""Stage 2: the Forget Knowledge Accessor and the exposure of every knowledge vector.

    kvwctl accessor --forget profile-forget.safetensors --retain profile-retain.safetensors \
                    --batch-size 1 --out accessor.safetensors

For a forget batch ``b`` (``--batch-size`` consecutive forget samples, 1 by default as the
authors ran it), with ``C_f^b`` the token-pooled coefficient of the batch and ``C_r`` that of
the whole retain set:

    A_b = max(0, log(C_f^b + eps) - log(C_r + eps)),   eps = 1e-12
    E   = sum_b A_b                                      (the exposure, per layer and vector)

``apply`` then scales vector ``i`` by ``exp(-gamma * E_i)``. The file stores ``layers.N.exposure``
(m,) float32 and, with ``--save-batches``, ``layers.N.batch_accessor`` (batches, m); a layer's
routed experts (mixture of experts) ``layers.N.experts.exposure`` (E, m) and
``layers.N.experts.batch_accessor`` (batches, E, m), each expert pooled over its own routed positions.
The math is in :mod:`kvwctl.method`; this module reads the profiles and writes the file.
With ``redact`` the metadata's ``sample_ids`` and profile paths are keyed hashes (``kvwctl.redact``);
the ids of a redacted forget profile are hashes already and are copied as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl.artifacts import (
    PROFILE_FORMAT,
    PROFILE_PART_FORMAT,
    Artifact,
    check_same_model,
    exposure_metadata,
    read_artifact,
    retain_parts,
    write_artifact,
)
from kvwctl.errors import ArtifactError
from kvwctl.files import file_sha256
from kvwctl.method import LayerSummary, batch_accessors, batch_ranges, exposure, summarize_parts
from kvwctl.options import AccessorOptions
from kvwctl.outputs import check_outputs
from kvwctl.plans import output_facts
from kvwctl.redact import Redactor
from kvwctl.shards import format_of, merged_artifact


@dataclass(frozen=True)
class AccessorResult:
    path: Path
    num_batches: int
    batch_size: int
    layers: list[LayerSummary]

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints beside the path."""
        return {
            "batches": self.num_batches,
            "batch_size": self.batch_size,
            "layers": [vars(layer) for layer in self.layers],
        }


ProfilePaths = Path | Sequence[Path]  # one profile, or the partial profiles of its shards


def profile_paths(paths: ProfilePaths) -> tuple[Path, ...]:
    return (paths,) if isinstance(paths, Path) else tuple(paths)


def read_profile(paths: ProfilePaths) -> Artifact:
    """A profile file, or the shards of one (``profile --shard``) merged in memory (``kvwctl.shards``)."""
    paths = profile_paths(paths)
    if len(paths) == 1 and format_of(paths[0]) != PROFILE_PART_FORMAT:
        return read_artifact(paths[0], PROFILE_FORMAT)
    return merged_artifact(paths)


def load_profiles(forget_path: ProfilePaths, retain_path: ProfilePaths) -> tuple[Artifact, Artifact]:
    forget = read_profile(forget_path)
    retain = read_profile(retain_path)
    for artifact, split in ((forget, "forget"), (retain, "retain")):
        if artifact.metadata.get("split") != split:
            raise ArtifactError(
                f"{artifact.path} is a {artifact.metadata.get('split')} profile; expected a {split} profile",
                hint=f"make it with kvwctl profile --split {split}",
            )
    check_same_model(forget, retain)
    if forget.metadata["positions"] != retain.metadata["positions"]:
        raise ArtifactError(
            f"{forget.path} profiles positions {forget.metadata['positions']!r} but {retain.path} "
            f"profiles {retain.metadata['positions']!r}",
            hint="profile both splits with the same --positions",
        )
    return forget, retain


@dataclass(frozen=True)
class AccessorPlan:
    """An accessor run resolved and checked: both profiles read and matched, the batches, the output."""

    forget: Artifact
    retain: Artifact
    batches: list[range]
    out: Path
    options: AccessorOptions
    forget_paths: tuple[Path, ...] = ()  # the files read: one profile or its shards
    retain_paths: tuple[Path, ...] = ()
    command: str = "accessor"

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""

        def profile(artifact: Artifact) -> dict[str, Any]:
            keys = ("model", "model_revision", "model_fingerprint", "model_type", "positions", "num_samples")
            return {"path": str(artifact.path), **{key: artifact.metadata.get(key) for key in keys}}

        return {
            "command": self.command,
            "forget_profile": profile(self.forget),
            "retain_profile": profile(self.retain),
            "layers": list(range(self.forget.num_layers)),
            "settings": {
                "batch_size": self.options.batch_size,
                "batches": len(self.batches),
                "save_batches": self.options.save_batches,
                "redact": self.options.redact,
            },
            "outputs": [output_facts(self.out, "accessor", force=self.options.force)],
        }


def plan_accessor(
    forget_profile: ProfilePaths, retain_profile: ProfilePaths, out: Path, options: AccessorOptions
) -> AccessorPlan:
    """Every check ``run_accessor`` makes before computing: the output, both profiles, their layers.

    Either profile may be given as the partial profiles of its shards: they are merged first.
    """
    forget_paths, retain_paths = profile_paths(forget_profile), profile_paths(retain_profile)
    check_outputs(files=[out], inputs=[*forget_paths, *retain_paths], force=options.force)
    forget, retain = load_profiles(forget_profile, retain_profile)
    retain_by_part = retain_parts(retain)
    if forget.parts("sum") != list(retain_by_part):
        raise ArtifactError(
            f"{forget.path} profiles the parts {forget.parts('sum')[:6]}..., {retain.path} profiles "
            f"{list(retain_by_part)[:6]}...",
            hint="profile both splits with the same model",
        )
    for part, coefficient in retain_by_part.items():
        sums = forget.tensors[f"{part}.sum"]  # (samples, m) or (samples, E, m)
        if sums.shape[1:] != coefficient.shape:
            raise ArtifactError(
                f"{part}: {forget.path} has {list(sums.shape[1:])} vectors, {retain.path} has {list(coefficient.shape)}"
            )
    batches = batch_ranges(forget.tensors["count"].numel(), options.batch_size)
    return AccessorPlan(
        forget=forget,
        retain=retain,
        batches=batches,
        out=out,
        options=options,
        forget_paths=forget_paths,
        retain_paths=retain_paths,
    )


def run_accessor(
    forget_profile: ProfilePaths,
    retain_profile: ProfilePaths,
    out: Path,
    options: AccessorOptions,
) -> AccessorResult:
    """Exposure of every knowledge vector from two profiles, written to ``out``."""
    return execute_accessor(plan_accessor(forget_profile, retain_profile, out, options))


def execute_accessor(plan: AccessorPlan) -> AccessorResult:
    """The work of a planned accessor run: every batch's accessor, the exposure, the file."""
    forget, retain, batches, options = plan.forget, plan.retain, plan.batches, plan.options
    redactor = Redactor.create(enabled=options.redact)
    tensors = {}
    exposures = {}
    for part, retain_coefficient in retain_parts(retain).items():
        sums = forget.tensors[f"{part}.sum"]  # (samples, m); experts (samples, E, m)
        counts = forget.tensors.get(f"{part}.count", forget.tensors["count"])  # (samples,); experts (samples, E)
        accessors = batch_accessors(sums, counts, retain_coefficient, batches)  # (batches, m) / (batches, E, m) float64
        part_exposure = exposure(accessors)  # (m,) / (E, m) float32
        exposures[part] = part_exposure
        tensors[f"{part}.exposure"] = part_exposure
        if options.save_batches:
            tensors[f"{part}.batch_accessor"] = accessors.float()
    sample_ids = forget.metadata.get("sample_ids", "[]")
    if forget.metadata.get("redacted") != "true":  # a redacted profile's ids are hashes already
        sample_ids = redactor.id_list(sample_ids)
    metadata = exposure_metadata(
        forget,
        mode="one-shot",
        batches=batches,
        sample_ids=sample_ids,
        **_source_metadata("forget_profile", plan.forget_paths or (forget.path,), redactor),
        **_source_metadata("retain_profile", plan.retain_paths or (retain.path,), redactor),
        **redactor.metadata(),
    )
    write_artifact(plan.out, tensors, metadata)
    return AccessorResult(
        path=plan.out, num_batches=len(batches), batch_size=options.batch_size, layers=summarize_parts(exposures)
    )


def _source_metadata(key: str, paths: tuple[Path, ...], redactor: Redactor) -> dict[str, str]:
    """``key`` and ``key_sha256`` of the profile read: its path and sha256, or JSON lists of its shards'."""
    if len(paths) == 1:
        return {key: redactor.text(str(paths[0])), f"{key}_sha256": file_sha256(paths[0])}
    return {
        key: json.dumps([redactor.text(str(path)) for path in paths]),
        f"{key}_sha256": json.dumps([file_sha256(path) for path in paths]),
    }
