"""Stage 3, progressive mode: the paper's Algorithm 1, weakening batch after batch.

    kvwctl apply --model M --progressive --forget-data forget.jsonl --retain profile-retain.safetensors \
                 --gamma 0.02 --layers 2:26 --out unlearned/

With ``C_r`` the coefficient of the whole retain set (profiled once, on the original model) and
``W_0`` the down-projection weights as loaded, for each forget batch ``b`` in order::

    forward the *current* model on batch b, profiling |a| at the same positions as C_r
    A_b = max(0, log(C_f^b + eps) - log(C_r + eps))       every layer (kvwctl.method)
    E  += A_b                                              float64 (m,) per layer
    W   = W_0 * exp(-gamma * E)                            layers l_s..l_e, vector by vector

so batch ``b + 1`` sees the model already weakened by batches ``0..b``. In a mixture-of-experts
layer the same holds per expert: ``E`` is ``(E, m)``, each expert's ``C_f^b`` pooled over the
batch's positions routed to it, and the fused in-memory ``down_proj`` ``(E, ., .)`` is derived from
its original along the vector axis. The cumulative exponent
is kept rather than the weights scaled in place, and every step's weights are derived from the
original ones, so rounding to the model's dtype never compounds. At the end the checkpoint is
written from the stored weights exactly as one-shot ``apply`` writes it, with the final ``E``
(:func:`kvwctl.apply.write_weakened_checkpoint`), and ``E`` itself is written beside it in the
accessor format (``<out>.exposure.safetensors`` unless ``exposure_out`` is given), so one-shot and
progressive runs compare file to file. With ``redact`` the ids and paths in the exposure file's
metadata and in the manifest are keyed hashes (``kvwctl.redact``). ``plan_progressive`` makes every
check before the model is loaded (``kvwctl.plans``, ``--dry-run``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl.apply import EXPOSURE_FILE, ApplyResult, recorded_path, write_weakened_checkpoint
from kvwctl.artifacts import (
    PROFILE_FORMAT,
    Artifact,
    check_fits_model,
    exposure_metadata,
    read_artifact,
    retain_parts,
    write_artifact,
)
from kvwctl.card import AttachedReport, attach_report, base_license
from kvwctl.checkpoint import Checkpoint, open_checkpoint
from kvwctl.data import Sample, load_samples
from kvwctl.edits import check_exposure_parts
from kvwctl.errors import ArtifactError, ModelError
from kvwctl.files import committed_together, file_sha256
from kvwctl.method import (
    batch_ranges,
    check_gamma_parts,
    dense_part,
    experts_part,
    forget_accessor,
    gates,
    parse_layers,
    pooled_coefficient,
    scale_expert_vectors,
    scale_vectors,
    summarize_parts,
)
from kvwctl.options import ApplyOptions
from kvwctl.outputs import check_outputs
from kvwctl.plans import batch_count, checkpoint_facts, data_facts, edited_tensors, output_facts
from kvwctl.progress import NullTracker, Tracker
from kvwctl.redact import Redactor
from kvwctl.source import ModelSpec, resolve_model


@dataclass(frozen=True)
class ProgressivePlan:
    """A progressive apply resolved and checked: checkpoint (headers only), samples, retain profile, outputs."""

    model: ModelSpec
    checkpoint: Checkpoint
    forget_data: Path
    samples: list[Sample]
    retain: Artifact
    layers: list[int]
    out: Path
    exposure_path: Path
    options: ApplyOptions
    device: str
    dtype: str
    attached: AttachedReport | None = None  # an eval report of this output, for the card
    command: str = "apply --progressive"

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""
        keys = ("model", "model_fingerprint", "positions", "num_samples")
        force = self.options.force
        return {
            "command": self.command,
            "model": checkpoint_facts(self.checkpoint),
            "layers": self.layers,
            "edited_tensors": {str(layer): edited_tensors(self.checkpoint, layer) for layer in self.layers},
            "forget_data": data_facts(self.forget_data, self.samples),
            "retain_profile": {"path": str(self.retain.path), **{key: self.retain.metadata.get(key) for key in keys}},
            "settings": {
                "gamma": self.options.gamma,
                "mode": "progressive",
                "batch_size": self.options.batch_size,
                "batches": batch_count(len(self.samples), self.options.batch_size),
                "positions": self.retain.metadata["positions"],
                "device": self.device,
                "dtype": self.dtype,
                "redact": self.options.redact,
            },
            "outputs": [
                output_facts(self.out, "checkpoint", force=force),
                output_facts(self.exposure_path, "exposure", force=force),
            ],
        }


def plan_progressive(
    model: ModelSpec,
    forget_data: Path,
    retain_profile: Path,
    out: Path,
    options: ApplyOptions,
    *,
    exposure_out: Path | None = None,
    eval_report: Path | None = None,
) -> ProgressivePlan:
    """Every check ``run_progressive`` makes before loading the model (all but the fingerprint's)."""
    from kvwctl.modeling import select_device, select_dtype
    from kvwctl.placement import Placement

    checkpoint = open_checkpoint(resolve_model(model.reference, model.revision))
    samples = load_samples(forget_data)
    exposure_path = exposure_out or out.parent / f"{out.name}.{EXPOSURE_FILE}"
    images = [image for sample in samples for image in sample.images]
    inputs = [*checkpoint.input_paths, forget_data, *images, retain_profile, *([eval_report] if eval_report else [])]
    check_outputs(files=[exposure_path], directories=[out], inputs=inputs, force=options.force)
    attached = attach_report(eval_report) if eval_report is not None else None
    base_license(checkpoint.path)  # a base card whose metadata cannot be read fails before model work
    selected = parse_layers(options.layers, checkpoint.num_layers)
    retain = read_artifact(retain_profile, PROFILE_FORMAT)
    if retain.metadata.get("split") != "retain":
        raise ArtifactError(f"{retain_profile} is a {retain.metadata.get('split')} profile; expected a retain profile")
    torch_device = select_device(options.device, placement=Placement.from_options(options))
    torch_dtype = select_dtype(options.dtype, torch_device, checkpoint.config)
    return ProgressivePlan(
        model=model,
        checkpoint=checkpoint,
        forget_data=forget_data,
        samples=samples,
        retain=retain,
        layers=selected,
        out=out,
        exposure_path=exposure_path,
        options=options,
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        attached=attached,
    )


def run_progressive(
    model: ModelSpec,
    forget_data: Path,
    retain_profile: Path,
    out: Path,
    options: ApplyOptions,
    *,
    exposure_out: Path | None = None,
    eval_report: Path | None = None,
    tracker: Tracker | None = None,
) -> ApplyResult:
    """Algorithm 1: per forget batch, forward the current model, compute ``A_b``, weaken.

    The cumulative exponent ``E = sum_b A_b`` is kept per vector (float64 on the device) and the
    working weights are derived from the original ones at every step, ``W_0 * exp(-gamma * E)``,
    so rounding to the model's dtype never compounds. The exposure applied is written beside the
    checkpoint in the accessor format (``<out>.exposure.safetensors`` unless ``exposure_out`` is given),
    so one-shot and progressive runs compare file to file. ``eval_report`` goes into the card
    (:func:`kvwctl.apply.run_apply` says which reports fit).
    """
    plan = plan_progressive(
        model, forget_data, retain_profile, out, options, exposure_out=exposure_out, eval_report=eval_report
    )
    return execute_progressive(plan, tracker=tracker)


def _edited_weights(loaded: Any, layers: list[int]) -> dict[str, tuple[Any, str, int]]:
    """Per part of ``layers``: the module holding the parameter to weaken, its name and vector axis.

    A dense down projection's ``weight`` (the architecture's axis); a layer's experts' fused
    ``down_proj`` ``(E, ., .)`` (the layout's ``memory_axis``). ``placement.read_weight`` and
    ``write_weight`` reach them also when accelerate offloads them.
    """
    architecture = loaded.checkpoint.architecture
    weights: dict[str, tuple[Any, str, int]] = {}
    for layer in layers:
        module = loaded.down_projections[layer]
        if module is not None:
            weights[dense_part(layer)] = (module, "weight", architecture.vector_axis)
        experts = loaded.experts[layer] if loaded.experts else None
        if experts is not None:
            assert architecture.experts is not None, "a model with experts modules has an experts layout"
            weights[experts_part(layer)] = (experts, "down_proj", architecture.experts.memory_axis)
    return weights


def execute_progressive(plan: ProgressivePlan, *, tracker: Tracker | None = None) -> ApplyResult:
    """The work of a planned progressive apply: fingerprint, Algorithm 1, both outputs."""
    import torch

    from kvwctl.modeling import CoefficientCollector, encode_batch, load_model, render_all
    from kvwctl.placement import Placement, execution_device, read_weight, write_weight
    from kvwctl.visioncache import cache_directory

    options, checkpoint, samples, retain, selected = (
        plan.options,
        plan.checkpoint,
        plan.samples,
        plan.retain,
        plan.layers,
    )
    gamma, batch_size, force = options.gamma, options.batch_size, options.force
    forget_data, retain_profile, out, exposure_path = plan.forget_data, plan.retain.path, plan.out, plan.exposure_path
    tracker = tracker or NullTracker()
    redactor = Redactor.create(enabled=options.redact)
    fingerprint = checkpoint.fingerprint()
    check_fits_model(retain, checkpoint, fingerprint)
    positions = retain.metadata["positions"]

    torch_device = torch.device(plan.device)
    torch_dtype = getattr(torch, plan.dtype)
    with tracker.status(f"Loading {plan.model.reference}"):
        loaded = load_model(
            checkpoint,
            device=torch_device,
            dtype=torch_dtype,
            placement=Placement.from_options(options),
            vision_cache=cache_directory(options),
        )
    rendered = render_all(loaded.renderer, samples)
    # Each part's coefficients on the device its module computes on (several with --device-map).
    weights = _edited_weights(loaded, selected)
    devices = {
        dense_part(layer): execution_device(module)
        for layer, module in enumerate(loaded.down_projections)
        if module is not None
    }
    devices |= {
        experts_part(layer): execution_device(module)
        for layer, module in enumerate(loaded.experts)
        if module is not None
    }
    retain_by_part = {
        part: coefficient.to(devices.get(part, torch_device)) for part, coefficient in retain_parts(retain).items()
    }
    check_exposure_parts(str(retain_profile), retain_by_part, checkpoint)
    # Per edited part, its original values as loaded, kept to derive every step's weights from (no
    # compounding rounding).
    originals = {part: read_weight(module, name).clone() for part, (module, name, _) in weights.items()}
    cumulative = {part: torch.zeros_like(coefficient) for part, coefficient in retain_by_part.items()}  # float64
    batches = batch_ranges(len(rendered), batch_size)
    with CoefficientCollector(loaded.down_projections, loaded.experts) as collector:
        progress = tracker.track(batches, total=len(rendered), description="progressive", unit="samples", size=len)
        for batch in progress:
            encoded = encode_batch(loaded, rendered[batch.start : batch.stop], positions=positions)
            parts, _ = collector.run(loaded, encoded)
            for part, (part_sums, counts) in parts.items():
                counts = counts.to(part_sums.device)
                accessor = forget_accessor(pooled_coefficient(part_sums, counts), retain_by_part[part])
                if not bool(torch.isfinite(accessor).all()):
                    ids = ", ".join(sample.id for sample in samples[batch.start : batch.stop])
                    raise ModelError(
                        f"forget batch {batch.start // batch_size} (samples {ids}) gives non-finite "
                        f"knowledge coefficients in {part}",
                        hint="the model produces NaN or infinite activations; check its weights",
                    )
                cumulative[part] += accessor
            # Before E's gates are computed.
            check_gamma_parts(gamma, {part: cumulative[part] for part in weights})
            with torch.no_grad():
                for part, (module, name, axis) in weights.items():
                    gate = gates(cumulative[part], gamma)  # (m,) or experts (E, m)
                    scale = scale_expert_vectors if gate.dim() == 2 else scale_vectors
                    write_weight(module, scale(originals[part], gate, axis=axis), name)
    exposures = {part: exposure.float().cpu() for part, exposure in cumulative.items()}
    del loaded, originals, weights

    metadata = exposure_metadata(
        retain,
        mode="progressive",
        batches=batches,
        sample_ids=json.dumps(redactor.ids([sample.id for sample in samples])),
        gamma=repr(gamma),
        applied_layers=json.dumps(selected),
        forget_data=redactor.text(str(forget_data)),
        forget_data_sha256=file_sha256(forget_data),
        retain_profile=redactor.text(str(retain_profile)),
        retain_profile_sha256=file_sha256(retain_profile),
        **redactor.metadata(),
    )
    provenance: dict[str, Any] = {
        "mode": "progressive",
        "progressive": {
            "forget_data": redactor.text(recorded_path(forget_data, out)),
            "forget_data_sha256": metadata["forget_data_sha256"],
            "retain_profile": redactor.text(recorded_path(retain_profile, out)),
            "retain_profile_sha256": metadata["retain_profile_sha256"],
            "batch_size": batch_size,
            "num_batches": len(batches),
            "positions": positions,
            "exposure_file": redactor.text(recorded_path(exposure_path, out)),
            "layer_summary": [vars(summary) for summary in summarize_parts(exposures)],
        },
    }
    # The checkpoint's manifest names the exposure file: both are renamed into place, or neither.
    # The exposure file is staged first, so the manifest can record its hash.
    with committed_together() as outputs:
        staged_exposure = outputs.file(exposure_path, force=force)
        write_artifact(
            staged_exposure,
            {f"{part}.exposure": exposure for part, exposure in exposures.items()},
            metadata,
        )
        provenance["progressive"]["exposure_sha256"] = file_sha256(staged_exposure)
        result = write_weakened_checkpoint(
            checkpoint,
            exposures,
            gamma=gamma,
            layers=selected,
            out=out,
            force=force,
            device=torch_device,
            input_fingerprint=fingerprint,
            provenance=provenance,
            tracker=tracker,
            outputs=outputs,
            attached=plan.attached,
            redaction=redactor.record(),
        )
    return result
