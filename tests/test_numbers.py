"""Non-finite and impossible numbers never flow through (issue 9, class 2).

gamma is bounded so that gamma * E is a finite float32; every stage file's tensors are validated
when read and before they are written (dtype, shape, finite, sign, counts > 0); a checkpoint with a
non-finite edited weight is never written; eval records non-finite metrics as null, lists them,
and fails every requirement on them; no JSON output holds NaN or Infinity.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import invoke
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import Result

from kvwctl.accessor import run_accessor
from kvwctl.apply import write_weakened_checkpoint
from kvwctl.checkpoint import open_checkpoint
from kvwctl.errors import UsageError
from kvwctl.files import write_json_atomically
from kvwctl.method import FLOAT32_MAX, check_gamma
from kvwctl.metrics import MetricSummary, summarize
from kvwctl.options import AccessorOptions, ApplyOptions, ProfileOptions
from kvwctl.profile import run_profile
from kvwctl.progress import NullTracker
from kvwctl.requirements import check_requirements, parse_requirement
from kvwctl.source import ModelSpec, resolve_model


def error_line(result: Result) -> str:
    """The ``Error: …`` line of a failed command's stderr (after the table of its inputs)."""
    return next((line for line in result.stderr.splitlines() if line.startswith("Error: ")), "")


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as strict parsers do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def read_stage_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as stream:
        return {name: stream.get_tensor(name) for name in stream.keys()}, dict(stream.metadata())


def hand_made(source: Path, out: Path, *, metadata: dict[str, str] | None = None, **tensors: torch.Tensor) -> Path:
    """A copy of a real stage file with some tensors (``layers_0_sum`` for layers.0.sum) or metadata replaced."""
    stored, stored_metadata = read_stage_file(source)
    stored.update({name.replace("_", "."): tensor for name, tensor in tensors.items()})
    save_file(stored, str(out), metadata={**stored_metadata, **(metadata or {})})
    return out


def poisoned_checkpoint(source: Path, out: Path, layer: int, value: float) -> Path:
    """A copy of a checkpoint whose layer-``layer`` down projection is all ``value``."""
    shutil.copytree(source, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = next(name for name in index["weight_map"] if f"layers.{layer}.mlp.down_proj.weight" in name)
    shard = out / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as stream:
        shard_metadata = stream.metadata()
    tensors = load_file(str(shard))
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(shard), metadata=shard_metadata)
    return out


@pytest.fixture(scope="module")
def stages(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Real qwen2 profiles and accessor to copy hand-made stage files from."""
    root = tmp_path_factory.mktemp("numbers")
    model = ModelSpec(str(checkpoints["qwen2"]))
    retain = run_profile(model, data["retain-text"], root / "r.safetensors", ProfileOptions(split="retain")).path
    forget = run_profile(model, data["forget-text"], root / "f.safetensors", ProfileOptions(split="forget")).path
    accessor = run_accessor(forget, retain, root / "a.safetensors", AccessorOptions()).path
    return {"retain": retain, "forget": forget, "accessor": accessor, "model": checkpoints["qwen2"]}


# --- gamma -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", ["1e39", "inf", "nan", "-1"])
def test_a_gamma_beyond_float32_is_a_usage_error(stages: dict[str, Path], tmp_path: Path, gamma: str) -> None:
    result = invoke("apply", "--model", stages["model"], "--accessor", stages["accessor"], "--gamma", gamma,
                    "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith("Error: --gamma must be"), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_gamma_inf_in_kvw_toml_is_refused(stages: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "kvw.toml"
    config.write_text(f'model = "{stages["model"]}"\ngamma = inf\n')
    result = invoke("apply", "--config", config, "--accessor", stages["accessor"], "--out", tmp_path / "out")
    assert result.exit_code == 1 and "gamma must be a finite number, got inf" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gamma_times_exposure_must_stay_a_finite_float32(stages: dict[str, Path], tmp_path: Path) -> None:
    vectors = read_stage_file(stages["accessor"])[0]["layers.1.exposure"].numel()
    accessor = hand_made(stages["accessor"], tmp_path / "a.safetensors", layers_1_exposure=torch.full((vectors,), 10.0))
    result = invoke("apply", "--model", stages["model"], "--accessor", accessor, "--gamma", "1e38",
                    "--layers", "1", "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Error: --gamma 1e+38 times the largest exposure of layer 1 (10) is 1e+39" in result.stderr
    assert not (tmp_path / "out").exists()
    # Only the edited layers count: layer 0's exposures are small enough.
    check_gamma(1e38, [torch.ones(3), torch.full((3,), 10.0)], [0])
    with pytest.raises(UsageError, match="beyond the largest float32"):
        check_gamma(FLOAT32_MAX, [torch.full((3,), 1.5)], [0])


# --- stage files -----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def bad_profiles(stages: dict[str, Path], root: Path) -> list[tuple[str, Path, str]]:
    """(which profile, hand-made file, expected message) for each kind of bad profile."""
    retain, forget = stages["retain"], stages["forget"]
    retain_sum = read_stage_file(retain)[0]["layers.0.sum"]
    forget_sum = read_stage_file(forget)[0]["layers.2.sum"]
    nan_sum = retain_sum.clone()
    nan_sum[3] = NAN
    inf_sum = forget_sum.clone()
    inf_sum[1, 0] = INF
    samples, vectors = forget_sum.shape
    return [
        ("retain", hand_made(retain, root / "r-nan.st", layers_0_sum=nan_sum),
         "tensor layers.0.sum has 1 non-finite value (NaN or infinity)"),
        ("forget", hand_made(forget, root / "f-inf.st", layers_2_sum=inf_sum),
         "tensor layers.2.sum has 1 non-finite value"),
        ("retain", hand_made(retain, root / "r-neg.st", layers_0_sum=-retain_sum),
         "tensor layers.0.sum has negative values"),
        ("retain", hand_made(retain, root / "r-zero.st", count=torch.tensor(0)),
         "tensor count is not positive: every sample needs at least one profiled position"),
        ("forget", hand_made(forget, root / "f-zero.st", count=torch.tensor([4, 0, 3, -1, *[2] * (samples - 4)])),
         "tensor count is not positive for samples [1, 3]"),
        ("forget", hand_made(forget, root / "f-rows.st", layers_1_sum=forget_sum[:-1]),
         f"tensor layers.1.sum has shape [{samples - 1}, {vectors}]; expected ({samples}, n)"),
        ("retain", hand_made(retain, root / "r-dtype.st", layers_0_sum=retain_sum.float()),
         "tensor layers.0.sum is float32; expected float64"),
        ("retain", hand_made(retain, root / "r-layers.st", metadata={"num_layers": "many"}),
         "metadata num_layers is 'many'; expected a positive integer"),
        ("retain", hand_made(retain, root / "r-split.st", metadata={"split": "both"}),
         "metadata split is 'both'; expected retain or forget"),
    ]  # fmt: skip


def test_every_bad_profile_is_refused_when_read(stages: dict[str, Path], tmp_path: Path) -> None:
    for which, path, message in bad_profiles(stages, tmp_path):
        pair = {"retain": stages["retain"], "forget": stages["forget"], which: path}
        out = tmp_path / "a.safetensors"
        result = invoke("accessor", "--forget", pair["forget"], "--retain", pair["retain"], "--out", out)
        assert result.exit_code == 1, (path, result.output)
        assert error_line(result).startswith(f"Error: {path}: {message}"), result.stderr
        assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(("value", "message"), [(NAN, "non-finite"), (INF, "non-finite"), (-0.5, "negative values")])
def test_a_bad_accessor_is_refused_by_apply(
    stages: dict[str, Path], tmp_path: Path, value: float, message: str
) -> None:
    exposure = read_stage_file(stages["accessor"])[0]["layers.3.exposure"].clone()
    exposure[7] = value
    accessor = hand_made(stages["accessor"], tmp_path / "a.safetensors", layers_3_exposure=exposure)
    result = invoke("apply", "--model", stages["model"], "--accessor", accessor, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(f"Error: {accessor}: tensor layers.3.exposure has"), result.stderr
    assert message in result.stderr and not (tmp_path / "out").exists()


def test_progressive_refuses_nan_retain_sums_at_read(
    stages: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    sums = read_stage_file(stages["retain"])[0]["layers.2.sum"].clone()
    sums[:3] = NAN
    retain = hand_made(stages["retain"], tmp_path / "r.safetensors", layers_2_sum=sums)
    out = tmp_path / "out"
    result = invoke("apply", "--model", stages["model"], "--progressive", "--forget-data", data["forget-text"],
                    "--retain", retain, "--out", out)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(f"Error: {retain}: tensor layers.2.sum has 3 non-finite values"), result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["r.safetensors"]  # no checkpoint, no exposure file


def test_profile_of_a_broken_model_is_not_written(
    stages: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = poisoned_checkpoint(stages["model"], tmp_path / "nan-model", layer=1, value=NAN)
    out = tmp_path / "r.safetensors"
    result = invoke("profile", "--model", model, "--data", data["retain-text"], "--split", "retain", "--out", out)
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(f"Error: refusing to write {out}: tensor layers.2.sum has"), result.stderr
    assert not out.exists()


# --- the checkpoint writer -------------------------------------------------------------------


def test_a_non_finite_edited_weight_is_never_written(stages: dict[str, Path], tmp_path: Path) -> None:
    model = poisoned_checkpoint(stages["model"], tmp_path / "inf-model", layer=2, value=INF)
    checkpoint = open_checkpoint(resolve_model(str(model)))
    # An accessor that fits the broken model (its fingerprint), exposure 0: the gates are 1.
    accessor = hand_made(
        stages["accessor"], tmp_path / "a.safetensors", metadata={"model_fingerprint": checkpoint.fingerprint()}
    )
    out = tmp_path / "out"
    result = invoke("apply", "--model", model, "--accessor", accessor, "--layers", "1:3", "--out", out)
    assert result.exit_code == 1, result.output
    name = checkpoint.down_projections[2].name
    assert f"Error: refusing to write {out}: the edited weight {name} in " in result.stderr
    assert "has non-finite values (the input weight already has them)" in result.stderr
    assert not out.exists() and [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
    # A layer that is not edited is copied as it is.
    assert invoke("apply", "--model", model, "--accessor", accessor, "--layers", "0:1", "--out", out).exit_code == 0


def test_the_writer_refuses_gates_that_overflow(stages: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = open_checkpoint(resolve_model(str(stages["model"])))
    exposures = [torch.full((checkpoint.num_vectors(layer),), 4.0) for layer in range(checkpoint.num_layers)]
    with pytest.raises(UsageError, match="times the largest exposure of layer 0"):
        write_weakened_checkpoint(
            checkpoint, exposures, gamma=1e38, layers=[0], out=tmp_path / "out", force=False,
            device=torch.device("cpu"), input_fingerprint="x", provenance={"mode": "test"}, tracker=NullTracker(),
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# --- eval ------------------------------------------------------------------------------------


def test_eval_flags_non_finite_metrics_and_fails_requirements(
    stages: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    model = poisoned_checkpoint(stages["model"], tmp_path / "nan-model", layer=0, value=NAN)
    out = tmp_path / "eval.json"
    requirements = ["forget.keyword_acc <= 0.1", "forget.answer_logprob <= 0", "forget.rougeL_f1 < 2"]
    result = invoke("eval", "--model", model, "--data", f"forget={data['forget-text']}", "--out", out,
                    "--max-new-tokens", "2", *[arg for text in requirements for arg in ("--require", text)])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert (
        "Warning: non-finite (NaN or infinite) metrics, recorded as null: model.forget.answer_logprob" in result.stderr
    )
    assert "Error: 3 requirements failed: forget.keyword_acc <= 0.1 failed: the model has non-finite" in result.stderr
    assert "non-finite" in result.stderr.split("forget.answer_logprob")[1]  # the table's cell
    report = strict_json(out.read_text())
    assert report["non_finite"] == ["model.forget.answer_logprob"]
    samples = len(data["forget-text"].read_text().splitlines())
    assert report["results"]["model"]["forget"]["answer_logprob"] == {"mean": None, "count": samples}
    assert [outcome["passed"] for outcome in report["requirements"]] == [False, False, False]
    assert all(outcome["value"] is None for outcome in report["requirements"])
    records = [strict_json(line) for line in (tmp_path / "eval.samples.jsonl").read_text().splitlines()]
    assert all(r["answer_logprob"] is None and r["non_finite"] == ["answer_logprob"] for r in records)


def test_requirements_on_non_finite_values_never_pass() -> None:
    nan = summarize([0.5, math.nan])
    assert nan == MetricSummary(mean=None, count=2, non_finite=1)
    assert summarize([-math.inf]).non_finite == 1 and summarize([0.25, None]).non_finite == 0
    broken = {"forget": {"keyword_acc": summarize([0.0]), "answer_logprob": nan}}
    healthy = {"forget": {"keyword_acc": summarize([0.0]), "answer_logprob": summarize([-1.0])}}
    for operator in (">=", "<=", ">", "<"):
        for text in (f"forget.keyword_acc {operator} 0.5", f"forget.answer_logprob {operator} 0"):
            (outcome,) = check_requirements([parse_requirement(text)], {"model": broken})
            assert not outcome.passed and outcome.value is None
            assert outcome.to_json()["value"] is None
        # The compared model is broken: the threshold is not finite, the requirement fails.
        text = f"forget.keyword_acc {operator} baseline"
        (outcome,) = check_requirements([parse_requirement(text)], {"model": healthy, "baseline": broken})
        assert not outcome.passed and outcome.threshold is None
        assert "the baseline has non-finite (NaN or infinite) results on forget" in outcome.describe()
    large = {"forget": {"keyword_acc": summarize([0.0]), "answer_logprob": summarize([-5.0])}}
    (huge,) = check_requirements(
        [parse_requirement("forget.answer_logprob > 1e308*baseline")], {"model": healthy, "baseline": large}
    )
    assert not huge.passed and huge.threshold is None  # 1e308 * -5 overflows to -inf: not a threshold
    with pytest.raises(UsageError, match="a number is too large"):
        parse_requirement("forget.keyword_acc <= 1e400")


# --- JSON ------------------------------------------------------------------------------------


def test_json_files_never_hold_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json_atomically(tmp_path / "x.json", {"value": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_apply_json_summary_is_strict_json(stages: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("apply", "--model", stages["model"], "--accessor", stages["accessor"], "--out", tmp_path / "out",
                    "--json", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert strict_json(result.stdout)["manifest"]["gamma"] == ApplyOptions().gamma
    strict_json((tmp_path / "out" / "kvw_manifest.json").read_text())
