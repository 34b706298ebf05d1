"""eval's metrics by hand: normalisation, whole-word keywords, ROUGE-L, log-probabilities, choices."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvwctl.data import load_samples
from kvwctl.metrics import (
    METRICS,
    MetricSummary,
    choose_option,
    contains_words,
    keyword_accuracy,
    keyword_targets,
    mean_token_logprobs,
    normalize_words,
    rouge_l,
    sample_metrics,
    summarize,
)


def test_normalize_words() -> None:
    assert normalize_words("The Quick, brown-fox!  Jumps over a dog.") == [
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "dog",
    ]
    assert normalize_words("“Mira” Okafor’s\tAn   apple") == ["mira", "okafor", "s", "apple"]  # Unicode punctuation
    assert normalize_words("The a an") == []


def test_keywords_match_whole_words_only() -> None:
    assert contains_words(["blood", "type", "o"], ["o"])
    assert not contains_words(["type", "of", "blood"], ["o"])  # "O" is not the "o" of "of"
    assert keyword_accuracy(["O"], "The type of blood is unknown.") == 0.0
    assert keyword_accuracy(["O"], "Blood type: O.") == 1.0
    assert keyword_accuracy(["Paris"], "Parisian food") == 0.0
    assert keyword_accuracy(["Mira Okafor"], "She is mira OKAFOR, a doctor") == 1.0
    assert keyword_accuracy(["Mira Okafor"], "Okafor Mira") == 0.0  # a phrase keeps its word order
    assert keyword_accuracy(["the Lagos"], "born in Lagos") == 1.0  # articles are dropped on both sides
    # Per sample: the fraction of its keywords found.
    assert keyword_accuracy(["Mira", "Lagos", "1987"], "Mira was born in Lagos") == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        contains_words(["a"], [])


def test_keyword_targets_fall_back_to_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"question": "Q?", "answer": "Lagos", "keywords": ["Lagos", "Nigeria"]}\n{"question": "Q?", "answer": "Lima"}\n'
    )
    with_keywords, without = load_samples(path)
    assert keyword_targets(with_keywords) == ("Lagos", "Nigeria")
    assert keyword_targets(without) == ("Lima",)


def test_rouge_l_by_hand() -> None:
    # LCS of "mira okafor was born in lagos" and "okafor was born in paris" is 4 words.
    recall, f1 = rouge_l("Mira Okafor was born in Lagos.", "Okafor was born in Paris")
    assert recall == pytest.approx(4 / 6)
    assert f1 == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))  # = 8/11
    # Porter stemming: running -> run, dogs -> dog, runs -> run; LCS is one word.
    recall, f1 = rouge_l("running dogs", "the dog runs")
    assert (recall, f1) == pytest.approx((1 / 2, 2 / 5))
    assert rouge_l("Mira Okafor", "") == (0.0, 0.0)


def test_mean_token_logprobs_by_hand() -> None:
    uniform = [0.0, 0.0, 0.0]  # p = 1/3 each
    skewed = [0.0, math.log(2.0), 0.0]  # p = 1/4, 1/2, 1/4
    huge = [100.0, -100.0, 0.0]  # never scored: masked out
    logits = torch.tensor([[uniform, skewed, huge], [huge, skewed, uniform]])  # (batch 2, positions 3, vocab 3)
    labels = torch.tensor([[1, 1, 1], [2, 0, 2]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    result = mean_token_logprobs(logits, labels, mask)
    assert result.dtype == torch.float64
    expected = [(math.log(1 / 3) + math.log(1 / 2)) / 2, math.log(1 / 4)]
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    half = mean_token_logprobs(logits.to(torch.bfloat16), labels, mask)  # half-precision logits, float32 softmax
    torch.testing.assert_close(half, torch.tensor(expected, dtype=torch.float64), rtol=1e-2, atol=1e-2)


def test_choose_option_prefers_the_first_of_ties() -> None:
    assert choose_option([-3.0, -1.0, -2.0]) == 1
    assert choose_option([-1.0, -0.5, -0.5]) == 1
    assert choose_option([-2.0, -2.0]) == 0
    assert choose_option([-0.1]) == 0


def test_sample_metrics_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"question": "Q?", "answer": "Lagos", "keywords": ["Lagos", "Nigeria"], "options": ["Lagos", "Lima"]}\n'
        '{"question": "Q?", "answer": "Lima"}\n'
    )
    with_options, without = load_samples(path)
    metrics = sample_metrics(with_options, "Lagos", -0.5, "Lima")
    assert list(metrics) == list(METRICS)
    assert metrics == {
        "rougeL_recall": 1.0,
        "rougeL_f1": 1.0,
        "keyword_acc": 0.5,
        "answer_logprob": -0.5,
        "mc_acc": 0.0,
    }
    assert sample_metrics(with_options, "in Lagos", -0.5, "Lagos")["mc_acc"] == 1.0
    metrics = sample_metrics(without, "Lima, Peru", -1.25, None)
    assert (metrics["keyword_acc"], metrics["mc_acc"]) == (1.0, None)


def test_summarize_counts_only_present_values() -> None:
    assert summarize([1.0, None, 0.0]) == MetricSummary(mean=0.5, count=2)
    assert summarize([None, None]) == MetricSummary(mean=None, count=0)
    assert summarize([0.25]).to_json() == {"mean": 0.25, "count": 1}
