"""``kvwctl tune``: find the setting that forgets most under the retain constraint, the paper's way.

    kvwctl tune --mean-gate 0.995:0.6:8 --layers 14:27,8:27 --forget-batch-size 7,all \\
                --require 'retain.keyword_acc >= 0.95*baseline' --minimize forget.keyword_acc --folds 2

1. **Profiles** of the retain and forget data, once per positions mode, with the loaded model,
   cached in ``<workdir>/tune-profiles/`` as normal stage files; a cached file is reused when its
   model fingerprint, data hash, positions and batch size match (else it is profiled again).
2. **Models scored once**: the reference (``--reference``, loaded first and freed) and the
   baseline (the model before any edit): screen and generation on every evaluation split.
3. **Trials in memory** (``kvwctl.trials``): for each setting the loaded model's down projections
   are weakened exactly as ``apply`` writes them, the trial is screened (teacher-forced, no
   generation) and the weights are restored. No trial edits a layer below the search's lowest,
   so the screen runs only the layers from there on (``kvwctl.layercache``: each batch's input to
   that layer kept from the first pass over it; the scores are the full pass's bit for bit). The exposure is the accessor's
   (``kvwctl.method.batch_accessors`` and ``exposure`` on the cached profiles).
4. **Generation** for the trials that can still win (``kvwctl.selection``: the screen's frontier,
   searched by bisection, ``--generate-top`` trials at most).
5. **Selection** per fold (``kvwctl.folds``): chosen on fold k, reported on the other folds.
   The trial chosen on fold 1 is *the* chosen trial, which ``kvwctl tune --apply OUT`` writes.

Everything finished is appended to the trial log (``kvwctl.tunelog``) so that ``--resume``
continues a killed run, and every number in ``tune.json`` is computed from the log's records, so
a resumed run writes the same bytes as an uninterrupted one. ``tune.json`` (format
``kvwctl.tune/1``, :mod:`kvwctl.tunereport`) has no timestamps.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.artifacts import PROFILE_FORMAT, read_artifact, retain_coefficients
from kvwctl.checkpoint import Checkpoint, open_checkpoint
from kvwctl.data import load_samples
from kvwctl.errors import ArtifactError, KvwError, ModelError, UsageError
from kvwctl.evaluate import EvalSplit, RenderedSplit, load_split, render_split
from kvwctl.files import file_sha256, write_json_atomically
from kvwctl.folds import assign_folds
from kvwctl.layercache import LayerInputCache, prefix_digest, supports
from kvwctl.method import (
    FLOAT32_MAX,
    batch_accessors,
    batch_ranges,
    exposed_mean_gate,
    exposure,
    gamma_for_mean_gate,
    parse_layers,
)
from kvwctl.metrics import Results
from kvwctl.modeling import LoadedModel, load_model, select_device, select_dtype
from kvwctl.options import ProfileOptions, TuneOptions
from kvwctl.outputs import check_outputs
from kvwctl.placement import Placement
from kvwctl.progress import NullTracker, Tracker
from kvwctl.requirements import (
    Requirement,
    check_requirements,
    check_requirements_have_values,
    parse_requirement,
    validate_requirements,
)
from kvwctl.selection import (
    Choice,
    Objective,
    bisect_order,
    frontier,
    needs_generation,
    parse_objective,
    screen_losses,
    select,
)
from kvwctl.source import ModelSpec, resolve_model
from kvwctl.space import (
    TrialSettings,
    batch_sizes,
    gamma_values,
    grid,
    layer_selections,
    mean_gate_values,
    position_modes,
)
from kvwctl.trials import TrialModel, Values, generation_values, screen_values, summaries
from kvwctl.tunelog import TrialLog, inputs_digest

if TYPE_CHECKING:
    import torch

DEFAULT_GAMMAS = "0.01:30:log12"


@dataclass(frozen=True)
class TuneInputs:
    model: ModelSpec
    retain_data: Path
    forget_data: Path
    splits: dict[str, Path]  # evaluation splits, by name
    out: Path  # tune.json
    profiles_dir: Path
    reference: ModelSpec | None = None


@dataclass(frozen=True)
class Trial:
    number: int
    settings: TrialSettings
    gamma: float | None  # the γ given or solved; None when nothing is exposed in its layers
    layers: list[int]
    exposed: int  # vectors with E > 0 in its layers
    mean_gate: float | None  # over those vectors, float32 gates
    problem: str | None = None  # why it was not run

    @property
    def exposure_key(self) -> tuple[str, int | None]:
        return self.settings.positions, self.settings.forget_batch_size


@dataclass(frozen=True)
class TuneResult:
    path: Path
    log_path: Path
    report: dict[str, Any]
    choices: list[Choice]
    applied: Path | None = None  # the checkpoint written with --apply

    @property
    def chosen(self) -> int | None:
        """The trial chosen on the first fold (None: no trial met the constraints)."""
        return self.choices[0].trial

    def failure(self) -> KvwError | None:
        """The error to exit with when a fold has no trial that meets the constraints."""
        missing = [choice for choice in self.choices if choice.trial is None]
        if not missing:
            return None
        choice = missing[0]
        where = f"fold {choice.fold}" if choice.fold is not None else "the evaluation data"
        if choice.closest is None:
            named = "no trial was scored with every metric the constraints need"
        else:
            failed = "; ".join(outcome.describe() for outcome in choice.outcomes if not outcome.passed)
            named = f"the closest is trial {choice.closest}: {failed}"
        return KvwError(
            f"no trial meets the constraints on {where}; {named}",
            hint=f"widen the search (smaller gamma, a mean gate nearer 1, other layers) or relax --require; see {self.path}",
        )


def log_path_for(out: Path) -> Path:
    """``tune.json`` -> ``tune.trials.jsonl``."""
    return out.with_name(f"{out.stem if out.suffix == '.json' else out.name}.trials.jsonl")


def profile_path(directory: Path, split: str, positions: str) -> Path:
    return directory / f"profile-{split}-{positions}.safetensors"


def run_tune(
    inputs: TuneInputs, options: TuneOptions, *, tracker: Tracker | None = None, apply_out: Path | None = None
) -> TuneResult:
    """Search, screen, generate, select and write ``inputs.out`` (see the module docstring); with
    ``apply_out``, write the chosen trial's checkpoint there through ``kvwctl apply``."""
    return execute_tune(plan_tune(inputs, options, apply_out=apply_out), tracker=tracker)


def plan_tune(inputs: TuneInputs, options: TuneOptions, *, apply_out: Path | None = None) -> TunePlan:
    """Every check a tune makes before reading a weight (``--dry-run`` stops here)."""
    return TunePlan(inputs, options, apply_out=apply_out)


def execute_tune(tuner: TunePlan, *, tracker: Tracker | None = None) -> TuneResult:
    """The model work of a planned tune, and ``--apply``."""
    apply_out = tuner.apply_out
    result = tuner.run(tracker or NullTracker())
    if apply_out is None or result.chosen is None:
        return result
    return replace(result, applied=tuner.apply(result.chosen, apply_out))


class TunePlan:
    """One tune run: the checks first, then the model work, then the report."""

    command = "tune"

    def __init__(self, inputs: TuneInputs, options: TuneOptions, *, apply_out: Path | None) -> None:
        self.inputs, self.options, self.apply_out = inputs, options, apply_out
        self.tracker: Tracker = NullTracker()
        self.requirements: list[Requirement] = [parse_requirement(text) for text in options.require]
        self.objective: Objective = parse_objective(options.minimize, options.closest)
        roles = ["model", "baseline", *(["reference"] if inputs.reference else [])]
        if self.objective.kind == "closest" and inputs.reference is None:
            raise UsageError("--closest compares with the oracle: give --reference")
        validate_requirements(self.requirements, list(inputs.splits), roles)
        if self.objective.split not in inputs.splits:
            raise UsageError(f"the objective's split {self.objective.split!r} is not evaluated")
        self.strengths: dict[str, list[float]] = (
            {"mean_gates": mean_gate_values(options.mean_gate)}
            if options.mean_gate
            else {"gammas": gamma_values(options.gamma or DEFAULT_GAMMAS)}
        )
        self.modes, self.sizes = position_modes(options.positions), batch_sizes(options.forget_batch_size)
        self.evaluated: dict[str, EvalSplit] = {name: load_split(name, path) for name, path in inputs.splits.items()}
        with_options = {name: split.with_options for name, split in self.evaluated.items()}
        check_requirements_have_values(self.requirements, with_options)
        self.retain_samples, self.forget_samples = load_samples(inputs.retain_data), load_samples(inputs.forget_data)
        assigned = {
            name: assign_folds(split.samples, options.folds, group_by=options.group_by)
            for name, split in self.evaluated.items()
        }
        self.fold_indices: dict[int, dict[str, list[int]]] = {
            fold: {name: [i for i, f in enumerate(folds) if f == fold] for name, folds in assigned.items()}
            for fold in range(1, options.folds + 1)
        }
        self.checkpoint = open_checkpoint(resolve_model(inputs.model.reference, inputs.model.revision))
        if self.checkpoint.architecture.experts is not None:  # trials weaken dense down projections only
            raise ModelError(
                f"kvwctl tune does not support mixture-of-experts models yet ({self.checkpoint.architecture.model_type})",
                hint="run profile, accessor and apply with chosen --gamma and --layers",
            )
        self.reference: Checkpoint | None = None
        if inputs.reference is not None:
            self.reference = open_checkpoint(resolve_model(inputs.reference.reference, inputs.reference.revision))
        self.settings = grid(
            self.modes, self.sizes, layer_selections(options.layers, self.checkpoint.num_layers), **self.strengths
        )
        self.log_path = log_path_for(inputs.out)
        self._check_outputs()
        self.placement = Placement.from_options(options)
        self.device = select_device(options.device, placement=self.placement)
        self.dtype = select_dtype(options.dtype, self.device, self.checkpoint.config)
        self.recorded_settings: dict[str, Any] = {
            "max_new_tokens": options.max_new_tokens,
            "batch_size": options.batch_size,
            "device": self.device.type,
            **({"device_map": options.device_map} if options.device_map is not None else {}),
            "dtype": str(self.dtype).removeprefix("torch."),
            "folds": options.folds,
            "group_by": options.group_by,
            "generate_top": options.generate_top,
            "search": options.search,
            **({"trials": options.trials, "seed": options.seed} if options.search == "optuna" else {}),
        }
        self.data_info: dict[str, Any] = {
            "retain": {"path": str(inputs.retain_data), "sha256": file_sha256(inputs.retain_data)},
            "forget": {"path": str(inputs.forget_data), "sha256": file_sha256(inputs.forget_data)},
            "eval": {name: split.describe().to_json() for name, split in self.evaluated.items()},
        }

    def facts(self) -> dict[str, Any]:
        """What a dry run prints (``kvwctl.plans``)."""
        from kvwctl.plans import checkpoint_facts, output_facts

        force = self.options.force or self.options.resume
        outputs = [
            output_facts(self.inputs.out, "tune report", force=force),
            output_facts(self.log_path, "trial log", force=self.options.force),
        ]
        if self.apply_out is not None:
            outputs.append(output_facts(self.apply_out, "checkpoint", force=self.options.force))
        return {
            "command": self.command,
            "model": checkpoint_facts(self.checkpoint),
            "reference": checkpoint_facts(self.reference) if self.reference else None,
            "data": self.data_info,
            "trials": len(self.settings),
            "space": {
                "positions": self.modes,
                "forget_batch_size": [size or "all" for size in self.sizes],
                "layers": list(dict.fromkeys(item.layers for item in self.settings)),
                **{key.removesuffix("s"): values for key, values in self.strengths.items()},
            },
            "selection": {"requirements": list(self.options.require), "objective": self.objective.text},
            "settings": self.recorded_settings,
            "outputs": outputs,
        }

    def _placed(self) -> dict[str, Any]:
        """``load_model``'s device map and vision cache, from the options."""
        from kvwctl.visioncache import cache_directory

        return {"placement": self.placement, "vision_cache": cache_directory(self.options)}

    def _check_outputs(self) -> None:
        inputs, options = self.inputs, self.options
        images = [image for split in self.evaluated.values() for sample in split.samples for image in sample.images]
        data = [inputs.retain_data, inputs.forget_data, *inputs.splits.values(), *images]
        models = [*self.checkpoint.input_paths, *(self.reference.input_paths if self.reference else [])]
        # The log is TrialLog's to check (resume, force); tune.json is replaced with --resume.
        check_outputs(files=[inputs.out], inputs=[*models, *data], force=options.force or options.resume)
        check_outputs(files=[self.log_path], inputs=[*models, *data], force=True)
        if self.apply_out is not None:
            check_outputs(directories=[self.apply_out], inputs=[*models, *data, inputs.out], force=options.force)

    def apply(self, number: int, out: Path) -> Path:
        """Write trial ``number``'s checkpoint through ``kvwctl accessor`` and ``kvwctl apply``."""
        from kvwctl.accessor import run_accessor
        from kvwctl.apply import run_apply
        from kvwctl.options import AccessorOptions, ApplyOptions

        trial = self.trials[number]
        assert trial.gamma is not None
        mode, size = trial.exposure_key
        directory = self.inputs.profiles_dir
        accessor = directory / f"accessor-{mode}-{trial.settings.batch_text}.safetensors"
        forget, retain = profile_path(directory, "forget", mode), profile_path(directory, "retain", mode)
        batch = size or len(self.forget_samples)
        run_accessor(forget, retain, accessor, AccessorOptions(batch_size=batch, force=True))
        options = ApplyOptions(
            gamma=trial.gamma, layers=trial.settings.layers, device=self.options.device, force=self.options.force
        )
        tune = {"path": str(self.inputs.out), "sha256": file_sha256(self.inputs.out), "trial": number}
        run_apply(self.inputs.model, accessor, out, options, tracker=self.tracker, tune=tune)
        return out

    # --- the run ---------------------------------------------------------------------------------

    def run(self, tracker: Tracker) -> TuneResult:
        from kvwctl.tunereport import tune_report

        self.tracker = tracker
        self.layer_cache: LayerInputCache | None = None
        self.fingerprint = self.checkpoint.fingerprint()
        digest = inputs_digest(
            {
                "model": self.fingerprint,
                "reference": self.reference.fingerprint() if self.reference else None,
                "data": self.data_info,
                "trials": [item.to_json() for item in self.settings],
                "settings": self.recorded_settings,
            }
        )
        self.log = TrialLog(self.log_path, digest, resume=self.options.resume, force=self.options.force)
        try:
            # No trial edits a layer below the lowest of its selections: each batch's input to that
            # layer is computed once and the trials run from there (kvwctl.layercache); so does the
            # baseline's screen when the reference has the same layers below it.
            first = min(min(parse_layers(item.layers, self.checkpoint.num_layers)) for item in self.settings)
            self.layer_cache = LayerInputCache(first) if supports(self.checkpoint) else None
            if self.reference is not None and "reference" not in self.log.done:
                dtype = select_dtype(self.options.dtype, self.device, self.reference.config)
                shared = prefix_digest(self.reference, first, dtype, self.device) == prefix_digest(
                    self.checkpoint, first, self.dtype, self.device
                )
                with tracker.status(f"Loading {self.reference.source.reference}"):
                    reference = load_model(self.reference, device=self.device, dtype=dtype, **self._placed())
                self.log.write("reference", self._score_whole_model(reference, "reference", cached=shared))
                del reference
                gc.collect()
            with tracker.status(f"Loading {self.checkpoint.source.reference}"):
                loaded = load_model(self.checkpoint, device=self.device, dtype=self.dtype, **self._placed())
            self.exposures = self._exposures(loaded)
            self.prepared = {name: render_split(loaded.renderer, split) for name, split in self.evaluated.items()}
            if "baseline" not in self.log.done:
                self.log.write("baseline", self._score_whole_model(loaded, "baseline"))
            self.model = TrialModel(loaded)
            self.trials = [self._plan(number, item) for number, item in enumerate(self.settings)]
            if self.options.search == "optuna":
                self.sampled = self._search_optuna()
                runnable = sorted(set(self.sampled))
            else:
                self._screen([trial for trial in self.trials if trial.problem is None])
                runnable = [trial.number for trial in self.trials if trial.problem is None]
            if needs_generation(self.requirements, self.objective):
                losses = {
                    number: screen_losses(self.requirements, self.objective, self.results(number))
                    for number in runnable
                }
                front = frontier({number: loss for number, loss in losses.items() if loss is not None})
                order = bisect_order(front, self.options.generate_top, self._generate)
                candidates = sorted(order)
            else:
                front, order, candidates = [], [], runnable
            folds: Sequence[int | None] = list(self.fold_indices) if self.options.folds > 1 else [None]
            choices = [
                select(
                    candidates,
                    lambda number, fold=fold: self.results(number, fold),  # type: ignore[misc]
                    self.requirements,
                    self.objective,
                    fold,
                )
                for fold in folds
            ]
        finally:
            self.log.close()
        report = tune_report(self, front=front, generated=order, choices=choices)
        write_json_atomically(self.inputs.out, report)
        return TuneResult(path=self.inputs.out, log_path=self.log_path, report=report, choices=choices)

    # --- profiles and exposures ------------------------------------------------------------------

    def _exposures(self, loaded: LoadedModel) -> dict[tuple[str, int | None], list[torch.Tensor]]:
        """Per (positions, forget batch size): the exposure E (m,) float32 of every layer."""
        exposures = {}
        for mode in self.modes:
            retain = read_artifact(self._profile(loaded, "retain", mode), PROFILE_FORMAT)
            forget = read_artifact(self._profile(loaded, "forget", mode), PROFILE_FORMAT)
            retain_c = retain_coefficients(retain)
            counts = forget.tensors["count"]  # (samples,)
            for size in self.sizes:
                batches = batch_ranges(counts.numel(), size or counts.numel())
                exposures[mode, size] = [
                    exposure(batch_accessors(forget.layer_tensor(layer, "sum"), counts, retain_c[layer], batches))
                    for layer in range(self.checkpoint.num_layers)
                ]
        return exposures

    def _profile(self, loaded: LoadedModel, split: str, mode: str) -> Path:
        """The cached profile of ``split`` in ``mode``, profiled again unless it matches."""
        from kvwctl.profile import write_profile

        path = profile_path(self.inputs.profiles_dir, split, mode)
        data = self.inputs.retain_data if split == "retain" else self.inputs.forget_data
        if path.is_file():
            try:
                metadata = read_artifact(path, PROFILE_FORMAT).metadata
            except ArtifactError:
                metadata = {}
            wanted = {
                "model_fingerprint": self.fingerprint,
                "data_sha256": file_sha256(data),
                "split": split,
                "positions": mode,
                "dtype": str(self.dtype).removeprefix("torch."),
                "batch_size": str(self.options.batch_size),
            }
            if all(metadata.get(key) == value for key, value in wanted.items()):
                return path
        path.parent.mkdir(parents=True, exist_ok=True)
        options = ProfileOptions(
            split=split, positions=mode, batch_size=self.options.batch_size, device=self.options.device, force=True
        )
        samples = self.retain_samples if split == "retain" else self.forget_samples
        write_profile(loaded, self.fingerprint, samples, data, path, options, tracker=self.tracker)
        return path

    # --- trials ----------------------------------------------------------------------------------

    def _plan(self, number: int, settings: TrialSettings) -> Trial:
        """A trial's γ (given, or solved for its mean gate), its layers and exposed vectors."""
        import torch

        layers = parse_layers(settings.layers, self.checkpoint.num_layers)
        layer_exposures = self.exposures[settings.positions, settings.forget_batch_size]
        selected = torch.cat([layer_exposures[layer] for layer in layers])
        exposed = selected[selected > 0]
        gamma = (
            settings.gamma if settings.gamma is not None else gamma_for_mean_gate(exposed, settings.mean_gate or 1.0)
        )
        if gamma is None or exposed.numel() == 0:
            return Trial(number, settings, None, layers, 0, None, problem="no vector is exposed in these layers")
        largest = float(exposed.double().max())
        if not gamma * largest <= FLOAT32_MAX:
            problem = f"gamma * max E = {gamma * largest:.6g} is beyond the largest float32"
            return Trial(number, settings, gamma, layers, exposed.numel(), None, problem=problem)
        return Trial(number, settings, gamma, layers, exposed.numel(), exposed_mean_gate(exposed, gamma))

    def _weakened(self, trial: Trial) -> Any:
        assert trial.gamma is not None
        return self.model.weakened(self.exposures[trial.exposure_key], trial.gamma, trial.layers)

    def _search_optuna(self) -> list[int]:
        """``--search optuna``: ``--trials`` settings sampled by TPE (seeded) on the screen's losses.

        Each axis is a categorical distribution over its values; a sampled combination is a trial
        of the grid, screened once (a repeat is told the same losses). The objectives are
        :func:`kvwctl.selection.screen_losses`: the objective's proxy and each constraint's. The
        sampler is replayed from the log on ``--resume``, so it proposes the same trials again.
        Returns the trial numbers in the order sampled.
        """
        try:
            import optuna
        except ImportError:
            raise KvwError(
                "--search optuna needs optuna, which is not installed", hint="pip install 'kvwctl[tune]'"
            ) from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        axes: dict[str, list[Any]] = {
            "positions": list(self.modes),
            "forget_batch_size": [size or 0 for size in self.sizes],
            "layers": list(dict.fromkeys(item.layers for item in self.settings)),
            "strength": next(iter(self.strengths.values())),
        }
        by_key = {
            (
                t.settings.positions,
                t.settings.forget_batch_size or 0,
                t.settings.layers,
                t.settings.gamma or t.settings.mean_gate,
            ): t
            for t in self.trials
        }
        distributions: dict[str, optuna.distributions.BaseDistribution] = {
            name: optuna.distributions.CategoricalDistribution(values) for name, values in axes.items()
        }
        losses_count = 1 + len(self.requirements)
        sampler = optuna.samplers.TPESampler(seed=self.options.seed, n_startup_trials=min(8, self.options.trials))
        study = optuna.create_study(directions=["minimize"] * losses_count, sampler=sampler)
        sampled: list[int] = []
        for _ in self.tracker.track(
            range(self.options.trials), total=self.options.trials, description="tune: optuna", unit="trials"
        ):
            asked = study.ask(distributions)
            key = tuple(asked.params[name] for name in axes)
            trial = by_key[key]
            sampled.append(trial.number)
            if trial.problem is not None:
                study.tell(asked, state=optuna.trial.TrialState.FAIL)
                continue
            self._screen([trial], progress=False)
            losses = screen_losses(self.requirements, self.objective, self.results(trial.number))
            if losses is None:
                study.tell(asked, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(asked, losses)
        return sampled

    def _screen(self, trials: Sequence[Trial], *, progress: bool = True) -> None:
        pending = [t for t in trials if f"screen {t.number}" not in self.log.done]
        shown = self.tracker.track(pending, total=len(pending), description="tune: screen", unit="trials")
        for trial in shown if progress else pending:
            with self._weakened(trial):
                values = {
                    name: screen_values(
                        self.model.loaded,
                        prepared,
                        batch_size=self.options.batch_size,
                        tracker=self.tracker,
                        description=f"trial {trial.number}: {name}",
                        layer_cache=self.layer_cache,
                    )
                    for name, prepared in self.prepared.items()
                }
            self.log.write(f"screen {trial.number}", {"values": values})

    def _generate(self, number: int) -> bool:
        """Generate trial ``number`` (unless the log has it); whether it meets the constraints on all samples."""
        key = f"generation {number}"
        if key not in self.log.done:
            with self._weakened(self.trials[number]):
                record = self._generations(self.model.loaded, f"trial {number}")
            self.log.write(key, record)
        outcomes = check_requirements(self.requirements, self.results(number))
        return all(outcome.passed for outcome in outcomes)

    def _generations(self, loaded: LoadedModel, label: str) -> dict[str, Any]:
        texts, values = {}, {}
        for name, prepared in self.prepared_for(loaded).items():
            texts[name], values[name] = generation_values(
                loaded,
                prepared,
                max_new_tokens=self.options.max_new_tokens,
                batch_size=self.options.batch_size,
                tracker=self.tracker,
                description=f"{label}: {name} generate",
            )
        return {"values": values, "generations": texts}

    def prepared_for(self, loaded: LoadedModel) -> dict[str, RenderedSplit]:
        if loaded.checkpoint is self.checkpoint:
            return self.prepared
        return {name: render_split(loaded.renderer, split) for name, split in self.evaluated.items()}

    def _score_whole_model(self, loaded: LoadedModel, role: str, *, cached: bool = True) -> dict[str, Any]:
        """Screen and generation of a model as it is (the baseline or the reference); ``cached``: its
        screen goes through the layer cache."""
        prepared = self.prepared_for(loaded)
        cache = self.layer_cache if cached else None
        screen = {
            name: screen_values(
                loaded,
                split,
                batch_size=self.options.batch_size,
                tracker=self.tracker,
                description=f"{role}: {name}",
                layer_cache=cache,
            )
            for name, split in prepared.items()
        }
        generation = self._generations(loaded, role)
        return {
            "values": {name: {**screen[name], **generation["values"][name]} for name in screen},
            "generations": generation["generations"],
        }

    # --- results ---------------------------------------------------------------------------------

    def values(self, key: str) -> Values:
        """Per-sample values of a log entry (a trial's screen merged with its generation, if any)."""
        if key in ("baseline", "reference"):
            return {name: dict(metrics) for name, metrics in self.log.done[key]["values"].items()}
        number = key.removeprefix("screen ")
        merged: Values = {name: dict(metrics) for name, metrics in self.log.done[key]["values"].items()}
        generation = self.log.done.get(f"generation {number}")
        if generation is not None:
            for name, metrics in generation["values"].items():
                merged[name].update(metrics)
        return merged

    def results(self, number: int | None, fold: int | None = None) -> Results:
        """Eval-style results of trial ``number`` (None: none) with the baseline and reference,
        on ``fold`` (None: every evaluation sample)."""
        return self.results_on(number, None if fold is None else self.fold_indices[fold])

    def held_out(self, fold: int) -> dict[str, list[int]]:
        """The samples of every fold but ``fold``, per split, in sample order."""
        others = [other for other in self.fold_indices if other != fold]
        return {
            name: sorted(index for other in others for index in self.fold_indices[other][name])
            for name in self.evaluated
        }

    def results_on(self, number: int | None, indices: dict[str, list[int]] | None) -> Results:
        results: Results = {}
        if number is not None:
            results["model"] = summaries(self.values(f"screen {number}"), indices)
        for role in ("baseline", "reference"):
            if role in self.log.done:
                results[role] = summaries(self.values(role), indices)
        return results
