"""eval on tiny models: batched generation, teacher-forced scores, the report, requirements, errors.

The metrics by hand are in test_metrics.py, the requirement grammar and checks in test_requirements.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonlines
import pytest
import torch
import transformers
from helpers import copy_checkpoint, expect_error, invoke
from typer.testing import CliRunner, Result

from kvwctl.checkpoint import open_checkpoint
from kvwctl.cli import app
from kvwctl.conversation import ChatRenderer
from kvwctl.data import Sample, load_image, load_samples
from kvwctl.evaluate import default_samples_path, generate_answers, run_eval
from kvwctl.files import file_sha256
from kvwctl.metrics import METRICS, keyword_accuracy, rouge_l, summarize
from kvwctl.modeling import LoadedModel, encode_prompts, load_model
from kvwctl.options import EvalOptions
from kvwctl.progress import NullTracker
from kvwctl.report import EVAL_FORMAT
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.testing import build_checkpoint

runner = CliRunner()


def test_default_samples_path() -> None:
    assert default_samples_path(Path("run/eval.json")) == Path("run/eval.samples.jsonl")
    assert default_samples_path(Path("report")) == Path("report.samples.jsonl")


# --- generation and scores on tiny models --------------------------------------------------------

TEXT_SAMPLES: list[dict[str, Any]] = [
    {"id": "t0", "question": "Where was Mira Okafor born?", "answer": "Lagos", "keywords": ["Lagos"],
     "options": ["Seville", "Lagos", "Busan"]},
    {"id": "t1", "question": "Who is Tomas Ruiz? Where was he born, and in which year was he born?",
     "answer": "Tomas Ruiz was born in Seville.", "keywords": ["Seville", "Tomas Ruiz"],
     "options": ["Tomas Ruiz was born in Seville.", "Paris"]},
    {"id": "t2", "question": "Is water wet?", "answer": "The answer is yes."},
    {"id": "t3", "question": "What is the capital of France? Answer with the name of the city only, please.",
     "answer": "Paris", "options": ["Lima", "Oslo", "Paris", "Accra"]},
    {"id": "t4", "question": "Who is Lena Park?", "answer": "Lena Park was born in Busan.", "keywords": ["Busan"]},
]  # fmt: skip


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    return {
        "qa": write_jsonl(root / "qa.jsonl", TEXT_SAMPLES[:3]),
        "facts": write_jsonl(root / "facts.jsonl", TEXT_SAMPLES[3:]),
        "all": write_jsonl(root / "all.jsonl", TEXT_SAMPLES),
    }


@pytest.fixture(scope="module")
def other_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny Qwen2 (same tokenizer, other random weights): a stand-in for an unlearned model."""
    return build_checkpoint("qwen2", tmp_path_factory.mktemp("other") / "qwen2", seed=1)


def load(checkpoint: Path) -> LoadedModel:
    return load_model(open_checkpoint(resolve_model(str(checkpoint))), device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize(("model_type", "split"), [("llava", "forget"), ("qwen2_vl", "forget"), ("llama", "all")])
def test_batched_left_padded_generation_equals_one_at_a_time(
    model_type: str, split: str, checkpoints: dict[str, Path], data: dict[str, Path], eval_data: dict[str, Path]
) -> None:
    samples = load_samples(data[split] if split in data else eval_data[split])
    loaded = load(checkpoints[model_type])
    tracker = NullTracker()
    one = generate_answers(loaded, samples, batch_size=1, max_new_tokens=5, tracker=tracker, description="generate")
    four = generate_answers(loaded, samples, batch_size=4, max_new_tokens=5, tracker=tracker, description="generate")
    assert one == four
    assert all(one) and len(set(one)) > 1  # real, differing generations, not empty strings
    lengths = {
        encode_prompts(loaded, [loaded.renderer.render_prompt(sample)])["input_ids"].shape[1] for sample in samples
    }
    assert len(lengths) > 1  # the prompts (images expanded) differ in length: batches of 4 are padded


def independent_answer_logprob(
    model: Any, processor: Any, tokenizer: Any, renderer: ChatRenderer, sample: Sample
) -> float:
    """Mean log p(answer token) from one unpadded forward pass over the ChatML conversation.

    ChatML renders ``…<|im_start|>assistant\\n{answer}<|im_end|>\\n``: the answer tokens are the
    tokens after the tokenized prompt, minus the two closing tokens.
    """
    prompt = renderer.prompt_text(sample)
    conversation = renderer.render(sample).text
    images = [load_image(path) for path in sample.images] or None
    prompt_ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0]
    inputs = processor(text=[conversation], images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)
    assert tokenizer.decode(ids[-2:]) == "<|im_end|>\n"
    answer_positions = range(len(prompt_ids), len(ids) - 2)
    assert tokenizer.decode(ids[answer_positions.start : answer_positions.stop]) == sample.answer
    with torch.inference_mode():
        logits = model(**inputs).logits[0].double()  # (sequence, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[position - 1, ids[position]].item() for position in answer_positions) / len(answer_positions)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_vl"])
def test_answer_logprob_matches_a_plain_forward_pass(
    model_type: str, checkpoints: dict[str, Path], data: dict[str, Path], eval_data: dict[str, Path], tmp_path: Path
) -> None:
    split = eval_data["all"] if model_type == "qwen2" else data["forget"]
    result = run_eval(
        {"model": _spec(checkpoints[model_type])},
        {"s": split},
        tmp_path / "e.json",
        EvalOptions(max_new_tokens=1, batch_size=3),
    )
    assert json.loads(result.path.read_text()) == result.report.to_json()  # the typed report is the file
    recorded = {record["id"]: record for record in jsonlines.open(result.samples_path)}
    assert result.report.results["model"]["s"]["answer_logprob"].count == len(recorded)
    path = checkpoints[model_type]
    if model_type == "qwen2":
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        processor = tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    else:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path)
        processor = transformers.AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
    renderer = load(path).renderer
    for sample in load_samples(split):
        expected = independent_answer_logprob(model, processor, tokenizer, renderer, sample)
        assert recorded[sample.id]["answer_logprob"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        if sample.options:  # every option scored the same way; the pick is the best (first on ties)
            scores = [
                independent_answer_logprob(model, processor, tokenizer, renderer, replace(sample, answer=option))
                for option in sample.options
            ]
            assert recorded[sample.id]["mc_choice"] == sample.options[scores.index(max(scores))]
            assert recorded[sample.id]["mc_acc"] == float(recorded[sample.id]["mc_choice"] == sample.answer)
        else:
            assert recorded[sample.id]["mc_acc"] is None and recorded[sample.id]["mc_choice"] is None


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(str(path))


# --- the command: report, per-sample file, table, requirements, errors ---------------------------


@pytest.fixture(scope="module")
def reference_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("qwen2", tmp_path_factory.mktemp("reference") / "qwen2", seed=2)


PASSING_REQUIREMENTS = [
    "qa.keyword_acc <= 1",
    "facts.answer_logprob >= 2*baseline",
    "qa.rougeL_recall <= reference + 1",
    "facts.mc_acc >= 0",
]


def eval_args(
    checkpoints: dict[str, Path], other_qwen2: Path, reference_qwen2: Path, eval_data: dict[str, Path], out: Path
) -> list[str | Path]:
    args: list[str | Path] = [
        "eval", "--model", other_qwen2, "--baseline", checkpoints["qwen2"], "--reference", reference_qwen2,
        "--data", f"qa={eval_data['qa']}", "--data", f"facts={eval_data['facts']}",
        "--max-new-tokens", "3", "--batch-size", "2", "--out", out,
    ]  # fmt: skip
    for requirement in PASSING_REQUIREMENTS:
        args += ["--require", requirement]
    return args


@pytest.fixture(scope="module")
def report_run(
    checkpoints: dict[str, Path],
    other_qwen2: Path,
    reference_qwen2: Path,
    eval_data: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("eval-run") / "first" / "eval.json"
    args = eval_args(checkpoints, other_qwen2, reference_qwen2, eval_data, out)
    result = runner.invoke(app, [str(arg) for arg in [*args, "--json"]], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result, out


def test_report_schema(
    report_run: tuple[Result, Path],
    checkpoints: dict[str, Path],
    other_qwen2: Path,
    reference_qwen2: Path,
    eval_data: dict[str, Path],
) -> None:
    result, out = report_run
    report = json.loads(out.read_text())
    assert list(report) == [
        "format", "tool_version", "models", "data", "settings", "metrics", "results", "non_finite", "requirements",
        "samples_sha256",
    ]  # fmt: skip
    assert report["format"] == EVAL_FORMAT
    for role, path in (("model", other_qwen2), ("baseline", checkpoints["qwen2"]), ("reference", reference_qwen2)):
        described = report["models"][role]
        assert described["reference"] == str(path)
        assert described["revision"] is None  # a local directory
        assert described["fingerprint"] == open_checkpoint(resolve_model(str(path))).fingerprint()
        assert (described["model_type"], described["dtype"]) == ("qwen2", "float32")
    assert len({report["models"][role]["fingerprint"] for role in ("model", "baseline", "reference")}) == 3
    assert report["data"] == {
        "qa": {"path": str(eval_data["qa"]), "sha256": file_sha256(eval_data["qa"]), "samples": 3, "with_options": 2},
        "facts": {"path": str(eval_data["facts"]), "sha256": file_sha256(eval_data["facts"]), "samples": 2,
                  "with_options": 1},
    }  # fmt: skip
    settings = report["settings"]
    assert (settings["max_new_tokens"], settings["batch_size"], settings["dtype"], settings["device"]) == (
        3, 2, "auto", "cpu",
    )  # fmt: skip
    assert report["metrics"] == list(METRICS)
    assert list(report["results"]) == ["model", "baseline", "reference"]
    for role_results in report["results"].values():
        assert list(role_results) == ["qa", "facts"]
        assert list(role_results["qa"]) == list(METRICS)
        assert role_results["qa"]["keyword_acc"]["count"] == 3
        assert role_results["qa"]["mc_acc"]["count"] == 2 and role_results["facts"]["mc_acc"]["count"] == 1
        assert -20 < role_results["facts"]["answer_logprob"]["mean"] < 0
    assert report["format"] == "kvwctl.eval/2"
    assert [list(outcome) for outcome in report["requirements"]] == [
        ["requirement", "value", "threshold", "passed"]
    ] * 4
    assert [outcome["requirement"] for outcome in report["requirements"]] == PASSING_REQUIREMENTS
    assert all(outcome["passed"] for outcome in report["requirements"])
    assert report["samples_sha256"] == file_sha256(out.parent / "eval.samples.jsonl")
    summary = json.loads(result.stdout)  # --json: the report, its path and the per-sample file
    assert summary["path"] == str(out) and summary["samples"] == str(out.parent / "eval.samples.jsonl")
    assert summary["results"] == report["results"]


def test_samples_file(report_run: tuple[Result, Path]) -> None:
    _, out = report_run
    report = json.loads(out.read_text())
    records = list(jsonlines.open(out.parent / "eval.samples.jsonl"))
    assert len(records) == 3 * 5
    assert [(record["role"], record["split"], record["id"]) for record in records[:6]] == [
        ("model", "qa", "t0"), ("model", "qa", "t1"), ("model", "qa", "t2"),
        ("model", "facts", "t3"), ("model", "facts", "t4"), ("baseline", "qa", "t0"),
    ]  # fmt: skip
    assert list(records[0]) == [
        "role", "split", "id", "question", "answer", "generation", *METRICS, "mc_choice", "non_finite",
    ]  # fmt: skip
    by_id = {sample["id"]: sample for sample in TEXT_SAMPLES}
    for record in records:
        sample = by_id[record["id"]]
        assert (record["question"], record["answer"]) == (sample["question"], sample["answer"])
        recall, f1 = rouge_l(sample["answer"], record["generation"])
        assert (record["rougeL_recall"], record["rougeL_f1"]) == (recall, f1)
        keywords = sample.get("keywords") or [sample["answer"]]
        assert record["keyword_acc"] == keyword_accuracy(keywords, record["generation"])
        if "options" in sample:
            assert record["mc_choice"] in sample["options"]
            assert record["mc_acc"] == float(record["mc_choice"] == sample["answer"])
        else:
            assert record["mc_acc"] is None and record["mc_choice"] is None
    for role, splits in report["results"].items():
        for split, metrics in splits.items():
            for metric, summary in metrics.items():
                values = [r[metric] for r in records if r["role"] == role and r["split"] == split]
                assert summary == summarize(values).to_json()


def test_report_is_byte_identical_across_runs(
    report_run: tuple[Result, Path],
    checkpoints: dict[str, Path],
    other_qwen2: Path,
    reference_qwen2: Path,
    eval_data: dict[str, Path],
    tmp_path: Path,
) -> None:
    _, first = report_run
    second = tmp_path / "second" / "eval.json"
    result = invoke(*eval_args(checkpoints, other_qwen2, reference_qwen2, eval_data, second))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(second)
    assert second.read_bytes() == first.read_bytes()
    assert (tmp_path / "second" / "eval.samples.jsonl").read_bytes() == (
        first.parent / "eval.samples.jsonl"
    ).read_bytes()
    again = invoke(*eval_args(checkpoints, other_qwen2, reference_qwen2, eval_data, second))
    expect_error(again, "already exists")


def test_table_shows_every_model_and_the_ratio_to_the_baseline(report_run: tuple[Result, Path]) -> None:
    result, out = report_run  # on an 80-column console
    results = json.loads(out.read_text())["results"]
    lines = result.stderr.splitlines()
    assert next(line for line in lines if "split.metric" in line).split() == [
        "split.metric", "n", "model", "baseline", "reference", "model/base", "ref/base",
    ]  # fmt: skip
    row = next(line for line in lines if "facts.answer_logprob" in line)
    model, baseline, reference = (results[role]["facts"]["answer_logprob"]["mean"] for role in results)
    assert row.split() == [
        "facts.answer_logprob", "2", f"{model:.4f}", f"{baseline:.4f}", f"{reference:.4f}",
        f"{model / baseline:.3f}", f"{reference / baseline:.3f}",
    ]  # fmt: skip
    assert next(line for line in lines if "facts.mc_acc" in line).split()[1] == "1"
    assert "requirement qa.keyword_acc <= 1 passed" in result.stderr


def test_failing_requirement_exits_1_after_writing_the_report(
    checkpoints: dict[str, Path], other_qwen2: Path, eval_data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    result = invoke(
        "eval", "--model", other_qwen2, "--baseline", checkpoints["qwen2"], "--data", f"qa={eval_data['qa']}",
        "--max-new-tokens", "1", "--out", out,
        "--require", "qa.answer_logprob >= 0.5*baseline", "--require", "qa.keyword_acc <= 1",
        "--require", "qa.rougeL_f1 > 2",
    )  # fmt: skip
    report = json.loads(out.read_text())
    failed, passed, impossible = report["requirements"]
    assert (failed["passed"], passed["passed"], impossible["passed"]) == (False, True, False)
    logprob = report["results"]["model"]["qa"]["answer_logprob"]["mean"]
    threshold = 0.5 * report["results"]["baseline"]["qa"]["answer_logprob"]["mean"]
    assert (failed["value"], failed["threshold"]) == (logprob, threshold)
    expect_error(result, "2 requirements failed: ")
    message = " ".join(result.stderr.split())
    assert f"qa.answer_logprob >= 0.5*baseline failed: {logprob:.6g} < {threshold:.6g}" in message
    assert f"qa.rougeL_f1 > 2 failed: {report['results']['model']['qa']['rougeL_f1']['mean']:.6g} <= 2" in message
    assert "qa.keyword_acc <= 1 failed" not in message
    assert (tmp_path / "eval.samples.jsonl").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--require", "qa.keyword_acc => 0.1"], "invalid --require 'qa.keyword_acc => 0.1'"),
        (["--require", "qa.accuracy <= 0.1"], "unknown metric 'accuracy'"),
        (["--require", "forget.keyword_acc <= 0.1"], "split 'forget' is not evaluated"),
        (["--require", "qa.keyword_acc >= 0.9*baseline"], "compares with the baseline, but no --baseline was given"),
        (["--require", "qa.keyword_acc <= reference"], "no --reference was given"),
        (["--data", "retain"], "invalid --data 'retain'"),
        (["--data", "qa=other.jsonl"], "names the split 'qa' twice"),
        (["--data", "q.a=other.jsonl"], "invalid split name 'q.a'"),
    ],
)
def test_usage_errors_come_before_any_model_work(
    extra: list[str], message: str, eval_data: dict[str, Path], tmp_path: Path
) -> None:
    missing_model = tmp_path / "no" / "such" / "model"  # loading it would fail with exit 1
    result = invoke("eval", "--model", missing_model, "--data", f"qa={eval_data['qa']}", *extra)
    expect_error(result, message, exit_code=2)


def test_requirement_on_a_metric_without_values(data: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(
        "eval", "--model", tmp_path / "missing", "--data", f"retain={data['retain-text']}",
        "--require", "retain.mc_acc >= 0.5", "--out", tmp_path / "e.json",
    )  # fmt: skip
    expect_error(result, "no sample of retain has options, so mc_acc has no value")
    assert not (tmp_path / "e.json").exists()


def test_answer_not_among_options_names_file_and_line(tmp_path: Path) -> None:
    samples = write_jsonl(
        tmp_path / "s.jsonl",
        [TEXT_SAMPLES[0], {"question": "Q?", "answer": "Lagos", "options": ["lagos", "Lima"]},
         {"question": "Q?", "answer": "Lima", "keywords": ["the"]}],
    )  # fmt: skip
    result = invoke("eval", "--model", tmp_path / "missing", "--data", f"s={samples}", "--out", tmp_path / "e.json")
    expect_error(result, f"{samples}:2: options: the answer 'Lagos' is not one of the options")
    assert f"{samples}:3: keywords: 'the' has no words once normalised" in result.stderr
    assert not (tmp_path / "e.json").exists()


def test_defaults_from_kvw_toml_evaluate_apply_output_against_the_model(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kvw.toml").write_text(
        f'model = "{checkpoints["llava"]}"\nworkdir = "run"\nmax_new_tokens = 2\nbatch_size = 3\n\n[splits]\n'
        f'retain = "{data["retain"]}"\nforget = "{data["forget"]}"\n'
    )
    monkeypatch.chdir(tmp_path)
    expect_error(invoke("eval"), "missing --model", exit_code=2)  # apply has not written run/unlearned yet
    copy_checkpoint(checkpoints["llava"], tmp_path / "run" / "unlearned")
    result = invoke("eval")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "run" / "eval.json")
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["models"]["model"]["reference"] == str(tmp_path / "run" / "unlearned")
    assert report["models"]["baseline"]["reference"] == str(checkpoints["llava"])
    assert list(report["data"]) == ["retain", "forget"]  # kvw.toml order
    assert (report["settings"]["max_new_tokens"], report["settings"]["batch_size"]) == (2, 3)
    # The same weights: the same numbers for both roles.
    assert report["results"]["model"] == report["results"]["baseline"]
    assert (tmp_path / "run" / "eval.samples.jsonl").is_file()


def test_text_only_model_refuses_image_samples(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    result = invoke(
        "eval", "--model", checkpoints["qwen2"], "--data", f"forget={data['forget']}", "--out", tmp_path / "e"
    )
    expect_error(result, "the model is text-only and cannot take images")
    assert not (tmp_path / "e").exists()
