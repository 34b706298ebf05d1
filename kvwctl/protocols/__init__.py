"""The benchmarks' own protocols, computed by ``eval --protocol mllmu|clear|tofu`` beside kvwctl's metrics.

    kvwctl eval --model unlearned/ --baseline M --protocol clear \\
                --data forget=forget05_perturbed.jsonl --data retain=retain_perturbed.jsonl \\
                --data faces=real_faces.jsonl --data world=real_world.jsonl

Each protocol scores the samples its benchmark scores (by their ``task``, written by ``kvwctl data
convert``) the way the benchmark's own scripts do: MLLMU-Bench and CLEAR by generation and text
matching (``generated``), TOFU by truth ratio and forget quality (``tofu``, ``kstest``). The numbers
go into eval.json under ``protocol`` (``name``, ``source``: the script each definition follows,
``settings``, and per role, split and metric the mean and count), never mixed with kvwctl's
metrics: every metric name starts with its protocol (``clear.name_vqa_acc``), and the terminal
shows them in a table of their own. Seeds: the protocols draw nothing at random (the options'
order was fixed, seeded, at conversion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvwctl.errors import DataError
from kvwctl.metrics import finite_or_none, summarize
from kvwctl.protocols import generated, tofu

if TYPE_CHECKING:
    from rich.table import Table

    from kvwctl.evaluate import EvalSplit, SampleResult
    from kvwctl.modeling import LoadedModel
    from kvwctl.progress import Tracker

PROTOCOLS = ("mllmu", "clear", "tofu")
TASKS = {"mllmu": generated.MLLMU_TASKS, "clear": generated.CLEAR_TASKS, "tofu": ("qa",)}
METRICS = {"mllmu": generated.MLLMU_METRICS, "clear": generated.CLEAR_METRICS, "tofu": tofu.METRICS}
SOURCES = {
    "mllmu": "MLLMU-Bench eval.py (evaluate_classification, evaluate_generation, evaluate_fill_in_the_blank), zero-shot",
    "clear": "CLEAR/eval.py of github.com/kyj93790/KVW (eval_classification, eval_classification_real)",
    "tofu": "github.com/locuslab/open-unlearning src/evals/metrics (truth_ratio, ks_test) with configs/eval/tofu_metrics",
}


@dataclass
class RoleValues:
    """One model's protocol values: per split, per metric, one value per scored sample."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)  # tofu: per split, the raw truth ratios
    forget_splits: list[str] = field(default_factory=list)


def scored(name: str, sample_task: object, sample_extra: dict[str, Any]) -> bool:
    if name == "tofu":
        return bool(tofu.perturbed_from(sample_extra))
    return sample_task in TASKS[name]


def check_protocol(name: str, splits: list[EvalSplit]) -> None:
    """Refuse, before any model work, a protocol that would score no sample of any split."""
    count = sum(
        1 for split in splits for sample in split.samples if scored(name, sample.extra.get("task"), sample.extra)
    )
    if count == 0:
        need = (
            "samples with perturbed_answers (kvwctl data convert tofu --split forget10_perturbed)"
            if name == "tofu"
            else f"samples whose task is one of {', '.join(TASKS[name])} (kvwctl data convert {name})"
        )
        raise DataError(f"--protocol {name}: no split has a sample it scores", hint=f"it needs {need}")


def run_protocol(
    name: str,
    loaded: LoadedModel,
    results: dict[str, list[SampleResult]],
    *,
    batch_size: int,
    tracker: Tracker,
    role: str,
) -> RoleValues:
    """The protocol's per-sample values for one loaded model over every split (``results``: eval's)."""
    import math

    out = RoleValues()
    for split, split_results in results.items():
        samples = [result.sample for result in split_results]
        description = f"{role}: {split} {name} protocol"
        if name == "tofu":
            forget = tofu.is_forget_split(samples, split)
            ratios = tofu.truth_ratios(loaded, samples, batch_size=batch_size, tracker=tracker, description=description)
            metrics = {
                "tofu.truth_ratio": [tofu.aggregated(ratio, forget=forget) for ratio in ratios],
                "tofu.Q_A_Prob": [math.exp(_logprob(result)) for result in split_results],
            }
            out.ratios[split] = ratios
            if forget:
                out.forget_splits.append(split)
        else:
            prompt, score = (
                (generated.mllmu_prompt, generated.mllmu_score)
                if name == "mllmu"
                else (generated.clear_prompt, generated.clear_score)
            )
            metrics, _ = generated.generated_values(
                loaded,
                samples,
                tasks=TASKS[name],
                prompt=prompt,
                score=score,
                batch_size=batch_size,
                tracker=tracker,
                description=description,
            )
        out.values[split] = metrics
    return out


def _logprob(result: SampleResult) -> float:
    value = result.metrics["answer_logprob"]
    return float("nan") if value is None else value


def protocol_section(name: str, per_role: dict[str, RoleValues]) -> dict[str, Any]:
    """The report's ``protocol`` object: what produced the numbers, and the numbers."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    reference = per_role.get("reference")
    for role, role_values in per_role.items():
        results[role] = {}
        for split, metrics in role_values.values.items():
            entry: dict[str, Any] = {}
            for metric in METRICS[name]:
                if metric == "tofu.forget_quality":
                    if split in role_values.forget_splits and role != "reference":
                        entry[metric] = _forget_quality(role_values.ratios[split], reference, split)
                    continue
                summary = summarize(metrics.get(metric, []))
                entry[metric] = {"mean": finite_or_none(summary.mean), "count": summary.count}
            results[role][split] = entry
    return {"name": name, "source": SOURCES[name], "settings": _settings(name), "results": results}


def _forget_quality(ratios: list[float], reference: RoleValues | None, split: str) -> dict[str, Any]:
    if reference is None:
        return {"value": None, "count": len(ratios), "reason": "needs --reference, the retain (oracle) model"}
    theirs = reference.ratios.get(split, [])
    if not ratios or not theirs:
        return {"value": None, "count": len(ratios), "reason": "no truth ratio on one side"}
    try:
        return tofu.forget_quality(ratios, theirs)
    except ValueError as error:  # a NaN or infinite truth ratio (a broken model)
        return {"value": None, "count": len(ratios), "reason": str(error)}


def _settings(name: str) -> dict[str, Any]:
    if name == "tofu":
        return {
            "question_key": "question",
            "correct_answer": "paraphrased_answer (answer on real_authors, world_facts, or where absent)",
            "truth_ratio": "exp(-mean perturbed loss) / (exp(-correct loss) + 1e-10)",
            "aggregator": "forget splits: mean(min(tr, 1/(tr+1e-10))); others: mean(max(0, 1-tr))",
            "forget_quality": "two-sided two-sample KS p-value of tr against the reference's (exact when n <= 10000)",
        }
    return {"max_new_tokens": generated.MAX_NEW_TOKENS, "decoding": "greedy", "shots": 0}


def protocol_table(section: dict[str, Any]) -> Table:
    """The protocol's numbers: a row per split.metric, a column per model."""
    from rich import box
    from rich.table import Table

    results = section["results"]
    roles = list(results)
    table = Table(
        title=f"protocol {section['name']} ({section['source']})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("split.metric", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    for role in roles:
        table.add_column(role, justify="right", no_wrap=True)
    first = results[roles[0]]
    for split, metrics in first.items():
        for metric, value in metrics.items():
            shown = []
            for role in roles:
                entry = results[role].get(split, {}).get(metric)
                number = None if entry is None else entry.get("mean", entry.get("value"))
                shown.append("-" if number is None else f"{number:.4f}")
            table.add_row(f"{split}.{metric}", str(value.get("count", "")), *shown)
        table.add_section()
    return table
