"""Stage 3: a new checkpoint with the forget-specific knowledge vectors weakened.

One-shot (exposure from ``kvwctl accessor``, all computed on the original model)::

    kvwctl apply --model M --accessor accessor.safetensors --gamma 0.02 --layers 2:26 --out unlearned/

Progressive (``--progressive``, the paper's Algorithm 1) is in :mod:`kvwctl.progressive`; it
writes its checkpoint with :func:`write_weakened_checkpoint` from here.

Both write the checkpoint the same way. Each input shard is copied byte for byte and only the
byte ranges of the edited down-projection weights are overwritten, so every other tensor, the
shard layout, the index and the headers are identical to the input. An edited weight is
``W * exp(-gamma * E)`` along the vector axis, computed in float32 from the **original** stored
weight and rounded once to the stored dtype. The directory is staged beside ``--out`` and renamed
into place at the end, with ``kvw_manifest.json`` recording how it was made: with the sha256 of
every input and output shard, the package versions and the device, ``kvwctl verify`` can check the
checkpoint later and recompute the edit (:mod:`kvwctl.verify`). Paths in the manifest are relative
to its directory when they lie under it, else recorded as given (:func:`recorded_path`); with
``redact`` they are keyed hashes and the manifest says ``"redacted": true`` (``kvwctl.redact``).
``plan_apply`` makes every check before a weight is read (``kvwctl.plans``, ``--dry-run``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl import __version__
from kvwctl.artifacts import ACCESSOR_FORMAT, Artifact, check_fits_model, read_artifact
from kvwctl.card import CARD_FILE, AttachedReport, attach_report, base_license, write_card
from kvwctl.checkpoint import MANIFEST_FORMAT, Checkpoint, carry_over_files, copy_patched_shard, open_checkpoint
from kvwctl.edits import check_exposure_parts, edit_gates, stored_edits
from kvwctl.errors import ArtifactError
from kvwctl.files import StagedOutputs, committed_together, file_sha256, now, write_json_atomically
from kvwctl.headers import read_json_object
from kvwctl.method import check_gamma_parts, dense_part, gates, parse_layers, part_layer
from kvwctl.options import ApplyOptions
from kvwctl.outputs import MANIFEST_FILE, check_outputs, inside
from kvwctl.plans import checkpoint_facts, edited_tensors, output_facts
from kvwctl.progress import NullTracker, Tracker
from kvwctl.redact import Redactor
from kvwctl.shardcopy import Patch
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.weakened import WeakenedWeight, one_torch_thread

if TYPE_CHECKING:
    import torch

EXPOSURE_FILE = "exposure.safetensors"


# --- writing a weakened checkpoint ---------------------------------------------------------------


SCALING = "W * exp(-gamma * E) per knowledge vector, float32, rounded once to the stored dtype"
# The packages whose code computes or writes an edited weight (their versions go in the manifest).
RECORDED_PACKAGES = ("torch", "transformers", "safetensors")


def recorded_path(path: Path, manifest_dir: Path) -> str:
    """``path`` as the manifest in ``manifest_dir`` records it.

    Relative to ``manifest_dir`` (POSIX separators) when it lies under it, so the record survives
    moving the checkpoint; otherwise as the user gave it, since nothing better is known about
    where it will be found later.
    """
    try:
        return path.resolve().relative_to(manifest_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def package_versions() -> dict[str, str]:
    """The versions of kvwctl and of :data:`RECORDED_PACKAGES`, as installed."""
    from importlib.metadata import version

    return {"kvwctl": __version__, **{name: version(name) for name in RECORDED_PACKAGES}}


@dataclass(frozen=True)
class LayerEdit:
    """How one layer's down-projection weight was weakened."""

    tensor: str
    vectors: int
    scaled: int  # vectors with a gate below 1
    min_gate: float
    mean_gate: float


@dataclass(frozen=True)
class ExpertLayerEdit(LayerEdit):
    """How a mixture-of-experts layer was weakened: the counts and gates cover all of its parts."""

    experts: int = 0
    tensors: list[str] = field(default_factory=list)  # every stored tensor edited in the layer


@dataclass(frozen=True)
class Manifest:
    """How a weakened checkpoint was made; :meth:`to_json` is the content of ``kvw_manifest.json``."""

    tool_version: str
    versions: dict[str, str]  # package -> version: kvwctl, torch, transformers, safetensors
    created: str
    input_model: dict[str, Any]
    input_shards: dict[str, str]  # input shard file -> sha256
    provenance: dict[str, Any]  # "mode" and the inputs of that mode
    gamma: float
    layers: list[int]
    vector_axis: int
    device: str  # the device type the gates were computed on ("cpu", "cuda")
    per_layer: dict[int, LayerEdit]  # by layer, ascending
    shards: dict[str, str]  # shard file -> sha256
    not_carried_over: list[str]
    output_fingerprint: str
    previous_manifest: dict[str, Any] | None  # the input checkpoint's own manifest, if it had one
    redaction: dict[str, Any] = field(default_factory=dict)  # {"redacted": true, "redaction": scheme} or {}

    @property
    def mode(self) -> str:
        return str(self.provenance["mode"])

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object written to ``kvw_manifest.json`` (keys in file order)."""
        return {
            "format": MANIFEST_FORMAT,
            "tool": "kvwctl",
            "tool_version": self.tool_version,
            "versions": self.versions,
            "created": self.created,
            "input_model": self.input_model,
            "input_shards": self.input_shards,
            **self.provenance,
            "gamma": self.gamma,
            "layers": self.layers,
            "vector_axis": self.vector_axis,
            "scaling": SCALING,
            "device": self.device,
            "per_layer": {str(layer): asdict(edit) for layer, edit in sorted(self.per_layer.items())},
            "shards": self.shards,
            "not_carried_over": self.not_carried_over,
            "output_fingerprint": self.output_fingerprint,
            "previous_manifest": self.previous_manifest,
            **self.redaction,
        }


@dataclass(frozen=True)
class ApplyResult:
    path: Path
    manifest: Manifest


def write_weakened_checkpoint(
    checkpoint: Checkpoint,
    exposures: dict[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    gamma: float,
    layers: list[int],
    out: Path,
    force: bool,
    device: torch.device,
    input_fingerprint: str,
    provenance: dict[str, Any],
    tracker: Tracker,
    outputs: StagedOutputs | None = None,
    attached: AttachedReport | None = None,
    redaction: dict[str, Any] | None = None,
) -> ApplyResult:
    """Stream the input shards one at a time, weaken the chosen layers, write ``out`` atomically.

    Refuses, before writing anything, a ``gamma`` for which ``gamma * E`` overflows float32, and
    refuses the whole checkpoint if an edited weight has a NaN or an infinity. With ``outputs``
    the checkpoint is staged there and renamed into place when the caller's
    ``committed_together`` block ends, together with the other outputs staged in it. The base's
    ``README.md`` is not copied: the checkpoint gets its own card (:mod:`kvwctl.card`), keeping
    the base card's license fields, with ``attached``'s results if given.
    ``redaction`` (``Redactor.record()``) goes in the manifest: the caller has hashed the paths.
    The shards are read, weakened and written in overlapped blocks (``copy_patched_shard``): the
    memory held is a few blocks, never a whole shard.
    """
    if not isinstance(exposures, dict):  # a dense model's exposures, layer by layer
        exposures = {dense_part(layer): values for layer, values in enumerate(exposures)}
    check_exposure_parts("the exposures", exposures, checkpoint)
    check_gamma_parts(gamma, {part: values for part, values in exposures.items() if part_layer(part) in layers})
    license = base_license(checkpoint.path)
    axis = checkpoint.architecture.vector_axis
    edits = stored_edits(checkpoint, layers)
    tensor_gates: dict[str, torch.Tensor] = {}  # every edited tensor's gates (m,) or (E * m,)
    layer_edits: dict[int, LayerEdit] = {}
    shard_hashes: dict[str, str] = {}
    input_hashes: dict[str, str] = {}
    # The output's tensor digests: the input's, with every edited tensor's bytes hashed as written.
    output_digests = dict(checkpoint.tensor_digests())
    with ExitStack() as stack:
        if outputs is None:
            outputs = stack.enter_context(committed_together())
        staging = outputs.directory(out, force=force)
        left_out = carry_over_files(checkpoint, staging, skip={MANIFEST_FILE, CARD_FILE})
        stack.enter_context(one_torch_thread())  # the copy's threads use the other cores (kvwctl.weakened)
        for shard in tracker.track(checkpoint.shards, total=len(checkpoint.shards), description="apply", unit="shards"):
            # Each edited weight is scaled block by block as the shard streams through (kvwctl.shardcopy).
            weights: list[WeakenedWeight] = []
            for edit in edits:
                if edit.tensor.shard != shard:
                    continue
                part_gates = gates(exposures[edit.part].to(device), gamma)  # (m,) or experts (E, m)
                gate = edit_gates(edit, part_gates)  # this tensor's: (m,), or (E, m) for a fused one
                refusal = f"refusing to write {out}"
                weights.append(WeakenedWeight(edit.tensor, gate, axis=edit.axis, device=device, refusal=refusal))
                tensor_gates[edit.tensor.name] = gate.reshape(-1)
            patches: dict[tuple[int, int], Patch | bytes] = {
                (weight.projection.data_start, weight.projection.data_end): weight for weight in weights
            }
            target = inside(staging, shard, source=checkpoint.path)
            if target.parent != staging and staging.is_dir():  # a shard in a subfolder (never re-create
                target.parent.mkdir(parents=True, exist_ok=True)  # a staging directory that vanished)
            copied = copy_patched_shard(checkpoint.path / shard, target, patches)
            input_hashes[shard], shard_hashes[shard] = copied.input_sha256, copied.output_sha256
            output_digests.update({weight.projection.name: weight.digest.hexdigest() for weight in weights})
        # A layer's gates in stored_edits' order (verify recomputes them in the same order).
        layer_edits = {
            layer: _layer_edit(checkpoint, layer, [tensor_gates[e.tensor.name] for e in edits if e.layer == layer])
            for layer in layers
        }
        previous = checkpoint.path / MANIFEST_FILE
        manifest = Manifest(
            tool_version=__version__,
            versions=package_versions(),
            created=now(),
            input_model={
                **checkpoint.source.describe(),
                "fingerprint": input_fingerprint,
                "model_type": checkpoint.architecture.model_type,
            },
            input_shards=input_hashes,
            provenance=provenance,
            gamma=gamma,
            layers=layers,
            vector_axis=axis,
            device=device.type,
            per_layer=dict(sorted(layer_edits.items())),
            shards=shard_hashes,
            not_carried_over=left_out,
            # Same config and headers as the input, so the same tensors; only edited bytes differ.
            output_fingerprint=checkpoint.fingerprint(output_digests),
            previous_manifest=read_json_object(previous) if previous.is_file() else None,
            redaction=redaction or {},
        )
        write_json_atomically(staging / MANIFEST_FILE, manifest.to_json(), ensure_ascii=True)
        write_card(staging, manifest.to_json(), license=license, attached=attached)
    return ApplyResult(path=out, manifest=manifest)


def _layer_edit(checkpoint: Checkpoint, layer: int, layer_gates: list[torch.Tensor]) -> LayerEdit:
    """The manifest's record of one layer: every gate of its edited tensors (experts: each tensor's)."""
    import torch

    gate = torch.cat(layer_gates)  # every vector of the layer, dense then experts
    summary = dict(
        vectors=gate.numel(),
        scaled=int((gate < 1).sum()),
        min_gate=float(gate.min()),
        mean_gate=float(gate.double().mean()),
    )
    names = checkpoint.edited_tensor_names(layer)
    experts = checkpoint.experts(layer)
    if experts is None:
        return LayerEdit(tensor=names[0], **summary)  # type: ignore[arg-type]
    return ExpertLayerEdit(tensor=names[0], experts=experts.num_experts, tensors=names, **summary)  # type: ignore[arg-type]


# --- one-shot ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyPlan:
    """A one-shot apply resolved and checked: checkpoint (headers only), layers, accessor, output."""

    model: ModelSpec
    checkpoint: Checkpoint
    accessor: Artifact
    exposures: dict[str, torch.Tensor]  # per part: (m,) or experts (E, m) float32, from the accessor
    layers: list[int]
    out: Path
    options: ApplyOptions
    device: str
    attached: AttachedReport | None = None  # an eval report of this output, for the card
    tune: dict[str, Any] | None = None  # from kvwctl tune --apply: the tune file and the trial
    command: str = "apply"

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""
        keys = ("model", "model_fingerprint", "mode", "batch_size", "num_batches", "positions")
        return {
            "command": self.command,
            "model": checkpoint_facts(self.checkpoint),
            "layers": self.layers,
            "edited_tensors": {str(layer): edited_tensors(self.checkpoint, layer) for layer in self.layers},
            "accessor": {"path": str(self.accessor.path), **{key: self.accessor.metadata.get(key) for key in keys}},
            "settings": {
                "gamma": self.options.gamma,
                "mode": "one-shot",
                "device": self.device,
                "redact": self.options.redact,
            },
            "outputs": [output_facts(self.out, "checkpoint", force=self.options.force)],
        }


def plan_apply(
    model: ModelSpec,
    accessor: Path,
    out: Path,
    options: ApplyOptions,
    *,
    eval_report: Path | None = None,
    tune: dict[str, Any] | None = None,
) -> ApplyPlan:
    """Every check ``run_apply`` makes before reading a weight (all but the fingerprint's).

    ``eval_report`` (an eval of this very output, e.g. of an identical earlier run) goes into the card.
    ``tune`` (from ``kvwctl tune --apply``) is recorded in the manifest's provenance: the tune
    file's path and sha256 and the trial applied.
    """
    from kvwctl.modeling import select_device

    checkpoint = open_checkpoint(resolve_model(model.reference, model.revision))
    reports = [] if eval_report is None else [eval_report]
    check_outputs(directories=[out], inputs=[*checkpoint.input_paths, accessor, *reports], force=options.force)
    attached = attach_report(eval_report) if eval_report is not None else None
    selected = parse_layers(options.layers, checkpoint.num_layers)
    artifact = read_artifact(accessor, ACCESSOR_FORMAT)
    if int(artifact.metadata["num_layers"]) != checkpoint.num_layers:
        raise ArtifactError(
            f"{accessor} was made from {artifact.metadata['model']} with {artifact.metadata['num_layers']} layers, "
            f"not from {checkpoint.source.reference} with {checkpoint.num_layers}",
            hint="profile and apply must use the same model weights",
        )
    exposures = {part: artifact.tensors[f"{part}.exposure"] for part in artifact.parts("exposure")}
    check_exposure_parts(str(accessor), exposures, checkpoint)
    check_gamma_parts(
        options.gamma, {part: values for part, values in exposures.items() if part_layer(part) in selected}
    )
    return ApplyPlan(
        model=model,
        checkpoint=checkpoint,
        accessor=artifact,
        exposures=exposures,
        layers=selected,
        out=out,
        options=options,
        device=str(select_device(options.device)),
        attached=attached,
        tune=tune,
    )


def run_apply(
    model: ModelSpec,
    accessor: Path,
    out: Path,
    options: ApplyOptions,
    *,
    eval_report: Path | None = None,
    tracker: Tracker | None = None,
    tune: dict[str, Any] | None = None,
) -> ApplyResult:
    """One-shot: scale ``model``'s knowledge vectors by the exposure in ``accessor``; write ``out``
    (``eval_report`` and ``tune``: see :func:`plan_apply`)."""
    plan = plan_apply(model, accessor, out, options, eval_report=eval_report, tune=tune)
    return execute_apply(plan, tracker=tracker)


def execute_apply(plan: ApplyPlan, *, tracker: Tracker | None = None) -> ApplyResult:
    """The work of a planned one-shot apply: fingerprint, then the weakened checkpoint."""
    import torch

    checkpoint, artifact, out, options = plan.checkpoint, plan.accessor, plan.out, plan.options
    redactor = Redactor.create(enabled=options.redact)
    fingerprint = checkpoint.fingerprint()
    check_fits_model(artifact, checkpoint, fingerprint)
    provenance = {
        "mode": "one-shot",
        "accessor": {
            "path": redactor.text(recorded_path(artifact.path, out)),
            "sha256": file_sha256(artifact.path),
            "batch_size": int(artifact.metadata["batch_size"]),
            "mode": artifact.metadata["mode"],
        },
        **({"tune": plan.tune} if plan.tune is not None else {}),
    }
    return write_weakened_checkpoint(
        checkpoint,
        plan.exposures,
        gamma=options.gamma,
        layers=plan.layers,
        out=out,
        force=options.force,
        device=torch.device(plan.device),
        input_fingerprint=fingerprint,
        provenance=provenance,
        tracker=tracker or NullTracker(),
        attached=plan.attached,
        redaction=redactor.record(),
    )
