"""Stage 4: evaluate models on data splits — what they generate, how likely they find the answers.

    kvwctl eval --model unlearned/ --baseline M --data forget=forget.jsonl --data retain=retain.jsonl \\
                --require 'retain.keyword_acc >= 0.95*baseline' --require 'forget.keyword_acc <= 0.10'

Every model (``model``, and optionally ``baseline`` and ``reference``) is loaded in turn, run over
every split and freed. Per sample, through the model's chat template (images included): the
**generation**, greedy decoding of up to ``max_new_tokens`` tokens after the prompt, batched with
LEFT padding (only the new tokens decoded, special tokens skipped, whitespace stripped); and the
**teacher-forced scores** of the conversation with its answer and with each of its options, encoded
as the profile stage encodes it (models that differ only from some decoder layer on, such as an
applied checkpoint and its original, share the teacher-forced passes' states below that layer:
``kvwctl.layercache``; the scores are unchanged). The metrics computed from them are defined in ``kvwctl.metrics``;
the requirements (``--require``), checked against the inputs before any model work, in
``kvwctl.requirements``. The report (``kvwctl.report``) holds, per role, split and metric, the mean
and count, plus the inputs, the settings and every requirement's outcome; it has no timestamps:
the same inputs give the same bytes. With ``redact`` the report's data paths and the per-sample
ids are keyed hashes and the per-sample file holds no question, answer, generation or chosen option
(``kvwctl.redact``). ``plan_eval`` makes every check before a model is loaded (``--dry-run``).
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.checkpoint import Checkpoint, open_checkpoint
from kvwctl.conversation import ChatRenderer, RenderedSample
from kvwctl.data import Sample, load_samples
from kvwctl.errors import DataError, KvwError, UsageError
from kvwctl.files import committed_together, file_sha256, write_json_atomically
from kvwctl.metrics import (
    METRICS,
    Results,
    choose_option,
    finite_or_none,
    keyword_targets,
    mean_token_logprobs,
    normalize_words,
    sample_metrics,
    summarize,
)
from kvwctl.modeling import LoadedModel, encode_batch, encode_prompts, load_model, select_device, select_dtype
from kvwctl.options import EvalOptions
from kvwctl.outputs import check_outputs
from kvwctl.placement import Placement
from kvwctl.plans import batch_count, checkpoint_facts, data_facts, output_facts
from kvwctl.progress import NullTracker, Tracker
from kvwctl.redact import Redactor
from kvwctl.report import EvalReport, EvalSettings, ModelInfo, SplitInfo
from kvwctl.requirements import (
    Requirement,
    RequirementOutcome,
    check_requirements,
    check_requirements_have_values,
    parse_requirement,
    validate_requirements,
)
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.visioncache import cache_directory

if TYPE_CHECKING:
    import torch

    from kvwctl.layercache import LayerInputCache

ROLES = ("model", "baseline", "reference")
SEED = 0
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

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

    fold: str | None = None  # "K/N by FIELD" when only one fold's samples are kept

    def describe(self) -> SplitInfo:
        return SplitInfo(
            path=str(self.path),
            sha256=self.sha256,
            samples=len(self.samples),
            with_options=self.with_options,
            fold=self.fold,
        )

    def only_fold(self, fold: int, folds: int, group_by: str | None) -> EvalSplit:
        """The samples of fold ``fold`` of ``folds`` (``kvwctl.folds``), in file order."""
        from kvwctl.folds import assign_folds

        assigned = assign_folds(self.samples, folds, group_by=group_by)
        kept = [sample for sample, where in zip(self.samples, assigned, strict=True) if where == fold]
        return replace(self, samples=kept, fold=f"{fold}/{folds} by {group_by or 'id'}")


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
    for batch in tracker.track(batches, total=len(prompts), description=description, unit="samples", size=len):
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
    loaded: LoadedModel,
    rendered: Sequence[RenderedSample],
    *,
    batch_size: int,
    tracker: Tracker,
    description: str,
    layer_cache: LayerInputCache | None = None,
) -> list[float]:
    """Teacher-forced mean log-probability per answer token of each rendered conversation.

    The batches are encoded as the profile stage encodes them (``encode_batch``, right padding)
    and its ``answer`` positions — the last prompt position and answer tokens 1..n-1 — are exactly
    the positions whose next token is an answer token. With ``layer_cache`` (tune's trials), a
    batch seen before runs only the layers from the cache's first layer on (``kvwctl.layercache``).
    """
    import torch

    scores: list[float] = []
    batches = _batches(rendered, batch_size)
    progress = tracker.track(batches, total=len(rendered), description=description, unit="answers", size=len)
    for batch in progress:
        encoded = encode_batch(loaded, list(batch), positions="answer")
        mask = encoded.position_mask  # (batch, sequence): positions that predict an answer token
        input_ids = encoded.inputs["input_ids"]  # (batch, sequence)
        first = int(mask.any(dim=0).nonzero()[0, 0])  # the earliest such position in the batch
        keep = input_ids.shape[1] - first
        around = layer_cache.around(loaded, encoded.inputs) if layer_cache is not None else nullcontext()
        with torch.inference_mode(), around:
            # Only the last `keep` positions' logits: the image and prompt tokens before are not scored.
            logits = loaded.model(**encoded.inputs, use_cache=False, logits_to_keep=keep).logits  # (batch, keep, vocab)
        labels = input_ids[:, first + 1 :]  # (batch, keep - 1): the token that follows each kept position
        scores.extend(mean_token_logprobs(logits[:, :-1], labels, mask[:, first:-1]).tolist())
    return scores


@dataclass(frozen=True)
class RenderedSplit:
    split: EvalSplit
    candidates: list[list[str]]  # per sample: its answer, then its other options
    conversations: list[RenderedSample]  # one per candidate, flat


def render_split(renderer: ChatRenderer, split: EvalSplit) -> RenderedSplit:
    """Every conversation of a split a model will score, rendered (and checked) before any forward pass."""
    # One conversation per distinct candidate of a sample: its answer, then its other options.
    # The answer's score is both answer_logprob and that option's multiple-choice score.
    candidates = [list(dict.fromkeys((sample.answer, *sample.options))) for sample in split.samples]
    conversations = [
        renderer.render(replace(sample, answer=candidate))
        for sample, texts in zip(split.samples, candidates, strict=True)
        for candidate in texts
    ]
    return RenderedSplit(split=split, candidates=candidates, conversations=conversations)


def evaluate_split(
    loaded: LoadedModel,
    prepared: RenderedSplit,
    *,
    role: str,
    max_new_tokens: int,
    batch_size: int,
    tracker: Tracker,
    layer_cache: LayerInputCache | None = None,
) -> list[SampleResult]:
    """Generations, answer log-probabilities and multiple-choice picks for every sample of a split.

    ``role`` names the model in the progress descriptions (``model 2/3 (baseline)``); ``layer_cache``
    is shared by models that differ only from one layer on (``kvwctl.layercache``).
    """
    split, rendered = prepared.split, prepared.conversations
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
            loaded,
            rendered,
            batch_size=batch_size,
            tracker=tracker,
            description=f"{role}: {split.name} score",
            layer_cache=layer_cache,
        )
    )
    results = []
    answer_scores, choices = answer_scores_and_choices(prepared, flat_scores)
    for sample, generation, answer_score, choice in zip(
        split.samples, generations, answer_scores, choices, strict=True
    ):
        metrics = sample_metrics(sample, generation, answer_score, choice)
        results.append(SampleResult(sample=sample, generation=generation, mc_choice=choice, metrics=metrics))
    return results


def answer_scores_and_choices(
    prepared: RenderedSplit, flat_scores: Iterator[float]
) -> tuple[list[float], list[str | None]]:
    """Per sample, the answer's score and the option chosen (None without options), from the scores
    of ``prepared.conversations`` in order."""
    answer_scores: list[float] = []
    choices: list[str | None] = []
    for sample, texts in zip(prepared.split.samples, prepared.candidates, strict=True):
        scores = {text: next(flat_scores) for text in texts}
        answer_scores.append(scores[sample.answer])
        choices.append(
            sample.options[choose_option([scores[option] for option in sample.options])] if sample.options else None
        )
    return answer_scores, choices


def _release_memory(device: torch.device) -> None:
    """Give back the memory of a model whose last reference was just dropped."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the stage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    path: Path
    samples_path: Path
    report: EvalReport

    @property
    def failed(self) -> list[RequirementOutcome]:
        return self.report.failed

    def failure(self) -> KvwError | None:
        """The error to exit with when a requirement failed (naming each one), else None."""
        if not self.failed:
            return None
        count = len(self.failed)
        return KvwError(
            f"{count} requirement{'s' if count > 1 else ''} failed: "
            + "; ".join(outcome.describe() for outcome in self.failed),
            hint=f"the report with every requirement's outcome is in {self.path}",
        )


def default_samples_path(out: Path) -> Path:
    """``eval.json`` -> ``eval.samples.jsonl``."""
    return out.with_name(f"{out.stem if out.suffix == '.json' else out.name}.samples.jsonl")


@dataclass(frozen=True)
class EvalPlan:
    """An eval run resolved and checked: every checkpoint (headers only), split and requirement, the outputs."""

    checkpoints: dict[str, Checkpoint]  # role -> checkpoint, in ROLES order
    splits: list[EvalSplit]
    requirements: list[Requirement]
    out: Path
    samples_out: Path
    options: EvalOptions
    device: str
    command: str = "eval"

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""
        options, force = self.options, self.options.force
        return {
            "command": self.command,
            "models": {role: checkpoint_facts(checkpoint) for role, checkpoint in self.checkpoints.items()},
            "data": {split.name: data_facts(split.path, split.samples) for split in self.splits},
            "requirements": list(options.require),
            "settings": {
                "max_new_tokens": options.max_new_tokens,
                "batch_size": options.batch_size,
                "batches": sum(batch_count(len(split.samples), options.batch_size) for split in self.splits),
                "device": self.device,
                "dtype": options.dtype,
                "redact": options.redact,
                **({"protocol": options.protocol} if options.protocol else {}),
            },
            "outputs": [
                output_facts(self.out, "report", force=force),
                output_facts(self.samples_out, "per-sample", force=force),
            ],
        }


def plan_eval(
    models: dict[str, ModelSpec],
    splits: dict[str, Path],
    out: Path,
    options: EvalOptions,
    *,
    samples_out: Path | None = None,
) -> EvalPlan:
    """Every check ``run_eval`` makes before any model work: splits, requirements, checkpoints, outputs."""
    parsed = [parse_requirement(text) for text in options.require]
    unknown_roles = sorted(set(models) - set(ROLES))
    if "model" not in models or unknown_roles:
        raise ValueError(f"models must have a 'model' and only roles from {ROLES}, got {sorted(models)}")
    if not splits:
        raise UsageError("no data split to evaluate", hint="pass --data NAME=FILE")
    for name in splits:
        if not SPLIT_NAME.match(name):
            raise UsageError(f"invalid split name {name!r}", hint="split names are letters, digits, '_' and '-'")
    roles = [role for role in ROLES if role in models]
    validate_requirements(parsed, list(splits), roles)
    samples_out = samples_out or default_samples_path(out)
    if samples_out.resolve() == out.resolve():
        raise UsageError(f"the report and the per-sample file are both {out}", hint="choose another --samples-out")
    torch_device = select_device(options.device, placement=Placement.from_options(options))
    evaluated = [load_split(name, path) for name, path in splits.items()]
    if options.fold is not None:
        from kvwctl.folds import parse_fold

        fold, folds = parse_fold(options.fold)
        evaluated = [split.only_fold(fold, folds, options.group_by) for split in evaluated]
    if options.protocol is not None:  # the benchmark's own scoring (kvwctl.protocols)
        from kvwctl.protocols import check_protocol

        check_protocol(options.protocol, evaluated)
    check_requirements_have_values(parsed, {split.name: split.with_options for split in evaluated})
    checkpoints = {
        role: open_checkpoint(resolve_model(models[role].reference, models[role].revision)) for role in roles
    }
    inputs = [
        *(path for checkpoint in checkpoints.values() for path in checkpoint.input_paths),
        *splits.values(),
        *(image for split in evaluated for sample in split.samples for image in sample.images),
    ]
    check_outputs(files=[out, samples_out], inputs=inputs, force=options.force)
    return EvalPlan(
        checkpoints=checkpoints,
        splits=evaluated,
        requirements=parsed,
        out=out,
        samples_out=samples_out,
        options=options,
        device=str(torch_device),
    )


def run_eval(
    models: dict[str, ModelSpec],
    splits: dict[str, Path],
    out: Path,
    options: EvalOptions,
    *,
    samples_out: Path | None = None,
    tracker: Tracker | None = None,
) -> EvalResult:
    """Evaluate ``models`` (roles: model, baseline, reference) on ``splits`` and write the report.

    Requirements are parsed and checked against the splits and models before any model work;
    their outcomes are in the report, and failing them is left to the caller.
    """
    return execute_eval(plan_eval(models, splits, out, options, samples_out=samples_out), tracker=tracker)


def execute_eval(plan: EvalPlan, *, tracker: Tracker | None = None) -> EvalResult:
    """The work of a planned eval: every model loaded in turn over every split, then both files."""
    import torch

    tracker = tracker or NullTracker()
    options, evaluated, out, samples_out = plan.options, plan.splits, plan.out, plan.samples_out
    max_new_tokens, batch_size, dtype = options.max_new_tokens, options.batch_size, options.dtype
    redactor = Redactor.create(enabled=options.redact)
    torch_device = torch.device(plan.device)
    roles = list(plan.checkpoints)
    layer_cache, cached_roles = shared_layer_cache(plan.checkpoints, torch_device, dtype)
    model_info: dict[str, ModelInfo] = {}
    per_sample: dict[str, dict[str, list[SampleResult]]] = {}
    protocol_values: dict[str, Any] = {}  # role -> kvwctl.protocols.RoleValues, with --protocol
    for index, role in enumerate(roles, start=1):
        checkpoint = plan.checkpoints[role]
        label = f"model {index}/{len(roles)} ({role})"
        torch_dtype = select_dtype(dtype, torch_device, checkpoint.config)
        model_info[role] = _describe_model(checkpoint, torch_dtype)
        torch.manual_seed(SEED)
        with tracker.status(f"{label}: loading {checkpoint.source.reference}"):
            loaded = load_model(
                checkpoint,
                device=torch_device,
                dtype=torch_dtype,
                placement=Placement.from_options(options),
                vision_cache=cache_directory(options),
            )
        prepared = [render_split(loaded.renderer, split) for split in evaluated]  # data errors first
        per_sample[role] = {
            rendered.split.name: evaluate_split(
                loaded,
                rendered,
                role=label,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                tracker=tracker,
                layer_cache=layer_cache if role in cached_roles else None,
            )
            for rendered in prepared
        }
        if options.protocol is not None:
            from kvwctl.protocols import run_protocol

            protocol_values[role] = run_protocol(
                options.protocol, loaded, per_sample[role], batch_size=batch_size, tracker=tracker, role=label
            )
        del loaded
        _release_memory(torch_device)

    results: Results = {
        role: {
            split.name: {
                metric: summarize([result.metrics[metric] for result in per_sample[role][split.name]])
                for metric in METRICS
            }
            for split in evaluated
        }
        for role in roles
    }
    outcomes = check_requirements(plan.requirements, results)
    protocol: dict[str, Any] = {}
    if options.protocol is not None:
        from kvwctl.protocols import protocol_section

        protocol = protocol_section(options.protocol, protocol_values)
    # The report names the per-sample file's hash: both are renamed into place, or neither.
    with committed_together() as outputs:
        samples_file = outputs.file(samples_out, force=options.force)
        _write_samples(samples_file, per_sample, redactor)
        report = EvalReport(
            models=model_info,
            data={split.name: replace(split.describe(), path=redactor.text(str(split.path))) for split in evaluated},
            settings=_settings(max_new_tokens, batch_size, torch_device, dtype),
            results=results,
            requirements=outcomes,
            samples_sha256=file_sha256(samples_file),
            redaction=redactor.record(),
            protocol=protocol,
        )
        write_json_atomically(outputs.file(out, force=options.force), report.to_json())
    return EvalResult(path=out, samples_path=samples_out, report=report)


def shared_layer_cache(
    checkpoints: dict[str, Checkpoint], device: torch.device, dtype: str
) -> tuple[LayerInputCache | None, set[str]]:
    """A layer cache for the models that run the same layers below some decoder layer (an applied
    checkpoint and its original: the first layer in which they differ), and the roles that share it."""
    from kvwctl.layercache import LayerInputCache, first_difference, prefix_digest, supports

    models = list(checkpoints.values())
    if not all(supports(model) for model in models):
        return None, set()
    firsts = [first_difference(models[0], other) for other in models[1:]]
    shared = [first for first in firsts if first is not None and first > 0]
    if not shared:
        return None, set()
    first = min(shared)
    digests = {
        role: prefix_digest(checkpoint, first, select_dtype(dtype, device, checkpoint.config), device)
        for role, checkpoint in checkpoints.items()
    }
    roles = {role for role, digest in digests.items() if list(digests.values()).count(digest) > 1}
    return LayerInputCache(first), roles


def _describe_model(checkpoint: Checkpoint, torch_dtype: torch.dtype) -> ModelInfo:
    return ModelInfo(
        reference=checkpoint.source.reference,
        revision=checkpoint.source.revision,
        fingerprint=checkpoint.fingerprint(),
        model_type=checkpoint.architecture.model_type,
        dtype=str(torch_dtype).removeprefix("torch."),
    )


def _settings(max_new_tokens: int, batch_size: int, device: torch.device, dtype: str) -> EvalSettings:
    from importlib.metadata import version

    return EvalSettings(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=str(device),
        dtype=dtype,
        decoding="greedy",
        seed=SEED,
        rouge="rougeL, use_stemmer=True",
        keyword_match="normalised whole words; fraction of keywords (or the answer) found",
        versions={name: version(name) for name in ("torch", "transformers", "rouge-score")},
    )


def _write_samples(
    path: Path, per_sample: dict[str, dict[str, list[SampleResult]]], redactor: Redactor | None = None
) -> None:
    """One record per role, split and sample; redacted: the id hashed, no question, answer,
    generation or chosen option (the metrics, mc correctness included, are kept)."""
    import jsonlines

    redactor = redactor or Redactor.create(enabled=False)

    def dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    with jsonlines.open(path, mode="w", dumps=dumps) as writer:
        for role, splits in per_sample.items():
            for split, results in splits.items():
                for result in results:
                    sample = result.sample
                    texts: dict[str, Any] = {
                        "question": sample.question,
                        "answer": sample.answer,
                        "generation": result.generation,
                    }
                    record: dict[str, Any] = {
                        "role": role,
                        "split": split,
                        "id": redactor.text(sample.id),
                        **({} if redactor.enabled else texts),
                        **{name: finite_or_none(value) for name, value in result.metrics.items()},
                        **({} if redactor.enabled else {"mc_choice": result.mc_choice}),
                        "non_finite": [
                            name
                            for name, value in result.metrics.items()
                            if value is not None and finite_or_none(value) is None
                        ],
                        **({"redacted": True} if redactor.enabled else {}),
                    }
                    writer.write(record)
