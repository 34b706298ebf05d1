"""Stage 3, progressive mode: the paper's Algorithm 1, weakening batch after batch.

    kvwctl apply --model M --progressive --forget-data forget.jsonl --retain profile-retain.safetensors \
                 --gamma 0.02 --layers 2:26 --out unlearned/

With ``C_r`` the coefficient of the whole retain set (profiled once, on the original model) and
``W_0`` the down-projection weights as loaded, for each forget batch ``b`` in order::

    forward the *current* model on batch b, profiling |a| at the same positions as C_r
    A_b = max(0, log(C_f^b + eps) - log(C_r + eps))       every layer (kvwctl.method)
    E  += A_b                                              float64 (m,) per layer
    W   = W_0 * exp(-gamma * E)                            layers l_s..l_e, vector by vector

so batch ``b + 1`` sees the model already weakened by batches ``0..b``. The cumulative exponent
is kept rather than the weights scaled in place, and every step's weights are derived from the
original ones, so rounding to the model's dtype never compounds. At the end the checkpoint is
written from the stored weights exactly as one-shot ``apply`` writes it, with the final ``E``
(:func:`kvwctl.apply.write_weakened_checkpoint`), and ``E`` itself is written beside it in the
accessor format (``<out>.exposure.safetensors`` unless ``exposure_out`` is given), so one-shot and
progressive runs compare file to file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvwctl.apply import EXPOSURE_FILE, ApplyResult, recorded_path, write_weakened_checkpoint
from kvwctl.artifacts import (
    PROFILE_FORMAT,
    check_fits_model,
    exposure_metadata,
    read_artifact,
    retain_coefficients,
    write_artifact,
)
from kvwctl.card import attach_report, base_license
from kvwctl.checkpoint import open_checkpoint
from kvwctl.data import load_samples
from kvwctl.errors import ArtifactError, ModelError
from kvwctl.files import committed_together, file_sha256
from kvwctl.method import (
    batch_ranges,
    check_gamma,
    forget_accessor,
    gates,
    parse_layers,
    pooled_coefficient,
    scale_vectors,
    summarize_exposures,
)
from kvwctl.options import ApplyOptions
from kvwctl.outputs import check_outputs
from kvwctl.progress import NullTracker, Tracker
from kvwctl.source import ModelSpec, resolve_model


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
    import torch

    from kvwctl.modeling import CoefficientCollector, encode_batch, load_model, render_all, select_device, select_dtype

    gamma, batch_size, force = options.gamma, options.batch_size, options.force
    tracker = tracker or NullTracker()
    checkpoint = open_checkpoint(resolve_model(model.reference, model.revision))
    samples = load_samples(forget_data)
    exposure_path = exposure_out or out.parent / f"{out.name}.{EXPOSURE_FILE}"
    images = [image for sample in samples for image in sample.images]
    inputs = [*checkpoint.input_paths, forget_data, *images, retain_profile, *([eval_report] if eval_report else [])]
    check_outputs(files=[exposure_path], directories=[out], inputs=inputs, force=force)
    attached = attach_report(eval_report) if eval_report is not None else None
    base_license(checkpoint.path)  # a base card whose metadata cannot be read fails before model work
    selected = parse_layers(options.layers, checkpoint.num_layers)
    retain = read_artifact(retain_profile, PROFILE_FORMAT)
    if retain.metadata.get("split") != "retain":
        raise ArtifactError(f"{retain_profile} is a {retain.metadata.get('split')} profile; expected a retain profile")
    fingerprint = checkpoint.fingerprint()
    check_fits_model(retain, checkpoint, fingerprint)
    positions = retain.metadata["positions"]

    torch_device = select_device(options.device)
    torch_dtype = select_dtype(options.dtype, torch_device, checkpoint.config)
    with tracker.status(f"Loading {model.reference}"):
        loaded = load_model(checkpoint, device=torch_device, dtype=torch_dtype)
    rendered = render_all(loaded.renderer, samples)
    retain_by_layer = [coefficient.to(torch_device) for coefficient in retain_coefficients(retain)]
    modules = loaded.down_projections
    # The weights as loaded, kept to derive every step's weights from (no compounding rounding).
    originals = {layer: modules[layer].weight.detach().clone() for layer in selected}
    cumulative = [torch.zeros_like(coefficient) for coefficient in retain_by_layer]  # float64 (m,) per layer
    axis = checkpoint.architecture.vector_axis
    batches = batch_ranges(len(rendered), batch_size)
    with CoefficientCollector(modules) as collector:
        progress = tracker.track(batches, total=len(rendered), description="progressive", unit="samples", size=len)
        for batch in progress:
            encoded = encode_batch(loaded, rendered[batch.start : batch.stop], positions=positions)
            sums, counts = collector.run(loaded, encoded)
            for layer, layer_sums in enumerate(sums):
                accessor = forget_accessor(pooled_coefficient(layer_sums, counts), retain_by_layer[layer])
                if not bool(torch.isfinite(accessor).all()):
                    ids = ", ".join(sample.id for sample in samples[batch.start : batch.stop])
                    raise ModelError(
                        f"forget batch {batch.start // batch_size} (samples {ids}) gives non-finite "
                        f"knowledge coefficients in layer {layer}",
                        hint="the model produces NaN or infinite activations; check its weights",
                    )
                cumulative[layer] += accessor
            check_gamma(gamma, cumulative, selected)  # before E's gates are computed
            with torch.no_grad():
                for layer in selected:
                    gate = gates(cumulative[layer], gamma)
                    modules[layer].weight.copy_(scale_vectors(originals[layer], gate, axis=axis))
    exposures = [exposure.float().cpu() for exposure in cumulative]
    del loaded, originals, modules

    metadata = exposure_metadata(
        retain,
        mode="progressive",
        batches=batches,
        sample_ids=json.dumps([sample.id for sample in samples]),
        gamma=repr(gamma),
        applied_layers=json.dumps(selected),
        forget_data=str(forget_data),
        forget_data_sha256=file_sha256(forget_data),
        retain_profile=str(retain_profile),
        retain_profile_sha256=file_sha256(retain_profile),
    )
    provenance: dict[str, Any] = {
        "mode": "progressive",
        "progressive": {
            "forget_data": recorded_path(forget_data, out),
            "forget_data_sha256": metadata["forget_data_sha256"],
            "retain_profile": recorded_path(retain_profile, out),
            "retain_profile_sha256": metadata["retain_profile_sha256"],
            "batch_size": batch_size,
            "num_batches": len(batches),
            "positions": positions,
            "exposure_file": recorded_path(exposure_path, out),
            "layer_summary": [vars(summary) for summary in summarize_exposures(exposures)],
        },
    }
    # The checkpoint's manifest names the exposure file: both are renamed into place, or neither.
    # The exposure file is staged first, so the manifest can record its hash.
    with committed_together() as outputs:
        staged_exposure = outputs.file(exposure_path, force=force)
        write_artifact(
            staged_exposure,
            {f"layers.{layer}.exposure": exposure for layer, exposure in enumerate(exposures)},
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
            attached=attached,
        )
    return result
