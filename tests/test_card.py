"""The model card (README.md) of a weakened checkpoint, license files, and ``kvwctl card``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import copy_checkpoint, expect_error, hub_snapshot, invoke
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils._paths import filter_repo_objects

from kvwctl.card import card_text, is_license_file
from kvwctl.checkpoint import MANIFEST_FILE
from kvwctl.source import HUB_ALLOW_PATTERNS

GAMMA, LAYERS = "0.5", "1:2"
BASE_CARD = (
    "---\nlicense: apache-2.0\nlicense_link: https://example.org/terms\ntags:\n- base-tag\n---\n\n# BASE CARD TEXT\n"
)

MANIFEST: dict[str, Any] = {
    "tool_version": "0.1.0",
    "versions": {"kvwctl": "0.1.0", "torch": "2.14.1"},
    "created": "2026-01-02T03:04:05+00:00",
    "input_model": {
        "reference": "org/base",
        "revision": "a" * 40,
        "path": "/cache/snapshots/aaaa",
        "fingerprint": "f" * 64,
        "model_type": "llama",
    },
    "mode": "one-shot",
    "accessor": {"path": "../accessor.safetensors", "sha256": "b" * 64, "batch_size": 1, "mode": "one-shot"},
    "gamma": 0.02,
    "layers": [1, 2],
    "device": "cpu",
    "per_layer": {
        "2": {"tensor": "model.layers.2.mlp.down_proj.weight", "vectors": 48, "scaled": 40, "min_gate": 0.5, "mean_gate": 0.91234567},
        "1": {"tensor": "model.layers.1.mlp.down_proj.weight", "vectors": 48, "scaled": 3, "min_gate": 0.25, "mean_gate": 0.9999999},
    },
    "output_fingerprint": "e" * 64,
    "previous_manifest": {"previous_manifest": None},
}  # fmt: skip

EXPECTED = """\
---
base_model: org/base
library_name: transformers
license: apache-2.0
tags:
- kvwctl
- unlearning
- knowledge-vector-weakening
- llama
---

# org/base, unlearned with Knowledge Vector Weakening

This checkpoint is the Hub model `org/base` after machine unlearning by Knowledge Vector Weakening (KVW, \
Kim et al. 2026, arXiv:2601.21794), made with kvwctl 0.1.0 (one-shot). No training: in the decoder layers \
1, 2 the knowledge vectors of the FFN down projections were scaled by `exp(-gamma * E)`, gamma = 0.02, where \
`E` is each vector's forget exposure against the retain set. Every other tensor, the tokenizer and the configs \
are the base's, byte for byte; `kvw_manifest.json` records how the checkpoint was made.

## How it was made

| | |
|---|---|
| base model | `org/base` |
| base revision | `aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa` |
| base fingerprint | `ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff` |
| method | Knowledge Vector Weakening: `W * exp(-gamma * E)` per knowledge vector |
| mode | one-shot |
| gamma | 0.02 |
| layers (0-based) | 1, 2 |
| accessor | `../accessor.safetensors`, sha256 `bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb` |
| forget batch size | 1 |
| made with | kvwctl 0.1.0, torch 2.14.1; gates computed on cpu |
| created | `2026-01-02T03:04:05+00:00` |
| output fingerprint | `eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee` |
| earlier kvwctl edits of the base | 1 |

## What was weakened

The forget and retain data are named only by the paths and sha256 the manifest records; this card holds \
none of their samples. Per edited layer, the knowledge vectors scaled (gate below 1) and the gates \
`exp(-gamma * E)`:

| layer | tensor | vectors | scaled | min gate | mean gate |
|---|---|---|---|---|---|
| 1 | `model.layers.1.mlp.down_proj.weight` | 48 | 3 | 0.25 | 1 |
| 2 | `model.layers.2.mlp.down_proj.weight` | 48 | 40 | 0.5 | 0.912346 |

## Evaluation

From a kvwctl eval report (kvwctl.eval/2, sha256 `cccc`); `model` is this checkpoint. Means over each \
split's samples (count in brackets):

| role | model | split | metric | mean |
|---|---|---|---|---|
| model | `unlearned` | forget | keyword_acc | 0.25 (4) |
| model | `unlearned` | forget | mc_acc | n/a (0) |
| baseline | `org/base` | forget | keyword_acc | 1 (4) |

| requirement | value | threshold | outcome |
|---|---|---|---|
| `forget.keyword_acc <= 0.1` | 0.25 | 0.1 | failed |
| `forget.keyword_acc <= 0.5*baseline` | 0.25 | 0.5 | passed |

## License

The base model's terms apply (`license: apache-2.0` in the base's card): `LICENSE`, `NOTICE.md`, carried \
over from the base.

## Verify

```sh
kvwctl verify DIR                     # the files are what kvw_manifest.json says
kvwctl verify DIR --base org/base --accessor ../accessor.safetensors
```
"""

REPORT: dict[str, Any] = {
    "format": "kvwctl.eval/2",
    "models": {"model": {"reference": "unlearned", "fingerprint": "e" * 64}, "baseline": {"reference": "org/base"}},
    "results": {
        "model": {"forget": {"keyword_acc": {"mean": 0.25, "count": 4}, "mc_acc": {"mean": None, "count": 0}}},
        "baseline": {"forget": {"keyword_acc": {"mean": 1.0, "count": 4}}},
    },
    "requirements": [
        {"requirement": "forget.keyword_acc <= 0.1", "value": 0.25, "threshold": 0.1, "passed": False},
        {"requirement": "forget.keyword_acc <= 0.5*baseline", "value": 0.25, "threshold": 0.5, "passed": True},
    ],
}


def test_the_card_of_a_manifest_is_exactly_this_text() -> None:
    text = card_text(
        MANIFEST,
        license_files=["LICENSE", "NOTICE.md"],
        license={"license": "apache-2.0"},
        report=REPORT,
        report_sha256="cccc",
    )
    assert text == EXPECTED


def test_a_local_base_has_no_base_model_and_an_unevaluated_card_says_so() -> None:
    local = {**MANIFEST, "input_model": {**MANIFEST["input_model"], "reference": "/data/base", "revision": None}}
    text = card_text(local, license_files=[], license={})
    assert text.startswith(
        "---\nlibrary_name: transformers\ntags:\n- kvwctl\n- unlearning\n- knowledge-vector-weakening\n- llama\n---\n"
    )
    assert "| base revision | a local directory |" in text
    assert "This checkpoint is the local checkpoint `/data/base` after" in text
    assert "No evaluation is attached." in text
    assert "The base checkpoint had no license file" in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("LICENSE", True), ("license.txt", True), ("LICENSE.md", True), ("Licence", True), ("NOTICE", True),
        ("COPYING", True), ("USE_POLICY.md", True), ("LICENSE-MIT", True), ("licenses.json", False),
        ("README.md", False), ("config.json", False), ("sub/LICENSE", False), ("MY_LICENSE", False),
    ],
)  # fmt: skip
def test_license_file_names(name: str, expected: bool) -> None:
    assert is_license_file(name) is expected


def test_the_hub_allow_list_downloads_license_files_and_the_card_but_no_other_markdown() -> None:
    names = ["LICENSE", "LICENSE.txt", "LICENSE-MIT", "license", "Licence.md", "NOTICE.md", "COPYING", "USE_POLICY.md"]
    names += ["README.md", "notes.md", "docs/LICENSE.md"]
    kept = list(filter_repo_objects(names, allow_patterns=HUB_ALLOW_PATTERNS))
    assert kept == names[:-2]


# --- through apply and the CLI -------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny qwen2 with a model card and license files of its own."""
    path = copy_checkpoint(checkpoints["qwen2"], tmp_path_factory.mktemp("card-base") / "base")
    (path / "README.md").write_text(BASE_CARD)
    (path / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    (path / "NOTICE.md").write_bytes(b"Notice \xc3\xa9\n")
    (path / "use_policy.txt").write_text("Use it well.\n")
    return path


@pytest.fixture(scope="module")
def unlearned(base: Path, accessor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("card-out") / "unlearned"
    result = invoke(
        "apply", "--model", base, "--accessor", accessor, "--gamma", GAMMA, "--layers", LAYERS, "--out", out
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def eval_report(unlearned: Path, base: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("card-eval") / "eval.json"
    result = invoke(
        "eval", "--model", unlearned, "--baseline", base, "--data", f"forget={data['forget-text']}",
        "--max-new-tokens", "2", "--require", "forget.keyword_acc <= 1", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def manifest_of(directory: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((directory / MANIFEST_FILE).read_text())
    return manifest


def test_apply_writes_its_own_card_and_carries_the_license_files(
    unlearned: Path, base: Path, accessor: Path, data: dict[str, Path]
) -> None:
    card = (unlearned / "README.md").read_text()
    assert "BASE CARD TEXT" not in card
    metadata = metadata_load(unlearned / "README.md")
    assert metadata == {
        "library_name": "transformers",
        "license": "apache-2.0",
        "license_link": "https://example.org/terms",
        "tags": ["kvwctl", "unlearning", "knowledge-vector-weakening", "qwen2"],
    }  # a local base: no base_model; the base card's license fields kept, its tags not
    for name in ("LICENSE", "NOTICE.md", "use_policy.txt"):
        assert (unlearned / name).read_bytes() == (base / name).read_bytes()
    manifest = manifest_of(unlearned)
    assert "README.md" not in manifest["shards"]
    expected = card_text(manifest, license_files=["LICENSE", "NOTICE.md", "use_policy.txt"], license=kept(metadata))
    assert card == expected
    for layer in (1, 2):
        edit = manifest["per_layer"][str(layer)]
        row = f"| {layer} | `{edit['tensor']}` | {edit['vectors']} | {edit['scaled']} | {edit['min_gate']:.6g} | {edit['mean_gate']:.6g} |"
        assert row in card
    assert "| gamma | 0.5 |" in card and "| layers (0-based) | 1, 2 |" in card and "| mode | one-shot |" in card
    samples = [json.loads(line) for line in data["forget-text"].read_text().splitlines()]
    for sample in samples:  # nothing of the forget data but what the manifest records
        assert sample["question"] not in card and sample["answer"] not in card


def kept(metadata: dict[str, Any]) -> dict[str, str]:
    return {key: metadata[key] for key in ("license", "license_name", "license_link") if key in metadata}


def test_verify_passes_with_the_card_and_after_kvwctl_card_rewrote_it(
    unlearned: Path, base: Path, accessor: Path, eval_report: Path, tmp_path: Path
) -> None:
    directory = copy_checkpoint(unlearned, tmp_path / "unlearned")
    assert invoke("verify", directory, "--base", base, "--accessor", accessor).exit_code == 0
    result = invoke("card", directory, "--eval", eval_report)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{directory / 'README.md'}\n"
    extras: list[list[str | Path]] = [[], ["--base", base, "--accessor", accessor]]
    for extra in extras:
        verified = invoke("verify", directory, *extra)
        assert verified.exit_code == 0, verified.output


def test_kvwctl_card_adds_the_eval_results_deterministically(
    unlearned: Path, eval_report: Path, tmp_path: Path
) -> None:
    directory = copy_checkpoint(unlearned, tmp_path / "unlearned")
    assert invoke("card", directory, "--eval", eval_report).exit_code == 0
    first = (directory / "README.md").read_bytes()
    assert invoke("card", directory, "--eval", eval_report).exit_code == 0
    assert (directory / "README.md").read_bytes() == first
    card = first.decode()
    report = json.loads(eval_report.read_text())
    for role, splits in report["results"].items():
        reference = report["models"][role]["reference"]
        for metric, summary in splits["forget"].items():
            mean = "n/a" if summary["mean"] is None else f"{summary['mean']:.6g}"
            assert f"| {role} | `{reference}` | forget | {metric} | {mean} ({summary['count']}) |" in card
    [outcome] = report["requirements"]
    assert f"| `forget.keyword_acc <= 1` | {outcome['value']:.6g} | 1 | passed |" in card
    assert "license: apache-2.0" in card  # kept from the card it replaced
    # Without --eval the card is the apply's again.
    assert invoke("card", directory).exit_code == 0
    assert (directory / "README.md").read_bytes() == (unlearned / "README.md").read_bytes()


def test_apply_eval_includes_a_report_of_the_identical_output(
    base: Path, accessor: Path, eval_report: Path, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    result = invoke(
        "apply", "--model", base, "--accessor", accessor, "--gamma", GAMMA, "--layers", LAYERS, "--out", out,
        "--eval", eval_report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "## Evaluation\n\nFrom a kvwctl eval report" in (out / "README.md").read_text()


def test_an_eval_report_of_another_model_is_refused(
    base: Path, accessor: Path, eval_report: Path, unlearned: Path, tmp_path: Path
) -> None:
    report = json.loads(eval_report.read_text())
    report["models"]["model"]["fingerprint"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    directory = copy_checkpoint(unlearned, tmp_path / "unlearned")
    expect_error(invoke("card", directory, "--eval", other), f"(fingerprint {'0' * 64}), not this checkpoint")
    assert (directory / "README.md").read_bytes() == (unlearned / "README.md").read_bytes()
    out = tmp_path / "out"
    result = invoke("apply", "--model", base, "--accessor", accessor, "--gamma", GAMMA, "--out", out, "--eval", other)
    expect_error(result, "not this checkpoint")
    assert not out.exists() and sorted(tmp_path.iterdir()) == [other, directory]


def test_card_errors(unlearned: Path, base: Path, tmp_path: Path) -> None:
    expect_error(invoke("card", base), "has no kvw_manifest.json")
    directory = copy_checkpoint(unlearned, tmp_path / "unlearned")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "kvwctl.eval/1"}')
    expect_error(invoke("card", directory, "--eval", bad), "format 'kvwctl.eval/1'; expected kvwctl.eval/2")
    expect_error(invoke("card", directory, "--eval", tmp_path / "missing.json"), "does not exist")
    (directory / "README.md").write_text("---\nlicense: mit\n---\n# my own notes\n")
    expect_error(invoke("card", directory), "was not written by kvwctl")
    assert invoke("card", directory, "--force").exit_code == 0
    assert (metadata_load(directory / "README.md") or {})["license"] == "mit"
    (directory / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    expect_error(invoke("card", directory, "--force"), "the model card's YAML metadata cannot be read")


def test_apply_refuses_a_base_card_whose_metadata_cannot_be_read(base: Path, accessor: Path, tmp_path: Path) -> None:
    broken = copy_checkpoint(base, tmp_path / "broken")
    (broken / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    out = tmp_path / "out"
    expect_error(invoke("apply", "--model", broken, "--accessor", accessor, "--out", out), "README.md: the model card")
    assert not out.exists()


def test_progressive_apply_writes_the_card(base: Path, data: dict[str, Path], accessor: Path, tmp_path: Path) -> None:
    retain = accessor.parent / "retain.safetensors"
    out = tmp_path / "progressive"
    result = invoke(
        "apply", "--progressive", "--model", base, "--forget-data", data["forget-text"], "--retain", retain,
        "--gamma", GAMMA, "--layers", LAYERS, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    manifest = manifest_of(out)
    assert card == card_text(
        manifest,
        license_files=["LICENSE", "NOTICE.md", "use_policy.txt"],
        license=kept(metadata_load(base / "README.md") or {}),
    )
    progressive = manifest["progressive"]
    assert f"| forget data | `{progressive['forget_data']}`, sha256 `{progressive['forget_data_sha256']}` |" in card
    assert "| mode | progressive |" in card
    exposure = tmp_path / "progressive.exposure.safetensors"
    assert invoke("verify", out, "--base", base, "--accessor", exposure).exit_code == 0


def test_a_hub_base_gives_base_model_and_its_license_files(base: Path, accessor: Path, tmp_path: Path) -> None:
    repo, commit = "kvw-tests/tiny-qwen2", "0123456789abcdef0123456789abcdef01234567"
    hub_snapshot(base, tmp_path / "hub", repo=repo, commit=commit)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "home"),
    }
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "kvwctl", "apply", "--model", repo, "--accessor", str(accessor), "--gamma", GAMMA,
         "--layers", LAYERS, "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    # The accessor was made from the same weights (the snapshot's files are the base's bytes).
    assert run.returncode == 0, run.stderr
    metadata = metadata_load(out / "README.md")
    assert metadata is not None and metadata["base_model"] == repo and metadata["license"] == "apache-2.0"
    for name in ("LICENSE", "NOTICE.md", "use_policy.txt"):
        assert (out / name).read_bytes() == (base / name).read_bytes() and not (out / name).is_symlink()
    assert f"| base revision | `{commit}` |" in (out / "README.md").read_text()
