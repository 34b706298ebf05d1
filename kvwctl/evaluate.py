"""Stage 4: evaluate models on data splits — what they generate, how likely they find the answers.

    kvwctl eval --model unlearned/ --baseline M --data forget=forget.jsonl --data retain=retain.jsonl \\
                --require 'retain.keyword_acc >= 0.95*baseline' --require 'forget.keyword_acc <= 0.10'

Every model (``model``, and optionally ``baseline`` and ``reference``) is loaded in turn, run over
every split and freed. Per sample:

* the **generation**: greedy decoding of up to ``max_new_tokens`` tokens after the prompt rendered
  with the model's chat template (images included), batched with LEFT padding; only the new tokens
  are decoded (special tokens skipped, whitespace stripped);
* ``rougeL_recall`` and ``rougeL_f1``: ROUGE-L of the generation against the answer
  (``rouge-score``, ``RougeScorer(["rougeL"], use_stemmer=True)``, as TOFU and MLLMU-Bench score);
* ``keyword_acc``: the fraction of the sample's keywords (or, without keywords, of its one answer)
  that occur in the generation as whole words, after normalising both (``normalize_words``);
* ``answer_logprob``: the mean log-probability per answer token, teacher-forced on the same
  conversation the profile stage renders (no generation);
* ``mc_acc``, for samples with ``options`` only: 1 if the option with the highest mean per-token
  log-probability (ties: the first) is the answer, else 0.

The report (``kvwctl.eval/1``) holds, per model role, split and metric, the mean over samples and
the number of samples that have the metric, plus the inputs (references, revisions, fingerprints,
data sha256), the settings and the outcome of every gate. It has no timestamps: the same inputs
give the same bytes. Gates (``--require``) are parsed and checked against the inputs before any
model work; see ``parse_gate`` for the grammar.
"""

from __future__ import annotations

import functools
import gc
import operator
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl import __version__
from kvwctl.checkpoint import Checkpoint, open_checkpoint, resolve_model
from kvwctl.console import NullTracker, Tracker
from kvwctl.conversation import RenderedSample
from kvwctl.data import Sample, load_samples
from kvwctl.errors import DataError, KvwError, UsageError
from kvwctl.files import atomic_file, check_output_file, file_sha256, write_json_atomically
from kvwctl.modeling import DTYPES, LoadedModel, encode_batch, encode_prompts, load_model, select_device, select_dtype

if TYPE_CHECKING:
    import torch

EVAL_FORMAT = "kvwctl.eval/1"
ROLES = ("model", "baseline", "reference")
METRICS = ("rougeL_recall", "rougeL_f1", "keyword_acc", "answer_logprob", "mc_acc")
SEED = 0
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

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


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean": …, "count": …}`` over the values that exist (a mean of nothing is null)."""
    present = [value for value in values if value is not None]
    return {"mean": sum(present) / len(present) if present else None, "count": len(present)}


# --- gates ---------------------------------------------------------------------------------------

_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_GATE = re.compile(r"^(?P<split>[^\s.<>=]+)\.(?P<metric>[^\s<>=]+)\s*(?P<operator>>=|<=|>|<)\s*(?P<expression>.*)$")
_EXPRESSION = re.compile(
    rf"^(?:(?P<number>[+-]?{_UNSIGNED})"
    rf"|(?:(?P<factor>[+-]?{_UNSIGNED})\s*\*\s*)?(?P<role>baseline|reference)(?:\s*(?P<sign>[+-])\s*(?P<offset>{_UNSIGNED}))?)$"
)
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_NEGATIONS = {">=": "<", "<=": ">", ">": "<=", "<": ">="}
GATE_SYNTAX = "SPLIT.METRIC OP EXPR, OP one of >= <= > <, EXPR a number or [NUMBER*]baseline|reference [+|- NUMBER]"


@dataclass(frozen=True)
class Gate:
    """``SPLIT.METRIC OP threshold``: the ``--model``'s value compared with a threshold.

    The threshold is ``constant`` when ``role`` is None, else ``factor * value + constant`` where
    value is the same split and metric of the ``role`` model (baseline or reference).
    """

    text: str
    split: str
    metric: str
    operator: str
    constant: float
    factor: float = 1.0
    role: str | None = None

    def threshold(self, results: dict[str, Any]) -> float:
        if self.role is None:
            return self.constant
        return self.factor * _metric_mean(results, self.role, self.split, self.metric) + self.constant


@dataclass(frozen=True)
class GateOutcome:
    gate: Gate
    value: float
    threshold: float
    passed: bool

    def describe(self) -> str:
        if self.passed:
            return f"{self.gate.text} passed: {self.value:.6g} {self.gate.operator} {self.threshold:.6g}"
        return f"{self.gate.text} failed: {self.value:.6g} {_NEGATIONS[self.gate.operator]} {self.threshold:.6g}"

    def as_json(self) -> dict[str, Any]:
        return {"gate": self.gate.text, "value": self.value, "threshold": self.threshold, "passed": self.passed}


def parse_gate(text: str) -> Gate:
    """Parse ``SPLIT.METRIC OP EXPR``; a malformed gate or an unknown metric is a usage error.

    ``EXPR`` is a number (``0.1``, ``-2.5``) or ``[NUMBER*]baseline|reference [+|- NUMBER]``
    (``0.95*baseline``, ``reference + 0.1``), where baseline/reference stand for the same split
    and metric of that model. Examples: ``retain.keyword_acc >= 0.95*baseline``,
    ``forget.keyword_acc <= 0.10``, ``forget.keyword_acc <= reference + 0.1``.
    """
    stripped = text.strip()
    match = _GATE.match(stripped)
    expression = _EXPRESSION.match(match["expression"].strip()) if match else None
    if match is None or expression is None:
        raise UsageError(f"invalid --require {text!r}", hint=f"write {GATE_SYNTAX}, e.g. 'forget.keyword_acc <= 0.1'")
    if match["metric"] not in METRICS:
        raise UsageError(
            f"--require {text!r}: unknown metric {match['metric']!r}", hint=f"metrics: {', '.join(METRICS)}"
        )
    if expression["number"] is not None:
        constant, factor = float(expression["number"]), 1.0
    else:
        offset = float(expression["offset"]) if expression["offset"] is not None else 0.0
        constant = -offset if expression["sign"] == "-" else offset
        factor = float(expression["factor"]) if expression["factor"] is not None else 1.0
    return Gate(
        text=stripped,
        split=match["split"],
        metric=match["metric"],
        operator=match["operator"],
        constant=constant,
        factor=factor,
        role=expression["role"],
    )


def check_gates(gates: Sequence[Gate], results: dict[str, Any]) -> list[GateOutcome]:
    """Evaluate every gate on ``results[role][split][metric] = {"mean", "count"}``."""
    outcomes = []
    for gate in gates:
        value = _metric_mean(results, "model", gate.split, gate.metric)
        threshold = gate.threshold(results)
        outcomes.append(GateOutcome(gate, value, threshold, _OPERATORS[gate.operator](value, threshold)))
    return outcomes


def _metric_mean(results: dict[str, Any], role: str, split: str, metric: str) -> float:
    summary = results[role][split][metric]
    if summary["count"] == 0:
        raise KvwError(f"{split}.{metric} of the {role} has no value: no sample of {split} has it")
    return float(summary["mean"])


def validate_gates(gates: Sequence[Gate], splits: Sequence[str], roles: Sequence[str]) -> None:
    """Refuse gates that name a split that is not evaluated or a model that was not given."""
    for gate in gates:
        if gate.split not in splits:
            raise UsageError(
                f"--require {gate.text!r}: split {gate.split!r} is not evaluated",
                hint=f"evaluated splits: {', '.join(splits)}",
            )
        if gate.role is not None and gate.role not in roles:
            raise UsageError(f"--require {gate.text!r} compares with the {gate.role}, but no --{gate.role} was given")


def _check_gates_have_values(gates: Sequence[Gate], splits: Sequence[EvalSplit]) -> None:
    """Only mc_acc can have no values (every sample has the other metrics): refuse it before model work."""
    by_name = {split.name: split for split in splits}
    for gate in gates:
        if gate.metric == "mc_acc" and by_name[gate.split].with_options == 0:
            raise KvwError(
                f"--require {gate.text!r}: no sample of {gate.split} has options, so mc_acc has no value",
                hint="add options to the samples, or gate on another metric",
            )


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSplit:
    name: str
    path: Path
    sha256: str
    samples: list[Sample]

    @property
    def with_options(self) -> int:
        return sum(1 for sample in self.samples if sample.options)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "samples": len(self.samples),
            "with_options": self.with_options,
        }


def keyword_targets(sample: Sample) -> tuple[str, ...]:
    """What ``keyword_acc`` looks for: the sample's keywords, or its answer when it has none."""
    return sample.keywords or (sample.answer,)


def load_split(name: str, path: Path) -> EvalSplit:
    """Read a split and check what evaluation needs beyond ``load_samples``, listing every problem."""
    samples = load_samples(path)
    problems = []
    for sample in samples:
        if sample.options and sample.answer not in sample.options:
            problems.append(f"{sample.source}: options: the answer {sample.answer!r} is not one of the options")
        for keyword in keyword_targets(sample):
            if not normalize_words(keyword):
                field = "keywords" if sample.keywords else "answer"
                problems.append(f"{sample.source}: {field}: {keyword!r} has no words once normalised")
    if problems:
        raise DataError("invalid data for eval:\n  " + "\n  ".join(problems))
    return EvalSplit(name=name, path=path, sha256=file_sha256(path), samples=samples)


# --- model work ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    sample: Sample
    generation: str
    mc_choice: str | None  # the chosen option; None when the sample has no options
    metrics: dict[str, float | None]  # every name of METRICS; mc_acc is None without options


def sample_result(sample: Sample, generation: str, answer_logprob: float, mc_choice: str | None) -> SampleResult:
    recall, f1 = rouge_l(sample.answer, generation)
    metrics = {
        "rougeL_recall": recall,
        "rougeL_f1": f1,
        "keyword_acc": keyword_accuracy(keyword_targets(sample), generation),
        "answer_logprob": answer_logprob,
        "mc_acc": None if mc_choice is None else float(mc_choice == sample.answer),
    }
    return SampleResult(sample=sample, generation=generation, mc_choice=mc_choice, metrics=metrics)


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def generate_answers(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int,
    batch_size: int,
    tracker: Tracker,
    description: str,
) -> list[str]:
    """Greedy generations after each sample's prompt, batched with left padding, in sample order."""
    import torch

    renderer = loaded.renderer
    prompts = [renderer.render_prompt(sample) for sample in samples]
    generations: list[str] = []
    batches = _batches(prompts, batch_size)
    for batch in tracker.track(batches, total=len(batches), description=description):
        inputs = encode_prompts(loaded, list(batch))
        with torch.inference_mode():
            output = loaded.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=renderer.tokenizer.pad_token_id,
            )  # (batch, prompt + new tokens)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (batch, at most max_new_tokens)
        texts = renderer.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        generations.extend(text.strip() for text in texts)
    return generations


def score_conversations(
    loaded: LoadedModel, rendered: Sequence[RenderedSample], *, batch_size: int, tracker: Tracker, description: str
) -> list[float]:
    """Teacher-forced mean log-probability per answer token of each rendered conversation.

    The batches are encoded as the profile stage encodes them (``encode_batch``, right padding)
    and its ``answer`` positions — the last prompt position and answer tokens 1..n-1 — are exactly
    the positions whose next token is an answer token.
    """
    import torch

    scores: list[float] = []
    batches = _batches(rendered, batch_size)
    for batch in tracker.track(batches, total=len(batches), description=description):
        encoded = encode_batch(loaded, list(batch), positions="answer")
        mask = encoded.position_mask  # (batch, sequence): positions that predict an answer token
        input_ids = encoded.inputs["input_ids"]  # (batch, sequence)
        first = int(mask.any(dim=0).nonzero()[0, 0])  # the earliest such position in the batch
        keep = input_ids.shape[1] - first
        with torch.inference_mode():
            # Only the last `keep` positions' logits: the image and prompt tokens before are not scored.
            logits = loaded.model(**encoded.inputs, use_cache=False, logits_to_keep=keep).logits  # (batch, keep, vocab)
        labels = input_ids[:, first + 1 :]  # (batch, keep - 1): the token that follows each kept position
        scores.extend(mean_token_logprobs(logits[:, :-1], labels, mask[:, first:-1]).tolist())
    return scores


def evaluate_split(
    loaded: LoadedModel, split: EvalSplit, *, role: str, max_new_tokens: int, batch_size: int, tracker: Tracker
) -> list[SampleResult]:
    """Generations, answer log-probabilities and multiple-choice picks for every sample of a split."""
    renderer = loaded.renderer
    # One conversation per distinct candidate of a sample: its answer, then its other options.
    # The answer's score is both answer_logprob and that option's multiple-choice score.
    candidates = [list(dict.fromkeys((sample.answer, *sample.options))) for sample in split.samples]
    rendered = [
        renderer.render(replace(sample, answer=candidate))
        for sample, texts in zip(split.samples, candidates, strict=True)
        for candidate in texts
    ]
    generations = generate_answers(
        loaded,
        split.samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        tracker=tracker,
        description=f"{role}: {split.name} generate",
    )
    flat_scores = iter(
        score_conversations(
            loaded, rendered, batch_size=batch_size, tracker=tracker, description=f"{role}: {split.name} score"
        )
    )
    results = []
    for sample, texts, generation in zip(split.samples, candidates, generations, strict=True):
        scores = {text: next(flat_scores) for text in texts}
        choice = (
            sample.options[choose_option([scores[option] for option in sample.options])] if sample.options else None
        )
        results.append(sample_result(sample, generation, scores[sample.answer], choice))
    return results


def _release_memory(device: torch.device) -> None:
    """Give back the memory of a model whose last reference was just dropped."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the stage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    reference: str
    revision: str | None = None


@dataclass(frozen=True)
class EvalResult:
    path: Path
    samples_path: Path
    report: dict[str, Any]
    outcomes: list[GateOutcome]

    @property
    def failed(self) -> list[GateOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.passed]


def default_samples_path(out: Path) -> Path:
    """``eval.json`` -> ``eval.samples.jsonl``."""
    return out.with_name(f"{out.stem if out.suffix == '.json' else out.name}.samples.jsonl")


def run_eval(
    models: dict[str, ModelSpec],
    splits: dict[str, Path],
    out: Path,
    *,
    samples_out: Path | None = None,
    gates: Sequence[str] = (),
    max_new_tokens: int = 32,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    force: bool = False,
    tracker: Tracker | None = None,
) -> EvalResult:
    """Evaluate ``models`` (roles: model, baseline, reference) on ``splits`` and write the report.

    Gates are parsed and checked against the splits and models before any model work; their
    outcomes are in the result (and the report), and failing them is left to the caller.
    """
    tracker = tracker or NullTracker()
    parsed_gates = [parse_gate(text) for text in gates]
    unknown_roles = sorted(set(models) - set(ROLES))
    if "model" not in models or unknown_roles:
        raise ValueError(f"models must have a 'model' and only roles from {ROLES}, got {sorted(models)}")
    if not splits:
        raise UsageError("no data split to evaluate", hint="pass --data NAME=FILE")
    for name in splits:
        if not SPLIT_NAME.match(name):
            raise UsageError(f"invalid split name {name!r}", hint="split names are letters, digits, '_' and '-'")
    roles = [role for role in ROLES if role in models]
    validate_gates(parsed_gates, list(splits), roles)
    for name, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise KvwError(f"{name} must be at least 1, got {value}")
    if dtype not in DTYPES:
        raise KvwError(f"invalid --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    samples_out = samples_out or default_samples_path(out)
    if samples_out.resolve() == out.resolve():
        raise KvwError(f"the report and the per-sample file are both {out}", hint="choose another --samples-out")
    check_output_file(out, force=force)
    check_output_file(samples_out, force=force)
    torch_device = select_device(device)
    evaluated = [load_split(name, path) for name, path in splits.items()]
    _check_gates_have_values(parsed_gates, evaluated)
    checkpoints = {role: open_checkpoint(resolve_model(spec.reference, spec.revision)) for role, spec in models.items()}

    import torch

    model_info: dict[str, Any] = {}
    per_sample: dict[str, dict[str, list[SampleResult]]] = {}
    for role in roles:
        checkpoint = checkpoints[role]
        torch_dtype = select_dtype(dtype, torch_device, checkpoint.config)
        model_info[role] = _describe_model(checkpoint, torch_dtype)
        torch.manual_seed(SEED)
        loaded = load_model(checkpoint, device=torch_device, dtype=torch_dtype)
        per_sample[role] = {
            split.name: evaluate_split(
                loaded, split, role=role, max_new_tokens=max_new_tokens, batch_size=batch_size, tracker=tracker
            )
            for split in evaluated
        }
        del loaded
        _release_memory(torch_device)

    results = {
        role: {
            split.name: {
                metric: summarize([result.metrics[metric] for result in per_sample[role][split.name]])
                for metric in METRICS
            }
            for split in evaluated
        }
        for role in roles
    }
    outcomes = check_gates(parsed_gates, results)
    _write_samples(samples_out, per_sample)
    report = {
        "format": EVAL_FORMAT,
        "tool_version": __version__,
        "models": model_info,
        "data": {split.name: split.describe() for split in evaluated},
        "settings": _settings(max_new_tokens, batch_size, torch_device, dtype),
        "metrics": list(METRICS),
        "results": results,
        "gates": [outcome.as_json() for outcome in outcomes],
        "samples_sha256": file_sha256(samples_out),
    }
    write_json_atomically(out, report)
    return EvalResult(path=out, samples_path=samples_out, report=report, outcomes=outcomes)


def _describe_model(checkpoint: Checkpoint, torch_dtype: torch.dtype) -> dict[str, Any]:
    return {
        "reference": checkpoint.source.reference,
        "revision": checkpoint.source.revision,
        "fingerprint": checkpoint.fingerprint(),
        "model_type": checkpoint.architecture.model_type,
        "dtype": str(torch_dtype).removeprefix("torch."),
    }


def _settings(max_new_tokens: int, batch_size: int, device: torch.device, dtype: str) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "device": str(device),
        "dtype": dtype,
        "decoding": "greedy",
        "seed": SEED,
        "rouge": "rougeL, use_stemmer=True",
        "keyword_match": "normalised whole words; fraction of keywords (or the answer) found",
        "versions": {name: version(name) for name in ("torch", "transformers", "rouge-score")},
    }


def _write_samples(path: Path, per_sample: dict[str, dict[str, list[SampleResult]]]) -> None:
    import jsonlines

    with atomic_file(path) as temporary, jsonlines.open(temporary, mode="w", compact=True) as writer:
        for role, splits in per_sample.items():
            for split, results in splits.items():
                for result in results:
                    sample = result.sample
                    writer.write(
                        {
                            "role": role,
                            "split": split,
                            "id": sample.id,
                            "question": sample.question,
                            "answer": sample.answer,
                            "generation": result.generation,
                            **result.metrics,
                            "mc_choice": result.mc_choice,
                        }
                    )
