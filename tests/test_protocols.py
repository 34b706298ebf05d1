"""``eval --protocol mllmu|clear|tofu``: the benchmarks' own scoring, checked against hand computation.

The scoring rules are checked on hand-written generations; the protocols end to end on tiny
models (kvwctl.testing), against generations and scores recomputed here from the prompts the
benchmarks' scripts write; the KS test against values known in closed form and a brute-force
enumeration of every arrangement.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import expect_error, invoke

from kvwctl.checkpoint import open_checkpoint
from kvwctl.data import Sample, load_samples
from kvwctl.evaluate import generate_answers, score_conversations
from kvwctl.metrics import rouge_l
from kvwctl.modeling import load_model
from kvwctl.progress import NullTracker
from kvwctl.protocols import generated, tofu
from kvwctl.protocols.kstest import exact_pvalue, kolmogorov_sf, ks_2samp, ks_statistic
from kvwctl.source import resolve_model
from kvwctl.testing import build_checkpoint, make_image

# --- the KS test ---------------------------------------------------------------------------------


def test_ks_closed_form_values() -> None:
    # Fully separated samples: D = 1 and only the 2 extreme arrangements of C(n1+n2, n1) reach it.
    assert ks_2samp([1.0, 2.0], [3.0, 4.0]).pvalue == pytest.approx(2 / 6, abs=1e-15)
    assert ks_2samp([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]).pvalue == pytest.approx(2 / 20, abs=1e-15)
    assert ks_2samp([1.0, 2.0, 3.0], [4.0, 5.0]).pvalue == pytest.approx(2 / 10, abs=1e-15)
    assert ks_2samp([1.0, 2.0], [1.0, 2.0]) == ks_2samp([2.0, 1.0], [1.0, 2.0])
    assert ks_2samp([1.0, 2.0], [1.0, 2.0]).pvalue == 1.0 and ks_statistic([1.0, 2.0], [1.0, 2.0]) == 0.0
    # Kolmogorov's distribution: Q(1.3581) = 0.05, Q(1.6276) = 0.01 (the classic critical values).
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=1e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert kolmogorov_sf(0.5) == pytest.approx(0.9639, abs=1e-4)


@pytest.mark.parametrize(("n1", "n2"), [(3, 3), (4, 3), (5, 2), (4, 6)])
def test_ks_exact_pvalue_equals_brute_force_enumeration(n1: int, n2: int) -> None:
    """P(D >= d) by listing every way to split the pooled ranks into the two samples."""
    values = list(range(n1 + n2))
    arrangements = list(itertools.combinations(values, n1))
    statistics = []
    for chosen in arrangements:
        first = [float(v) for v in chosen]
        second = [float(v) for v in values if v not in chosen]
        statistics.append(ks_statistic(first, second))
    for observed in sorted(set(statistics)):
        expected = sum(1 for d in statistics if d >= observed - 1e-12) / len(arrangements)
        assert exact_pvalue(n1, n2, observed) == pytest.approx(expected, abs=1e-12), (n1, n2, observed)


def test_ks_large_samples_use_the_kolmogorov_limit() -> None:
    first = [index / 10001 for index in range(10001)]
    second = [value + 0.01 for value in first]
    result = ks_2samp(first, second)
    assert result.method == "asymptotic"
    assert result.pvalue == pytest.approx(kolmogorov_sf(math.sqrt(10001 / 2) * result.statistic))


# --- the scoring rules on hand-written generations -----------------------------------------------


def mc_sample(**extra: Any) -> Sample:
    return Sample(
        id="m",
        question="What does this person do?",
        answer="Baker",
        options=("Painter", "Baker", "Pilot", "Nurse"),
        extra={"option_letters": ["A", "B", "C", "D"], "correct_letter": "B", **extra},
    )


def test_mllmu_rules() -> None:
    sample = mc_sample(task="mc_image")
    assert generated.mllmu_prompt(sample, "mc_image") == (
        "What does this person do?\nA: Painter\nB: Baker\nC: Pilot\nD: Nurse\n"
        "Just give ONE letter representing the answer directly."
    )
    assert generated.mllmu_score(sample, "mc_image", " b) Baker") == ("mllmu.mc_image_acc", 1.0)
    assert generated.mllmu_score(sample, "mc_text", "C is right") == ("mllmu.mc_text_acc", 0.0)
    assert generated.mllmu_score(sample, "mc_text", "Pilot") == ("mllmu.mc_text_acc", 0.0)  # 'P' is no letter
    assert generated.mllmu_score(sample, "mc_text", "Baker") == ("mllmu.mc_text_acc", 1.0)  # 'B': the rule, as written
    fill = Sample(id="f", question="Born in __.", answer="Town 1")
    assert generated.mllmu_prompt(fill, "fill_text") == (
        "Born in [Blank].\nPlease **ONLY** provide the correct answer that should replace the [Blank]."
    )
    assert generated.mllmu_score(fill, "fill_text", "It was town 1, I think") == ("mllmu.fill_text_acc", 1.0)
    assert generated.mllmu_score(fill, "fill_image", "town") == ("mllmu.fill_image_acc", 0.0)
    gen = Sample(id="g", question="Where?", answer="In the town of Lagos.")
    assert generated.mllmu_prompt(gen, "gen_image").endswith("in one sentence accurately in ENGLISH.")
    assert generated.mllmu_prompt(gen, "gen_text") == (
        "Where?\nAnswer the question based on your trained knowledge in one sentence in ENGLISH."
    )
    metric, value = generated.mllmu_score(gen, "gen_text", " Lagos town. ")
    assert metric == "mllmu.gen_text_rougeL" and value == rouge_l("In the town of Lagos.", "Lagos town.")[1]


def test_clear_rules() -> None:
    name = Sample(id="n", question="What is the name of the person in the image?", answer="Mira O'Kafor")
    assert generated.clear_prompt(name, "name") == name.question
    assert generated.clear_score(name, "name", "This is mira okafor.") == ("clear.name_vqa_acc", 1.0)
    assert generated.clear_score(name, "name", "Mira") == ("clear.name_vqa_acc", 0.0)
    sample = mc_sample(task="mc")
    assert (
        generated.clear_prompt(sample, "mc") == "What does this person do?\nA. Painter\nB. Baker\nC. Pilot\nD. Nurse\n"
    )
    assert generated.clear_score(sample, "mc", "(b)") == ("clear.mc_acc", 1.0)
    assert generated.clear_score(sample, "mc", "Baker") == ("clear.mc_acc", 1.0)  # 'B': CLEAR's rule, as written
    assert generated.clear_score(sample, "mc", "") == ("clear.mc_acc", 0.0)


def test_tofu_rules() -> None:
    # tr = exp(-mean wrong loss) / (exp(-correct loss) + 1e-10)
    assert tofu.truth_ratio(1.0, [2.0, 4.0]) == pytest.approx(math.exp(-3.0) / (math.exp(-1.0) + 1e-10))
    assert tofu.aggregated(0.5, forget=True) == 0.5 and tofu.aggregated(4.0, forget=True) == pytest.approx(0.25)
    assert tofu.aggregated(0.25, forget=False) == 0.75 and tofu.aggregated(2.0, forget=False) == 0.0
    sample = Sample(
        id="t", question="Q?", answer="A.", extra={"paraphrased_answer": "PA.", "benchmark_split": "forget01"}
    )
    assert tofu.correct_answer(sample) == "PA."
    assert (
        tofu.correct_answer(replace(sample, extra={**sample.extra, "benchmark_split": "world_facts_perturbed"})) == "A."
    )


# --- end to end on tiny models -------------------------------------------------------------------


NEW_TOKENS = 4  # the protocols' 50 generated tokens, cut for the tests' speed


@pytest.fixture(autouse=True)
def few_new_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generated, "MAX_NEW_TOKENS", NEW_TOKENS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaVA (multimodal; text-only samples too) and, built on first use, its oracle."""
    root = tmp_path_factory.mktemp("protocol-models")
    return {"llava": build_checkpoint("llava", root / "llava")}


@pytest.fixture(scope="module")
def oracle(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("llava", tmp_path_factory.mktemp("protocol-oracle") / "llava", seed=1)


def loaded_model(path: Path) -> Any:
    import torch

    return load_model(open_checkpoint(resolve_model(str(path), None)), device=torch.device("cpu"), dtype=torch.float32)


def generations(model: Any, samples: list[Sample]) -> list[str]:
    return generate_answers(
        model, samples, max_new_tokens=NEW_TOKENS, batch_size=2, tracker=NullTracker(), description="test"
    )


def run_eval(tmp_path: Path, *args: str | Path) -> dict[str, Any]:
    out = tmp_path / "eval.json"
    result = invoke("eval", *args, "--out", out, "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"protocol {args[args.index('--protocol') + 1]}" in result.stderr  # its own table
    report = json.loads(out.read_text())
    return dict(report["protocol"])


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.slow  # 50 s on a loaded 2-core machine
def test_clear_protocol_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", seed=1)
    make_image(tmp_path / "b.png", seed=2)
    question = "What is the name of the person in the image?"
    model = loaded_model(tiny["llava"])
    # The first person's name is a piece of what the model says about the image: found (1), the other not (0).
    said = generations(model, [Sample(id="x", question=question, answer="x", images=(tmp_path / "a.png",))])[0]
    name = generated.alphanumeric(said)[:3] or "zz"
    names = [f"{name}", "Qqxzv Wwy"]
    forget = [
        {"id": f"n{k}", "image": image, "question": question, "answer": names[k], "task": "name",
         "benchmark_split": "forget01_perturbed", "options": [names[k], "Other One"]}
        for k, image in enumerate(("a.png", "b.png"))
    ] + [{"id": "c0", "image": "a.png", "question": "Describe.", "answer": "A caption.", "task": "caption"}]  # fmt: skip
    faces = [
        {"id": "r0", "image": "b.png", "question": "Who is this?", "answer": "Ada", "options": ["Bob", "Ada", "Cy"],
         "option_letters": ["A", "B", "C"], "correct_letter": "B", "task": "mc"},
        {"id": "r1", "image": "a.png", "question": "Who is that?", "answer": "Dee", "options": ["Dee", "Eve"],
         "task": "mc"},
    ]  # fmt: skip
    forget_path = write_jsonl(tmp_path / "forget.jsonl", forget)
    faces_path = write_jsonl(tmp_path / "faces.jsonl", faces)
    section = run_eval(tmp_path, "--model", tiny["llava"], "--data", f"forget={forget_path}",
                       "--data", f"faces={faces_path}", "--protocol", "clear")  # fmt: skip
    assert section["name"] == "clear" and "CLEAR/eval.py" in section["source"]
    results = section["results"]["model"]
    expected_name = 1.0 if name else 0.0
    assert results["forget"]["clear.name_vqa_acc"] == {"mean": (expected_name + 0.0) / 2, "count": 2}
    assert results["forget"]["clear.mc_acc"] == {"mean": None, "count": 0}
    # real faces: the prompt CLEAR writes, the first alphanumeric character of the answer
    prompts = [
        "Who is this?\nA. Bob\nB. Ada\nC. Cy\n",
        "Who is that?\nA. Dee\nB. Eve\n",
    ]
    said_faces = generations(
        model,
        [
            Sample(id=f"r{k}", question=prompts[k], answer="x", images=(tmp_path / image,))
            for k, image in enumerate(("b.png", "a.png"))
        ],
    )
    hits = [
        float((generated.alphanumeric(text)[:1].upper() or None) == letter)
        for text, letter in zip(said_faces, ("B", "A"), strict=True)
    ]
    assert results["faces"]["clear.mc_acc"] == {"mean": sum(hits) / 2, "count": 2}


@pytest.mark.slow  # 25 s on a loaded 2-core machine
def test_mllmu_protocol_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    make_image(tmp_path / "p.png", seed=3)
    options = ["Painter", "Baker", "Pilot", "Nurse"]
    common = {"group": "p1", "benchmark": "mllmu"}
    records: list[dict[str, Any]] = [
        {"id": "qa", "image": "p.png", "question": "Job?", "answer": "Baker.", "task": "qa", **common},
        {"id": "mi", "image": "p.png", "question": "What does he do?", "answer": "Baker", "options": options,
         "option_letters": list("ABCD"), "correct_letter": "B", "task": "mc_image", **common},
        {"id": "mt", "image": "p.png", "question": "What does P1 do?", "answer": "Pilot", "options": options,
         "option_letters": list("ABCD"), "correct_letter": "C", "task": "mc_text", **common},
        {"id": "gi", "image": "p.png", "question": "Where was he born?", "answer": "In town one.", "task": "gen_image", **common},
        {"id": "gt", "image": "p.png", "question": "Where was P1 born?", "answer": "Town one.", "task": "gen_text",
         **common},  # a text task: asked without the image it has
        {"id": "fi", "image": "p.png", "question": "He was born in __.", "answer": "town", "task": "fill_image", **common},
        {"id": "ft", "question": "P1 works as a __.", "answer": "e", "task": "fill_text", **common},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "forget.jsonl", records)
    section = run_eval(tmp_path, "--model", tiny["llava"], "--data", f"forget={path}", "--protocol", "mllmu")
    results = section["results"]["model"]["forget"]
    assert section["settings"] == {"max_new_tokens": NEW_TOKENS, "decoding": "greedy", "shots": 0}
    model = loaded_model(tiny["llava"])
    image = (tmp_path / "p.png",)
    asked = [
        ("mllmu.mc_image_acc", "What does he do?\nA: Painter\nB: Baker\nC: Pilot\nD: Nurse\n"
         "Just give ONE letter representing the answer directly.", image),
        ("mllmu.mc_text_acc", "What does P1 do?\nA: Painter\nB: Baker\nC: Pilot\nD: Nurse\n"
         "Just give ONE letter representing the answer directly.", ()),
        ("mllmu.gen_image_rougeL", "Where was he born?\nAnswer the question based on your trained knowledge in "
         "one sentence accurately in ENGLISH.", image),
        ("mllmu.gen_text_rougeL", "Where was P1 born?\nAnswer the question based on your trained knowledge in "
         "one sentence in ENGLISH.", ()),
        ("mllmu.fill_image_acc", "He was born in [Blank].\nPlease **ONLY** provide the correct answer that should "
         "replace the [Blank].", image),
        ("mllmu.fill_text_acc", "P1 works as a [Blank].\nPlease **ONLY** provide the correct answer that should "
         "replace the [Blank].", ()),
    ]  # fmt: skip
    texts = generations(model, [Sample(id=m, question=q, answer="x", images=i) for m, q, i in asked])
    first = [text.strip()[:1].upper() for text in texts]
    expected = {
        "mllmu.mc_image_acc": float(first[0] == "B"),
        "mllmu.mc_text_acc": float(first[1] == "C"),
        "mllmu.gen_image_rougeL": rouge_l("In town one.", texts[2].strip())[1],
        "mllmu.gen_text_rougeL": rouge_l("Town one.", texts[3].strip())[1],
        "mllmu.fill_image_acc": float("town" in texts[4].lower()),
        "mllmu.fill_text_acc": float("e" in texts[5].lower()),
    }
    assert {metric: value["mean"] for metric, value in results.items()} == pytest.approx(expected)
    assert all(value["count"] == 1 for value in results.values())


@pytest.mark.slow  # two models, each evaluated twice: ~1 min on a loaded 2-core machine
def test_tofu_protocol_truth_ratio_and_forget_quality(tiny: dict[str, Path], oracle: Path, tmp_path: Path) -> None:
    records = [
        {"id": f"t{k}", "question": f"Where was author {k} born?", "answer": f"In city {k}.",
         "paraphrased_answer": f"Author {k} was born in city {k}.",
         "perturbed_answers": [f"In village {k}.", f"In town {k + 1}.", "Nowhere."],
         "benchmark_split": "forget01_perturbed", "task": "qa", "group": f"author-{k // 2}"}
        for k in range(3)
    ]  # fmt: skip
    retain = [{**record, "id": f"r{k}", "benchmark_split": "retain_perturbed"} for k, record in enumerate(records[:2])]
    forget_path = write_jsonl(tmp_path / "forget.jsonl", records)
    retain_path = write_jsonl(tmp_path / "retain.jsonl", retain)
    section = run_eval(tmp_path, "--model", tiny["llava"], "--reference", oracle,
                       "--data", f"forget={forget_path}", "--data", f"retain={retain_path}", "--protocol", "tofu")  # fmt: skip
    ratios: dict[str, dict[str, list[float]]] = {}
    for role, path in (("model", tiny["llava"]), ("reference", oracle)):
        model = loaded_model(path)
        ratios[role] = {}
        for split, samples in (("forget", load_samples(forget_path)), ("retain", load_samples(retain_path))):
            values = []
            for sample in samples:
                texts = [sample.extra["paraphrased_answer"], *sample.extra["perturbed_answers"]]
                rendered = [model.renderer.render(replace(sample, answer=text)) for text in texts]
                losses = [
                    -score
                    for score in score_conversations(
                        model, rendered, batch_size=4, tracker=NullTracker(), description="t"
                    )
                ]
                values.append(math.exp(-sum(losses[1:]) / 3) / (math.exp(-losses[0]) + 1e-10))
            ratios[role][split] = values
        answers = [model.renderer.render(sample) for sample in load_samples(forget_path)]
        probabilities = [
            math.exp(s)
            for s in score_conversations(model, answers, batch_size=1, tracker=NullTracker(), description="t")
        ]
        got = section["results"][role]["forget"]
        assert got["tofu.Q_A_Prob"]["mean"] == pytest.approx(sum(probabilities) / 3, rel=1e-6)
        forget_terms = [min(r, 1 / (r + 1e-10)) for r in ratios[role]["forget"]]
        retain_terms = [max(0.0, 1 - r) for r in ratios[role]["retain"]]
        assert got["tofu.truth_ratio"] == {"mean": pytest.approx(sum(forget_terms) / 3, rel=1e-6), "count": 3}
        assert section["results"][role]["retain"]["tofu.truth_ratio"]["mean"] == pytest.approx(
            sum(retain_terms) / 2,
            abs=1e-6,  # 1 - tr cancels: float32 noise of batching shows
        )
        assert "tofu.forget_quality" not in section["results"][role]["retain"]
    quality = section["results"]["model"]["forget"]["tofu.forget_quality"]
    expected = ks_2samp(ratios["model"]["forget"], ratios["reference"]["forget"])
    assert quality["value"] == pytest.approx(expected.pvalue) and quality["method"] == "exact"
    assert (quality["count"], quality["reference_count"]) == (3, 3)
    assert "tofu.forget_quality" not in section["results"]["reference"]["forget"]


def test_tofu_forget_quality_without_reference_says_why(tiny: dict[str, Path], tmp_path: Path) -> None:
    record = {"id": "t", "question": "Q?", "answer": "Alpha.", "paraphrased_answer": "Alpha it is.", "perturbed_answers": ["Beta."],
              "benchmark_split": "forget01_perturbed"}  # fmt: skip
    path = write_jsonl(tmp_path / "forget.jsonl", [record])
    section = run_eval(tmp_path, "--model", tiny["llava"], "--data", f"forget={path}", "--protocol", "tofu")
    quality = section["results"]["model"]["forget"]["tofu.forget_quality"]
    assert quality["value"] is None and "needs --reference" in quality["reason"]


def test_protocol_errors_before_model_work(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "question": "Q?", "answer": "Alpha."}])
    missing_model = tmp_path / "no-model"
    missing_model.mkdir()
    expect_error(invoke("eval", "--model", missing_model, "--data", f"forget={path}", "--protocol", "tofu"),
                 "--protocol tofu: no split has a sample it scores")  # fmt: skip
    expect_error(invoke("eval", "--model", missing_model, "--data", f"forget={path}", "--protocol", "nope"),
                 "--protocol", exit_code=2)  # fmt: skip


def test_generated_values_asks_text_tasks_without_the_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kvwctl.evaluate

    image = make_image(tmp_path / "p.png", seed=4)
    asked: list[Sample] = []

    def fake_generate(loaded: Any, samples: list[Sample], **kwargs: Any) -> list[str]:
        asked.extend(samples)
        assert kwargs["max_new_tokens"] == NEW_TOKENS
        return ["B, surely", "c", "In the town.", "x"]

    monkeypatch.setattr(kvwctl.evaluate, "generate_answers", fake_generate)
    base = mc_sample(task="mc_image")
    samples = [
        replace(base, id="a", images=(image,)),
        replace(base, id="b", images=(image,), extra={**base.extra, "task": "mc_text", "correct_letter": "C"}),
        Sample(id="c", question="Where?", answer="In the town of Lagos.", images=(image,), extra={"task": "gen_text"}),
        Sample(id="d", question="Who?", answer="x", extra={"task": "qa"}),  # not an MLLMU-scored task
        Sample(id="e", question="Born in __.", answer="x", images=(image,), extra={"task": "fill_image"}),
    ]
    values, details = generated.generated_values(
        None,  # type: ignore[arg-type]  # generate_answers is replaced
        samples,
        tasks=generated.MLLMU_TASKS,
        prompt=generated.mllmu_prompt,
        score=generated.mllmu_score,
        batch_size=2,
        tracker=NullTracker(),
        description="t",
    )
    assert [sample.id for sample in asked] == ["a", "b", "c", "e"]
    assert [sample.images for sample in asked] == [(image,), (), (), (image,)]
    assert asked[3].question.startswith("Born in [Blank].\nPlease **ONLY**")
    assert values == {
        "mllmu.mc_image_acc": [1.0],
        "mllmu.mc_text_acc": [1.0],
        "mllmu.gen_text_rougeL": [rouge_l("In the town of Lagos.", "In the town.")[1]],
        "mllmu.fill_image_acc": [1.0],
    }
    assert details["b"] == ("c", "mllmu.mc_text_acc", 1.0)
