"""Prove an unlearned checkpoint is what its manifest says, and recompute the edit from its base.

    kvwctl verify unlearned/                                   # files against kvw_manifest.json
    kvwctl verify unlearned/ --base llava-hf/llava-1.5-7b-hf --accessor accessor.safetensors
    kvwctl verify unlearned/ --base M --accessor unlearned.exposure.safetensors   # a progressive run

Checks stop at the first mismatch, which the error names (exit 1); exit 0 prints the directory.
**Without a base**, from the directory alone:

1. ``kvw_manifest.json`` is well-formed (format, tool, every key ``apply`` writes, with its type).
2. Every shard it lists exists and has its sha256; no other weight file (``*.safetensors``,
   ``*.bin``, ...) is in the directory; the index lists exactly the manifest's shards.
3. The output fingerprint, recomputed, is ``output_fingerprint``; ``per_layer`` names the down
   projection of every edited layer and nothing else.
4. The chain of ``previous_manifest``: every one is well-formed as in 1, and every link holds —
   the ``input_shards`` of a manifest are the ``shards`` of the one before it (its input was the
   previous output). The earlier checkpoints' files are not at hand, so this is all that can be
   checked about them: that the records are complete and consistent, not that their files were.

**With** ``--base M --accessor A`` (``A`` the accessor of a one-shot run, or the exposure file
of a progressive run, which is in the accessor format):

5. ``A`` is the file the run used: its sha256 is the manifest's ``accessor.sha256`` (one-shot) or
   ``progressive.exposure_sha256``, and it was made from ``M``.
6. ``M`` is the input: its fingerprint is ``input_model.fingerprint``, its shards' sha256 are
   ``input_shards``, its own manifest (if any) is ``previous_manifest``, and every other file
   (tokenizer, configs, templates, license files) is carried over byte for byte; ``README.md``
   is not compared: it is the card kvwctl wrote in place of the base's (:mod:`kvwctl.card`).
7. Tensor by tensor, one shard at a time (``safe_open``; never the whole model in memory): every
   tensor that is not an edited down projection is byte-identical to ``M``'s tensor of the same
   name, and every edited one is byte-identical to ``scale_vectors(W_M, gates(E, gamma))`` with
   ``gamma`` and the layers from the manifest, computed on the device the manifest records (exp
   may differ in the last bit between devices or torch versions: the error says which were used).
   ``per_layer``'s gate statistics are recomputed from the same gates.

A **redacted** manifest (``"redacted": true``, ``--redact``) records its input paths as keyed
hashes; no check above reads a path (inputs are matched by sha256 and fingerprint), so a redacted
checkpoint is verified exactly as any other, and the result says it was redacted. The paths
recorded there are for people, not for verify: with redaction, the accessor to pass to
``--base`` must be known some other way (its sha256 is still checked).

:func:`expected_weight` and :func:`tensor_mismatch` are the pure layer; :func:`plan_verify` makes the
checks that read no weight (``--dry-run``), :func:`run_verify` is the entry point.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl import __version__
from kvwctl.artifacts import ACCESSOR_FORMAT, check_fits_model, read_artifact
from kvwctl.card import CARD_FILE
from kvwctl.checkpoint import FOREIGN_WEIGHT_SUFFIXES, MANIFEST_FILE, MANIFEST_FORMAT, Checkpoint, open_checkpoint
from kvwctl.edits import check_exposure_parts, edit_gates, stored_edits, weakened_tensor
from kvwctl.errors import ArtifactError, UsageError, VerificationError
from kvwctl.files import file_sha256
from kvwctl.method import gates, scale_vectors
from kvwctl.options import VerifyOptions
from kvwctl.outputs import is_plain_relative
from kvwctl.plans import checkpoint_facts
from kvwctl.progress import NullTracker, Tracker
from kvwctl.source import ModelSource, ModelSpec, resolve_model

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES = (".safetensors", *FOREIGN_WEIGHT_SUFFIXES)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class VerifyResult:
    path: Path
    mode: str
    shards: int
    chain: int  # previous manifests checked
    checks: tuple[str, ...]  # what was checked, in order
    base: str | None = None
    tensors_compared: int = 0
    tensors_edited: int = 0
    files_compared: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": True,
            "mode": self.mode,
            "shards": self.shards,
            "previous_manifests": self.chain,
            "base": self.base,
            "tensors_compared": self.tensors_compared,
            "tensors_edited": self.tensors_edited,
            "files_compared": self.files_compared,
            "checks": list(self.checks),
        }


# --- the pure layer ------------------------------------------------------------------------------


def expected_weight(base_weight: torch.Tensor, exposure: torch.Tensor, gamma: float, *, axis: int) -> torch.Tensor:
    """The edited weight ``apply`` writes: ``W * exp(-gamma * E)`` per vector, rounded once."""
    return scale_vectors(base_weight, gates(exposure.to(base_weight.device), gamma), axis=axis)


def tensor_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """How ``actual`` differs from ``expected`` (dtype, shape, or the first differing element), or None."""
    import torch

    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"{actual.dtype} {list(actual.shape)}, expected {expected.dtype} {list(expected.shape)}"
    left = actual.detach().cpu().contiguous().reshape(-1)
    right = expected.detach().cpu().contiguous().reshape(-1)
    differing = (left.view(torch.uint8) != right.view(torch.uint8)).nonzero()
    if differing.numel() == 0:
        return None
    element = int(differing[0]) // left.element_size()
    position = [int(index) for index in torch.unravel_index(torch.tensor(element), actual.shape)]
    return f"element {position} is {left[element].item()!r}, expected {right[element].item()!r}"


def check_manifest(manifest: Any, where: str) -> None:
    """Refuse a manifest that lacks a key ``apply`` writes or has one of the wrong type."""

    def fail(problem: str) -> VerificationError:
        return VerificationError(f"{where}: {problem}", hint="the manifest is not one kvwctl apply wrote")

    if not isinstance(manifest, dict):
        raise fail("not a JSON object")
    if manifest.get("tool") != "kvwctl" or manifest.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise fail(f"format {manifest.get('format')!r}, tool {manifest.get('tool')!r}; expected {MANIFEST_FORMAT}")
    gamma, layers, per_layer = manifest.get("gamma"), manifest.get("layers"), manifest.get("per_layer")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma) or gamma < 0:
        raise fail(f"gamma {gamma!r} is not a finite number >= 0")
    if not isinstance(layers, list) or not all(type(layer) is int and layer >= 0 for layer in layers):
        raise fail(f"layers {layers!r} is not a list of layer numbers")
    if layers != sorted(set(layers)):
        raise fail(f"layers {layers!r} is not sorted and unique")
    if not isinstance(per_layer, dict) or sorted(per_layer) != sorted(str(layer) for layer in layers):
        raise fail(
            f"per_layer has layers {sorted(per_layer) if isinstance(per_layer, dict) else per_layer!r}; layers says {layers}"
        )
    if not all(isinstance(edit, dict) for edit in per_layer.values()):
        raise fail("per_layer holds an entry that is not an object")
    mode = manifest.get("mode")
    if mode not in ("one-shot", "progressive"):
        raise fail(f"mode {mode!r} is neither one-shot nor progressive")
    inputs = "accessor" if mode == "one-shot" else "progressive"
    if not isinstance(manifest.get(inputs), dict):
        raise fail(f"mode {mode} but no {inputs} object")
    if type(manifest.get("vector_axis")) is not int or manifest["vector_axis"] not in (0, 1):
        raise fail(f"vector_axis {manifest.get('vector_axis')!r} is neither 0 nor 1")
    for key in ("shards", "input_shards"):
        # Manifests written before verify existed have no input_shards; then there is nothing to check.
        hashes = manifest.get(key, {} if key == "input_shards" else None)
        if not isinstance(hashes, dict) or (key == "shards" and not hashes):
            raise fail(f"{key} is not an object of shard files and sha256")
        for name, digest in hashes.items():
            if not is_plain_relative(name) or not isinstance(digest, str) or not _SHA256.match(digest):
                raise fail(f"{key}: {name!r}: {digest!r} is not a shard file name and a sha256")
    input_model = manifest.get("input_model")
    if not isinstance(input_model, dict) or not isinstance(input_model.get("fingerprint"), str):
        raise fail("input_model.fingerprint is missing")
    if not isinstance(manifest.get("output_fingerprint"), str):
        raise fail("output_fingerprint is missing")
    if not isinstance(manifest.get("previous_manifest"), dict | None):
        raise fail("previous_manifest is neither an object nor null")
    if not isinstance(manifest.get("redacted", False), bool):
        raise fail(f"redacted {manifest.get('redacted')!r} is neither true nor false")


def check_chain(manifest: dict[str, Any]) -> int:
    """Check every previous manifest and every link; the number of previous manifests."""
    depth, current = 0, manifest
    while current.get("previous_manifest") is not None:
        depth += 1
        previous = current["previous_manifest"]
        check_manifest(previous, f"{MANIFEST_FILE}: previous_manifest ({depth} back)")
        inputs, outputs = current.get("input_shards"), previous["shards"]
        if inputs is not None and inputs != outputs:
            shard = next(name for name in sorted({*inputs, *outputs}) if inputs.get(name) != outputs.get(name))
            raise VerificationError(
                f"{MANIFEST_FILE}: previous_manifest ({depth} back) says shard {shard} had sha256 "
                f"{outputs.get(shard)}, but the input of the run after it had {inputs.get(shard)}",
                hint="the input of that run was not the previous run's output as it was written",
            )
        current = previous
    return depth


# --- the entry point -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyPlan:
    """A verify run resolved and checked without hashing: the manifest, its shards' presence, the base."""

    checkpoint_dir: Path
    manifest: dict[str, Any]
    chain: int
    base: Checkpoint | None
    accessor: Path | None
    options: VerifyOptions
    command: str = "verify"

    @property
    def redacted(self) -> bool:
        return self.manifest.get("redacted") is True

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``): what would be hashed and compared."""
        shards = {name: (self.checkpoint_dir / name).stat().st_size for name in self.manifest["shards"]}
        return {
            "command": self.command,
            "checkpoint": str(self.checkpoint_dir),
            "mode": self.manifest["mode"],
            "layers": self.manifest["layers"],
            "shards": shards,
            "shard_bytes": sum(shards.values()),
            "previous_manifests": self.chain,
            "redacted": self.redacted,
            "base": checkpoint_facts(self.base) if self.base is not None else None,
            "accessor": str(self.accessor) if self.accessor is not None else None,
            "settings": {"device": self.options.device or self.manifest.get("device", "cpu")},
            "outputs": [],
        }


def plan_verify(
    checkpoint_dir: Path, options: VerifyOptions, *, base: ModelSpec | None, accessor: Path | None
) -> VerifyPlan:
    """The checks of ``run_verify`` that read no weight: the manifest, the chain, files present, the base."""
    if (base is None) != (accessor is None):
        raise UsageError("--base and --accessor go together")
    manifest = read_manifest(checkpoint_dir)
    for name in manifest["shards"]:
        if not (checkpoint_dir / name).is_file():
            raise VerificationError(f"shard {name}: missing; {MANIFEST_FILE} lists it")
    for path in sorted(checkpoint_dir.rglob("*")):
        name = path.relative_to(checkpoint_dir).as_posix()
        if path.name.endswith(WEIGHT_SUFFIXES) and name not in manifest["shards"]:
            raise VerificationError(f"{name}: a weight file that {MANIFEST_FILE} does not list")
    chain = check_chain(manifest)
    checkpoint = None
    if base is not None and accessor is not None:
        if not accessor.is_file():
            raise ArtifactError(f"{accessor} does not exist")
        checkpoint = open_checkpoint(resolve_model(base.reference, base.revision))
    return VerifyPlan(
        checkpoint_dir=checkpoint_dir,
        manifest=manifest,
        chain=chain,
        base=checkpoint,
        accessor=accessor,
        options=options,
    )


def run_verify(
    checkpoint_dir: Path,
    options: VerifyOptions,
    *,
    base: ModelSpec | None,
    accessor: Path | None,
    tracker: Tracker | None = None,
) -> VerifyResult:
    """Check ``checkpoint_dir`` against its manifest and, with ``base`` and ``accessor``, its edit."""
    return execute_verify(plan_verify(checkpoint_dir, options, base=base, accessor=accessor), tracker=tracker)


def execute_verify(plan: VerifyPlan, *, tracker: Tracker | None = None) -> VerifyResult:
    """The checks of a planned verify that hash and compare (1 to 7 of the module docstring)."""
    tracker = tracker or NullTracker()
    checkpoint_dir, manifest = plan.checkpoint_dir, plan.manifest
    checks = ["manifest well-formed"]
    if plan.redacted:
        # Nothing below reads a recorded path or id: inputs are matched by sha256 and fingerprint.
        checks.append("redacted manifest: input paths are keyed hashes (not used by any check)")
    shards: dict[str, str] = manifest["shards"]
    for name, digest in tracker.track(shards.items(), total=len(shards), description="hash shards", unit="shards"):
        found = file_sha256(checkpoint_dir / name)
        if found != digest:
            raise VerificationError(f"shard {name}: sha256 {found}, {MANIFEST_FILE} says {digest}")
    checks.append(f"{len(shards)} shards: sha256, no missing or extra weight file")
    output = open_checkpoint(ModelSource(checkpoint_dir, str(checkpoint_dir), None))
    if set(output.shards) != set(shards):
        raise VerificationError(f"the index lists shards {list(output.shards)}; {MANIFEST_FILE} lists {sorted(shards)}")
    fingerprint = output.fingerprint()
    if fingerprint != manifest["output_fingerprint"]:
        raise VerificationError(
            f"output fingerprint {fingerprint}, {MANIFEST_FILE} says {manifest['output_fingerprint']}",
            hint=_version_hint(manifest),
        )
    for layer in manifest["layers"]:
        recorded = manifest["per_layer"][str(layer)].get("tensor")
        if layer >= output.num_layers or recorded not in output.edited_tensor_names(layer):
            raise VerificationError(
                f"{MANIFEST_FILE}: per_layer.{layer}.tensor {recorded!r} is not a down projection of the checkpoint"
            )
    checks += ["index lists the manifest's shards", "output fingerprint", "per_layer names the edited down projections"]
    checks.append(f"{plan.chain} previous manifests well-formed and linked")
    result = VerifyResult(
        path=checkpoint_dir, mode=manifest["mode"], shards=len(shards), chain=plan.chain, checks=tuple(checks)
    )
    if plan.base is None or plan.accessor is None:
        return result
    return _verify_edit(output, manifest, result, plan.base, plan.accessor, plan.options, tracker)


def read_manifest(checkpoint_dir: Path) -> dict[str, Any]:
    """``checkpoint_dir/kvw_manifest.json``, checked as :func:`check_manifest` (check 1)."""
    if not checkpoint_dir.is_dir():
        raise VerificationError(
            f"{checkpoint_dir} is not a directory", hint="pass the checkpoint directory apply wrote"
        )
    path = checkpoint_dir / MANIFEST_FILE
    if not path.is_file():
        raise VerificationError(
            f"{checkpoint_dir} has no {MANIFEST_FILE}",
            hint="verify checks checkpoints written by kvwctl apply, which writes the manifest beside the shards",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise VerificationError(f"{path} is not valid JSON: {error}") from None
    check_manifest(manifest, MANIFEST_FILE)
    return dict(manifest)


def _version_hint(manifest: dict[str, Any]) -> str | None:
    made_by = manifest.get("tool_version")
    if made_by != __version__:
        return f"the manifest was written by kvwctl {made_by} and this is {__version__}; fingerprints may differ"
    return None


def _verify_edit(
    output: Checkpoint,
    manifest: dict[str, Any],
    result: VerifyResult,
    checkpoint: Checkpoint,
    accessor: Path,
    options: VerifyOptions,
    tracker: Tracker,
) -> VerifyResult:
    """Checks 5 to 7 of the module docstring: the accessor, the base, every tensor."""
    import torch
    from safetensors import safe_open

    from kvwctl.modeling import select_device

    checks = list(result.checks)
    recorded = manifest["accessor"].get("sha256") if manifest["mode"] == "one-shot" else None
    key = "accessor.sha256"
    if manifest["mode"] == "progressive":
        recorded, key = manifest["progressive"].get("exposure_sha256"), "progressive.exposure_sha256"
    found = file_sha256(accessor)
    if recorded is None:
        raise VerificationError(f"{MANIFEST_FILE} records no {key}; the accessor cannot be checked against it")
    if found != recorded:
        raise VerificationError(f"accessor {accessor}: sha256 {found}, {MANIFEST_FILE} {key} says {recorded}")
    base_reference = checkpoint.source.reference
    base_fingerprint = checkpoint.fingerprint()
    if base_fingerprint != manifest["input_model"]["fingerprint"]:
        raise VerificationError(
            f"base {base_reference}: fingerprint {base_fingerprint}, {MANIFEST_FILE} input_model.fingerprint says "
            f"{manifest['input_model']['fingerprint']}",
            hint=f"pass the model the checkpoint was made from ({manifest['input_model'].get('reference')})",
        )
    artifact = read_artifact(accessor, ACCESSOR_FORMAT)
    check_fits_model(artifact, checkpoint, base_fingerprint)
    checks += [f"accessor sha256 ({key})", "base fingerprint"]
    if set(checkpoint.shards) != set(output.shards):
        raise VerificationError(
            f"base {base_reference} has shards {list(checkpoint.shards)}; the checkpoint has {list(output.shards)}"
        )
    for name, digest in manifest.get("input_shards", {}).items():
        found = file_sha256(checkpoint.path / name) if name in checkpoint.shards else "none (no such shard)"
        if found != digest:
            raise VerificationError(f"base shard {name}: sha256 {found}, {MANIFEST_FILE} input_shards says {digest}")
    files_compared = _compare_other_files(output, checkpoint, manifest)
    checks += ["base shards sha256 (input_shards)", f"{files_compared} other files identical to the base's"]

    device = select_device(options.device or manifest.get("device", "cpu"))
    gamma, axis = float(manifest["gamma"]), int(manifest["vector_axis"])
    if axis != checkpoint.architecture.vector_axis:
        raise VerificationError(
            f"{MANIFEST_FILE}: vector_axis {axis}, the base's architecture has {checkpoint.architecture.vector_axis}"
        )
    edits = {edit.tensor.name: edit for edit in stored_edits(checkpoint, manifest["layers"])}
    edited = {name: edit.layer for name, edit in edits.items()}
    exposures = {part: artifact.tensors[f"{part}.exposure"] for part in artifact.parts("exposure")}
    check_exposure_parts(str(accessor), exposures, checkpoint)
    compared, tensor_gates = 0, {}  # every edited tensor's gates, for the statistics
    for shard in tracker.track(output.shards, total=len(output.shards), description="compare tensors", unit="shards"):
        with (
            safe_open(str(output.path / shard), framework="pt") as actual,
            safe_open(str(checkpoint.path / shard), framework="pt") as original,
        ):
            if set(actual.keys()) != set(original.keys()) or actual.metadata() != original.metadata():
                raise VerificationError(f"shard {shard}: tensor names or metadata differ from the base's")
            for name in sorted(actual.keys()):
                expected = original.get_tensor(name)
                layer = edited.get(name)
                if layer is not None:
                    part_gates = gates(exposures[edits[name].part].to(device), gamma)
                    expected = weakened_tensor(expected.to(device), edits[name], part_gates)
                    tensor_gates[name] = edit_gates(edits[name], part_gates).reshape(-1)
                problem = tensor_mismatch(actual.get_tensor(name), expected)
                if problem is not None:
                    what = (
                        f"edited (layer {layer}): not W * exp(-gamma * E) with gamma {gamma}"
                        if layer is not None
                        else "untouched: not the base's"
                    )
                    raise VerificationError(
                        f"tensor {name} in {shard}: {what}; {problem}",
                        hint=_device_hint(manifest, device) if layer is not None else None,
                    )
                compared += 1
    for layer in manifest["layers"]:  # the gates of a layer's tensors in apply's order (stored_edits)
        _check_statistics(manifest, layer, torch.cat([tensor_gates[name] for name in edits if edited[name] == layer]))
    checks += [
        f"{compared - len(edited)} untouched tensors byte-identical to the base's",
        f"{len(edited)} edited tensors recomputed exactly",
        "per_layer gate statistics",
    ]
    return replace(
        result,
        checks=tuple(checks),
        base=base_reference,
        tensors_compared=compared,
        tensors_edited=len(edited),
        files_compared=files_compared,
    )


def _compare_other_files(output: Checkpoint, base: Checkpoint, manifest: dict[str, Any]) -> int:
    """Every non-weight file of the output but its card (README.md) equals the base's; the base's own
    manifest is the previous one."""
    previous = base.path / MANIFEST_FILE
    try:
        recorded = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        recorded = "not valid JSON"
    if recorded != manifest["previous_manifest"]:
        raise VerificationError(f"the base's {MANIFEST_FILE} is not the checkpoint's previous_manifest")

    def others(checkpoint: Checkpoint) -> set[str]:
        names = set()
        for path in checkpoint.path.rglob("*"):
            relative = path.relative_to(checkpoint.path)
            if path.is_file() and not relative.parts[0].startswith(".") and not path.name.endswith(WEIGHT_SUFFIXES):
                names.add(relative.as_posix())
        return names - {MANIFEST_FILE, CARD_FILE}  # the card is kvwctl's own, rewritten by kvwctl card

    carried, original = others(output), others(base)
    if carried != original:
        raise VerificationError(
            f"other files differ from the base's: only in the checkpoint {sorted(carried - original)}, only in the base {sorted(original - carried)}"
        )
    for name in sorted(carried):
        if (output.path / name).read_bytes() != (base.path / name).read_bytes():
            raise VerificationError(f"file {name}: differs from the base's")
    return len(carried)


def _check_statistics(manifest: dict[str, Any], layer: int, gate: torch.Tensor) -> None:
    """``per_layer`` as ``apply`` computes it (``LayerEdit``) from the recomputed gates."""
    recorded = manifest["per_layer"][str(layer)]
    recomputed = {
        "vectors": gate.numel(),
        "scaled": int((gate < 1).sum()),
        "min_gate": float(gate.min()),
        "mean_gate": float(gate.double().mean()),
    }
    for key, value in recomputed.items():
        if recorded.get(key) != value:
            raise VerificationError(
                f"{MANIFEST_FILE}: per_layer.{layer}.{key} is {recorded.get(key)!r}; recomputed {value!r}"
            )


def _device_hint(manifest: dict[str, Any], device: torch.device) -> str | None:
    from importlib.metadata import version

    made_on = (manifest.get("device"), manifest.get("versions", {}).get("torch"))
    here = (device.type, version("torch"))
    if made_on != here:
        return f"made on {made_on[0]} with torch {made_on[1]}, recomputed on {here[0]} with torch {here[1]}: exp may differ in the last bit; try --device {made_on[0]}"
    return None
