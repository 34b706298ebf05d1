"""The model card of a weakened checkpoint: ``README.md``, written from its ``kvw_manifest.json``.

    kvwctl apply ... --out unlearned/                 # writes unlearned/README.md
    kvwctl card unlearned/ --eval eval.json           # rewrites it with eval's results

The card is built with huggingface_hub's ``ModelCardData`` (YAML metadata: ``base_model`` for a
Hub input, ``library_name``, the tags of :data:`CARD_TAGS` plus the model type, and the license
fields of the card it replaces) and a Markdown body made only from the manifest and, optionally,
an eval report (``kvwctl.eval/2``): the method, ``gamma``, the layers, the mode, the inputs as
the manifest records them (paths and sha256, never a sample), per layer the vectors scaled and
the gates, eval's means per role, split and metric and its requirement outcomes, and the
license files in the directory. It holds no timestamp but the manifest's ``created``, so the
same inputs give the same bytes.

``README.md`` is not among the files the manifest hashes, so rewriting it keeps ``kvwctl verify``
passing; ``verify --base`` leaves it out of the comparison with the base's files. License files
(:func:`is_license_file`) are carried over from the base like every other non-weight file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl.errors import ArtifactError, KvwError, ModelError
from kvwctl.files import file_sha256, write_text_atomically
from kvwctl.report import EVAL_FORMAT

CARD_FILE = "README.md"
CARD_TAGS = ("kvwctl", "unlearning", "knowledge-vector-weakening")
# The license fields of the card being replaced that the new card keeps (the base's terms apply).
LICENSE_FIELDS = ("license", "license_name", "license_link")
# LICENSE, LICENCE, COPYING, NOTICE and Llama's USE_POLICY, with any suffix (.txt, .md, -MIT),
# in any case, in the checkpoint's top directory.
_LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice|use[_-]policy)([._-].*)?$", re.IGNORECASE)


def is_license_file(name: str) -> bool:
    """Whether the top-level file ``name`` holds license terms (``LICENSE``, ``NOTICE.md``, ...)."""
    return "/" not in name and _LICENSE_NAME.match(name) is not None


@dataclass(frozen=True)
class CardResult:
    path: Path  # the README.md written
    eval_report: Path | None

    def to_json(self) -> dict[str, Any]:
        return {"card": str(self.path), "eval": None if self.eval_report is None else str(self.eval_report)}


# --- reading the inputs --------------------------------------------------------------------------


def card_metadata(path: Path) -> dict[str, Any]:
    """The YAML metadata of the model card at ``path`` ({} when it has none)."""
    import yaml
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(path)
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"{path}: the model card's YAML metadata cannot be read: {problem}",
            hint="fix or remove its --- metadata --- block (kvwctl keeps its license fields)",
        ) from None
    return dict(metadata or {})


def base_license(checkpoint_dir: Path) -> dict[str, str]:
    """The license fields of ``checkpoint_dir``'s card, if it has one (read before any work)."""
    card = checkpoint_dir / CARD_FILE
    return kept_license(card_metadata(card)) if card.is_file() else {}


def kept_license(metadata: dict[str, Any]) -> dict[str, str]:
    """The license fields of a card's metadata that are strings, in :data:`LICENSE_FIELDS` order."""
    return {key: metadata[key] for key in LICENSE_FIELDS if isinstance(metadata.get(key), str)}


def read_eval_report(path: Path) -> dict[str, Any]:
    """An eval report (``kvwctl.eval/2``), checked for the keys the card uses."""

    def fail(problem: str) -> ArtifactError:
        return ArtifactError(f"{path}: {problem}", hint="pass the eval.json that kvwctl eval wrote")

    if not path.is_file():
        raise ArtifactError(f"eval report {path} does not exist", hint="run kvwctl eval first")
    try:
        report = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise fail(f"not valid JSON: {error}") from None
    if not isinstance(report, dict) or report.get("format") != EVAL_FORMAT:
        found = report.get("format") if isinstance(report, dict) else None
        raise fail(f"format {found!r}; expected {EVAL_FORMAT}")
    model = report.get("models", {}).get("model") if isinstance(report.get("models"), dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise fail("models.model.fingerprint is missing")
    results = report.get("results")
    if not isinstance(results, dict):
        raise fail("results is not an object")
    for role, splits in results.items():
        if not isinstance(splits, dict):
            raise fail(f"results.{role} is not an object of splits")
        for split, metrics in splits.items():
            if not isinstance(metrics, dict):
                raise fail(f"results.{role}.{split} is not an object of metrics")
            for metric, summary in metrics.items():
                mean = summary.get("mean") if isinstance(summary, dict) else "missing"
                if isinstance(mean, bool) or not isinstance(mean, int | float | None):
                    raise fail(f"results.{role}.{split}.{metric}.mean is {mean!r}, not a number or null")
    requirements = report.get("requirements")
    if not isinstance(requirements, list) or not all(
        isinstance(outcome, dict)
        and isinstance(outcome.get("requirement"), str)
        and type(outcome.get("passed")) is bool
        for outcome in requirements
    ):
        raise fail("requirements is not a list of outcomes with requirement and passed")
    return report


@dataclass(frozen=True)
class AttachedReport:
    """An eval report read for a card: its path, content and sha256."""

    path: Path
    report: dict[str, Any]
    sha256: str


def attach_report(path: Path) -> AttachedReport:
    """Read and check ``path`` (:func:`read_eval_report`) before any expensive work."""
    return AttachedReport(path=path, report=read_eval_report(path), sha256=file_sha256(path))


def check_report_fits(report: dict[str, Any], report_path: Path, manifest: dict[str, Any]) -> None:
    """Refuse an eval report whose evaluated model is not the checkpoint the manifest describes."""
    evaluated, checkpoint = report["models"]["model"]["fingerprint"], manifest["output_fingerprint"]
    if evaluated != checkpoint:
        raise ArtifactError(
            f"{report_path} evaluated the model {report['models']['model'].get('reference')} (fingerprint "
            f"{evaluated}), not this checkpoint (output_fingerprint {checkpoint})",
            hint="run kvwctl eval --model on this checkpoint and pass that report",
        )


# --- the card ------------------------------------------------------------------------------------


def card_text(
    manifest: dict[str, Any],
    *,
    license_files: list[str],
    license: dict[str, str],
    report: dict[str, Any] | None = None,
    report_sha256: str | None = None,
) -> str:
    """The whole ``README.md``: YAML metadata, then the Markdown body. Pure: same inputs, same text."""
    from huggingface_hub import ModelCardData

    base = manifest["input_model"]
    from_hub = base.get("revision") is not None  # a local directory has no revision and no Hub id
    model_type = base.get("model_type")
    tags = [*CARD_TAGS, *([model_type] if isinstance(model_type, str) else [])]
    data = ModelCardData(
        base_model=base["reference"] if from_hub else None,
        library_name="transformers",
        tags=tags,
        license=license.get("license"),
        license_name=license.get("license_name"),
        license_link=license.get("license_link"),
    )
    sections = [
        _summary(manifest, from_hub),
        _how_it_was_made(manifest),
        _what_was_forgotten(manifest),
        _evaluation(report, report_sha256),
        _license(license_files, license),
        _verify(manifest),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _code(value: object) -> str:
    return "`" + str(value).replace("`", "'").replace("|", "\\|") + "`"


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _summary(manifest: dict[str, Any], from_hub: bool) -> str:
    base = manifest["input_model"]
    where = (
        f"the Hub model {_code(base['reference'])}" if from_hub else f"the local checkpoint {_code(base['reference'])}"
    )
    mode = "one-shot" if manifest["mode"] == "one-shot" else "progressive (the paper's Algorithm 1)"
    return (
        f"# {base['reference']}, unlearned with Knowledge Vector Weakening\n\n"
        f"This checkpoint is {where} after machine unlearning by Knowledge Vector Weakening (KVW, Kim et al. "
        f"2026, arXiv:2601.21794), made with kvwctl {manifest['tool_version']} ({mode}). No training: in the "
        f"decoder layers {_layers(manifest['layers'])} the knowledge vectors of the FFN down projections were "
        f"scaled by `exp(-gamma * E)`, gamma = {_number(manifest['gamma'])}, where `E` is each vector's forget "
        "exposure against the retain set. Every other tensor, the tokenizer and the configs are the base's, "
        "byte for byte; `kvw_manifest.json` records how the checkpoint was made."
    )


def _layers(layers: list[int]) -> str:
    return ", ".join(str(layer) for layer in layers) if layers else "(none)"


def _how_it_was_made(manifest: dict[str, Any]) -> str:
    base = manifest["input_model"]
    versions = manifest.get("versions", {})
    rows = [
        ("base model", _code(base["reference"])),
        ("base revision", _code(base["revision"]) if base.get("revision") else "a local directory"),
        ("base fingerprint", _code(base["fingerprint"])),
        ("method", "Knowledge Vector Weakening: `W * exp(-gamma * E)` per knowledge vector"),
        ("mode", manifest["mode"]),
        ("gamma", _number(manifest["gamma"])),
        ("layers (0-based)", _layers(manifest["layers"])),
    ]
    if manifest["mode"] == "one-shot":
        accessor = manifest["accessor"]
        rows += [
            ("accessor", f"{_code(accessor.get('path'))}, sha256 {_code(accessor.get('sha256'))}"),
            ("forget batch size", _number(accessor.get("batch_size"))),
        ]
    else:
        progressive = manifest["progressive"]
        rows += [
            ("forget data", f"{_code(progressive.get('forget_data'))}, sha256 {_code(progressive.get('forget_data_sha256'))}"),
            ("retain profile", f"{_code(progressive.get('retain_profile'))}, sha256 {_code(progressive.get('retain_profile_sha256'))}"),
            ("forget batches", f"{_number(progressive.get('num_batches'))} of {_number(progressive.get('batch_size'))}"),
            ("positions", _code(progressive.get("positions"))),
            ("exposure applied", f"{_code(progressive.get('exposure_file'))}, sha256 {_code(progressive.get('exposure_sha256'))}"),
        ]  # fmt: skip
    made_with = ", ".join(f"{name} {version}" for name, version in versions.items())
    rows += [
        ("made with", f"{made_with}; gates computed on {manifest.get('device')}"),
        ("created", _code(manifest.get("created"))),
        ("output fingerprint", _code(manifest["output_fingerprint"])),
        ("earlier kvwctl edits of the base", str(_chain_depth(manifest))),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## How it was made\n\n| | |\n|---|---|\n{table}"


def _chain_depth(manifest: dict[str, Any]) -> int:
    depth, current = 0, manifest.get("previous_manifest")
    while isinstance(current, dict):
        depth, current = depth + 1, current.get("previous_manifest")
    return depth


def _what_was_forgotten(manifest: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {layer} | {_code(edit.get('tensor'))} | {edit.get('vectors')} | {edit.get('scaled')} | "
        f"{_number(edit.get('min_gate'))} | {_number(edit.get('mean_gate'))} |"
        for layer, edit in sorted(manifest["per_layer"].items(), key=lambda item: int(item[0]))
    )
    return (
        "## What was weakened\n\n"
        "The forget and retain data are named only by the paths and sha256 the manifest records; this card "
        "holds none of their samples. Per edited layer, the knowledge vectors scaled (gate below 1) and the "
        "gates `exp(-gamma * E)`:\n\n"
        "| layer | tensor | vectors | scaled | min gate | mean gate |\n|---|---|---|---|---|---|\n" + rows
    )


def _evaluation(report: dict[str, Any] | None, report_sha256: str | None) -> str:
    if report is None:
        return (
            "## Evaluation\n\nNo evaluation is attached. Run `kvwctl eval --model DIR --baseline BASE ...`, then "
            "`kvwctl card DIR --eval eval.json` to add its results here."
        )
    roles = {
        role: info.get("reference") for role, info in report["models"].items() if isinstance(info, dict)
    }  # role -> model reference
    lines = [
        "## Evaluation",
        "",
        f"From a kvwctl eval report ({report['format']}, sha256 {_code(report_sha256)}); `model` is this "
        "checkpoint. Means over each split's samples (count in brackets):",
        "",
        "| role | model | split | metric | mean |",
        "|---|---|---|---|---|",
    ]
    for role, splits in report["results"].items():
        for split, metrics in splits.items():
            for metric, summary in metrics.items():
                value = f"{_number(summary.get('mean'))} ({summary.get('count')})"
                lines.append(f"| {role} | {_code(roles.get(role))} | {split} | {metric} | {value} |")
    if report["requirements"]:
        lines += ["", "| requirement | value | threshold | outcome |", "|---|---|---|---|"]
        for outcome in report["requirements"]:
            passed = "passed" if outcome["passed"] else "failed"
            lines.append(
                f"| {_code(outcome['requirement'])} | {_number(outcome.get('value'))} | "
                f"{_number(outcome.get('threshold'))} | {passed} |"
            )
    return "\n".join(lines)


def _license(license_files: list[str], license: dict[str, str]) -> str:
    stated = f" (`license: {license['license']}` in the base's card)" if "license" in license else ""
    if license_files:
        names = ", ".join(_code(name) for name in license_files)
        return f"## License\n\nThe base model's terms apply{stated}: {names}, carried over from the base."
    return (
        f"## License\n\nThe base model's terms apply{stated}. The base checkpoint had no license file "
        "(LICENSE, NOTICE, COPYING, USE_POLICY); check the terms where the base model is published."
    )


def _verify(manifest: dict[str, Any]) -> str:
    accessor = (
        manifest["accessor"].get("path")
        if manifest["mode"] == "one-shot"
        else manifest["progressive"].get("exposure_file")
    )
    return (
        "## Verify\n\n```sh\n"
        "kvwctl verify DIR                     # the files are what kvw_manifest.json says\n"
        f"kvwctl verify DIR --base {manifest['input_model']['reference']} --accessor {accessor}\n```"
    )


# --- writing -------------------------------------------------------------------------------------


def write_card(
    directory: Path,
    manifest: dict[str, Any],
    *,
    license: dict[str, str],
    attached: AttachedReport | None = None,
) -> Path:
    """Write ``directory/README.md`` atomically; the license files are those in ``directory``.

    An ``attached`` report must have evaluated this checkpoint (:func:`check_report_fits`).
    """
    if attached is not None:
        check_report_fits(attached.report, attached.path, manifest)
    license_files = sorted(path.name for path in directory.iterdir() if path.is_file() and is_license_file(path.name))
    text = card_text(
        manifest,
        license_files=license_files,
        license=license,
        report=None if attached is None else attached.report,
        report_sha256=None if attached is None else attached.sha256,
    )
    out = directory / CARD_FILE
    write_text_atomically(out, text)
    return out


def is_kvwctl_card(path: Path) -> bool:
    """Whether ``path`` is a card kvwctl wrote (its metadata has the ``kvwctl`` tag)."""
    tags = card_metadata(path).get("tags")
    return isinstance(tags, list) and CARD_TAGS[0] in tags


def run_card(checkpoint_dir: Path, *, eval_report: Path | None, force: bool) -> CardResult:
    """Rewrite the card of an existing kvwctl checkpoint from its manifest (and an eval report).

    A ``README.md`` that kvwctl did not write (a checkpoint made before kvwctl wrote cards has the
    base's) is replaced only with ``force``; its license fields are kept either way.
    """
    from kvwctl.verify import read_manifest

    manifest = read_manifest(checkpoint_dir)
    existing = checkpoint_dir / CARD_FILE
    if eval_report is not None and eval_report.exists() and existing.exists() and eval_report.samefile(existing):
        raise KvwError(
            f"--eval {eval_report} is the card {existing} itself", hint="pass the eval.json kvwctl eval wrote"
        )
    attached = attach_report(eval_report) if eval_report is not None else None
    if attached is not None:
        check_report_fits(attached.report, attached.path, manifest)
    license: dict[str, str] = {}
    if existing.exists():
        if not existing.is_file() or existing.is_symlink():
            raise KvwError(f"{existing} is not a regular file; kvwctl does not replace it")
        license = kept_license(card_metadata(existing))
        if not force and not is_kvwctl_card(existing):
            raise KvwError(
                f"{existing} was not written by kvwctl (its metadata has no kvwctl tag)",
                hint="pass --force to replace it (its license fields are kept)",
            )
    path = write_card(checkpoint_dir, manifest, license=license, attached=attached)
    return CardResult(path=path, eval_report=eval_report)
