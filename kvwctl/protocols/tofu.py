"""TOFU's truth ratio and forget quality, as open-unlearning computes them.

For a sample with ``perturbed_answers``, teacher-forced on its ``question`` (the conversation the
profile stage renders, ``evaluate.score_conversations``): the mean per-token loss of the correct
answer ``L_c`` and of each perturbed answer; ``L_w`` the mean of the latter (open-unlearning's
``aggregate_to_1D``). The correct answer is the ``paraphrased_answer`` (``TOFU_QA_*_para``), except
on the real_authors and world_facts splits, and where a sample has none: its ``answer``
(``ra_Q_A_Prob``). The sample's truth ratio is ``tr = exp(-L_w) / (exp(-L_c) + 1e-10)``.

* ``tofu.truth_ratio``: on a forget split, the mean of ``min(tr, 1 / (tr + 1e-10))`` (its
  ``closer_to_1_better``), elsewhere the mean of ``max(0, 1 - tr)`` (``true_better``). A split is a
  forget split when its samples' ``benchmark_split`` (else the eval split's name) starts with
  ``forget``;
* ``tofu.Q_A_Prob``: the mean of ``exp(-L)`` of the answer itself (every sample);
* ``tofu.forget_quality``: on a forget split, the p-value of the two-sample KS test
  (``kstest.ks_2samp``) between the model's per-sample ``tr`` and the reference model's (``eval
  --reference``, the oracle never trained on the forget set), for every role but the reference.
  Without a reference it is null, and the report says why.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kvwctl.data import Sample

if TYPE_CHECKING:
    from kvwctl.modeling import LoadedModel
    from kvwctl.progress import Tracker

EPSILON = 1e-10
METRICS = ("tofu.truth_ratio", "tofu.Q_A_Prob", "tofu.forget_quality")


def is_forget_split(samples: list[Sample], split: str) -> bool:
    named = [str(sample.extra.get("benchmark_split", "")) for sample in samples]
    return (named[0] if named and named[0] else split).startswith("forget")


def correct_answer(sample: Sample) -> str:
    base = str(sample.extra.get("benchmark_split", "")).removesuffix("_perturbed")
    paraphrased = sample.extra.get("paraphrased_answer")
    if base in ("real_authors", "world_facts") or not isinstance(paraphrased, str) or not paraphrased:
        return sample.answer
    return paraphrased


def perturbed(sample: Sample) -> list[str]:
    return perturbed_from(sample.extra)


def perturbed_from(extra: dict[str, Any]) -> list[str]:
    """A sample's perturbed answers (its ``perturbed_answers`` field), the non-empty strings."""
    value = extra.get("perturbed_answers")
    return [item for item in value if isinstance(item, str) and item.strip()] if isinstance(value, list) else []


def truth_ratio(correct_loss: float, wrong_losses: list[float]) -> float:
    """``exp(-mean(wrong_losses)) / (exp(-correct_loss) + 1e-10)``, TOFU's original definition."""
    wrong = sum(wrong_losses) / len(wrong_losses)
    return math.exp(-wrong) / (math.exp(-correct_loss) + EPSILON)


def aggregated(ratio: float, *, forget: bool) -> float:
    """The per-sample term of ``tofu.truth_ratio``: closer_to_1_better on forget, true_better elsewhere."""
    return min(ratio, 1 / (ratio + EPSILON)) if forget else max(0.0, 1 - ratio)


def truth_ratios(
    loaded: LoadedModel, samples: list[Sample], *, batch_size: int, tracker: Tracker, description: str
) -> list[float]:
    """Per sample with perturbed answers (in order), its raw truth ratio."""
    from kvwctl.evaluate import score_conversations

    scored = [sample for sample in samples if perturbed(sample)]
    if not scored:
        return []
    renderer = loaded.renderer
    candidates = [[correct_answer(sample), *perturbed(sample)] for sample in scored]
    rendered = [
        renderer.render(replace(sample, answer=text))
        for sample, texts in zip(scored, candidates, strict=True)
        for text in texts
    ]
    scores = iter(
        score_conversations(loaded, rendered, batch_size=batch_size, tracker=tracker, description=description)
    )
    ratios = []
    for texts in candidates:
        losses = [-next(scores) for _ in texts]  # mean log-probability per token -> mean loss per token
        ratios.append(truth_ratio(losses[0], losses[1:]))
    return ratios


def forget_quality(model_ratios: list[float], reference_ratios: list[float]) -> dict[str, Any]:
    from kvwctl.protocols.kstest import ks_2samp

    result = ks_2samp(model_ratios, reference_ratios)
    return {
        "value": result.pvalue,
        "count": len(model_ratios),
        "reference_count": len(reference_ratios),
        "ks_statistic": result.statistic,
        "method": result.method,
    }
