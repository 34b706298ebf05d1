"""Eval's metrics, per sample, and their summary over a split — what each one is, exactly.

    >>> keyword_accuracy(["Mira Okafor", "Lagos"], "She is mira OKAFOR, born in Paris.")
    0.5

Every metric compares a sample (``question``, ``answer``, optional ``keywords`` and ``options``)
with what the model did: its greedy **generation** after the prompt, or the log-probabilities it
gives, teacher-forced, to the answer and to each option (see ``kvwctl.evaluate`` for both).

* ``rougeL_recall`` and ``rougeL_f1``: ROUGE-L of the generation against the answer
  (``rouge-score``, ``RougeScorer(["rougeL"], use_stemmer=True)``, as TOFU and MLLMU-Bench score);
* ``keyword_acc``: the fraction of the sample's keywords (or, without keywords, of its one answer,
  ``keyword_targets``) that occur in the generation as whole words, after normalising both
  (``normalize_words``: lowercase, punctuation to spaces, articles dropped; a keyword matches if
  its words are a contiguous run of the generation's words, ``contains_words``);
* ``answer_logprob``: the mean log-probability per answer token, teacher-forced on the same
  conversation the profile stage renders (no generation; ``mean_token_logprobs``);
* ``mc_acc``, for samples with ``options`` only: 1 if the option with the highest mean per-token
  log-probability (ties: the first, ``choose_option``) is the answer, else 0.

Over a split, each metric is summarised (``summarize``) as the mean over the samples that have it
and their count: ``mc_acc`` counts only samples with options, and a mean of nothing is None. A
broken model can give a NaN or infinite value (``answer_logprob`` of a model with NaN weights): the
mean is then None too, ``non_finite`` counts those samples, and every requirement on it fails.
torch is imported only inside ``mean_token_logprobs``; the rest is plain Python.
"""

from __future__ import annotations

import functools
import math
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvwctl.data import Sample

METRICS = ("rougeL_recall", "rougeL_f1", "keyword_acc", "answer_logprob", "mc_acc")

# --- text metrics --------------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})


def normalize_words(text: str) -> list[str]:
    """The words of ``text`` for keyword matching (CLEAR / VQA-style normalisation).

    Lowercase; every punctuation character (ASCII punctuation and Unicode category P*) becomes a
    space; the articles a, an and the are dropped; what remains is split on whitespace.
    """
    spaced = "".join(
        " " if character in string.punctuation or unicodedata.category(character).startswith("P") else character
        for character in text.lower()
    )
    return [word for word in spaced.split() if word not in _ARTICLES]


def contains_words(words: Sequence[str], phrase: Sequence[str]) -> bool:
    """Whether ``phrase`` occurs in ``words`` as a contiguous run of whole words."""
    if not phrase:
        raise ValueError("an empty phrase matches everything")
    width = len(phrase)
    return any(list(words[start : start + width]) == list(phrase) for start in range(len(words) - width + 1))


def keyword_accuracy(keywords: Sequence[str], generation: str) -> float:
    """The fraction of ``keywords`` found in ``generation`` as whole words, both normalised."""
    words = normalize_words(generation)
    found = sum(contains_words(words, normalize_words(keyword)) for keyword in keywords)
    return found / len(keywords)


def keyword_targets(sample: Sample) -> tuple[str, ...]:
    """What ``keyword_acc`` looks for: the sample's keywords, or its answer when it has none."""
    return sample.keywords or (sample.answer,)


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, generation: str) -> tuple[float, float]:
    """ROUGE-L (recall, F1) of ``generation`` against ``answer``, as TOFU and MLLMU-Bench compute it."""
    score = _rouge_scorer().score(answer, generation)["rougeL"]
    return float(score.recall), float(score.fmeasure)


# --- likelihood metrics --------------------------------------------------------------------------


def mean_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean log-probability of the labels at the masked positions.

    ``logits`` (batch, positions, vocab) are the predictions at each position, ``labels``
    (batch, positions) the token that actually follows each position, ``mask`` (batch, positions)
    selects the positions to score. The log-softmax is taken in float32 and the sums in float64.
    Returns a float64 tensor of shape (batch,).
    """
    import torch

    rows = mask.nonzero()[:, 0]  # (scored,): the row of each scored position
    selected = logits[mask].float()  # (scored, vocab)
    token_logprobs = torch.log_softmax(selected, dim=-1).gather(1, labels[mask].unsqueeze(1)).squeeze(1)  # (scored,)
    sums = torch.zeros(mask.shape[0], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, rows, token_logprobs.to(torch.float64))  # (batch,)
    return sums / mask.sum(dim=1)


def choose_option(scores: Sequence[float]) -> int:
    """The index of the highest score; on a tie, the first of the tied options."""
    best = 0
    for index, score in enumerate(scores):
        if score > scores[best]:
            best = index
    return best


# --- per sample and per split --------------------------------------------------------------------


def sample_metrics(
    sample: Sample, generation: str, answer_logprob: float, mc_choice: str | None
) -> dict[str, float | None]:
    """Every metric of one sample, by name in ``METRICS`` order; mc_acc is None without options.

    ``answer_logprob`` comes from ``mean_token_logprobs`` on the answer's conversation and
    ``mc_choice`` is the option ``choose_option`` picked (None when the sample has no options).
    """
    recall, f1 = rouge_l(sample.answer, generation)
    return {
        "rougeL_recall": recall,
        "rougeL_f1": f1,
        "keyword_acc": keyword_accuracy(keyword_targets(sample), generation),
        "answer_logprob": answer_logprob,
        "mc_acc": None if mc_choice is None else float(mc_choice == sample.answer),
    }


@dataclass(frozen=True)
class MetricSummary:
    """A metric over a split: the mean over the samples that have it (None if none has) and their count."""

    mean: float | None
    count: int
    non_finite: int = 0  # samples whose value is NaN or infinite; the mean is then None

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}


# role -> split -> metric -> summary, in evaluation order (roles, then splits, then METRICS).
Results = dict[str, dict[str, dict[str, MetricSummary]]]


def summarize(values: Sequence[float | None]) -> MetricSummary:
    """The mean and count of the values that exist (a mean of nothing, or with a NaN or inf, is None)."""
    present = [value for value in values if value is not None]
    non_finite = sum(1 for value in present if not math.isfinite(value))
    mean = sum(present) / len(present) if present and not non_finite else None
    return MetricSummary(mean=mean, count=len(present), non_finite=non_finite)


def finite_or_none(value: float | None) -> float | None:
    """``value``, or None when it is missing, NaN or infinite (JSON has no NaN or Infinity)."""
    return value if value is not None and math.isfinite(value) else None
