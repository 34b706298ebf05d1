"""``tune.json`` (format ``kvwctl.tune/1``): every trial, the frontier, the selection per fold.

Keys, in file order: ``format``, ``tool_version``, ``model`` and ``reference_model`` (reference,
revision, fingerprint), ``data`` (retain, forget and evaluation files with their sha256, and the
samples per fold), ``settings``, ``space`` (the axes searched), ``requirements`` and ``objective``,
``profiles`` (per positions mode, the cached profile files and their sha256), ``baseline`` and
``reference`` (their results), ``trials`` (per trial: its settings, the γ used, the layers, the
vectors with E > 0, the mean gate, whether it was generated, and its results), ``frontier`` and
``generated`` (trial numbers), ``sampled`` (with ``--search optuna``: the trials in the order TPE
proposed them; null for a grid), ``selection`` (per fold: the trial chosen on it, or the closest,
the constraints' outcomes there, and the results on the held-out folds) and ``chosen`` (the trial
chosen on fold 1, or on all samples with one fold; null if none met the constraints) and
``chosen_layers`` (per edited layer of that trial, or of the closest: vectors, those with E > 0,
their mean E, mean and min gate).

Results are ``{"all": R, "folds": {"1": R, ...}}`` with ``R`` as eval's report has them: split ->
metric -> ``{"mean", "count"}``. A trial that was only screened has ``answer_logprob`` and
``mc_acc``; a generated one also ``rougeL_recall``, ``rougeL_f1`` and ``keyword_acc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvwctl import __version__
from kvwctl.files import file_sha256
from kvwctl.metrics import Results
from kvwctl.selection import Choice
from kvwctl.trials import summaries_json

if TYPE_CHECKING:
    from kvwctl.checkpoint import Checkpoint
    from kvwctl.tune import TunePlan

TUNE_FORMAT = "kvwctl.tune/1"


def _results_json(results: Results, role: str) -> dict[str, Any] | None:
    return summaries_json(results[role]) if role in results else None


def _model(checkpoint: Checkpoint | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    return {**checkpoint.source.describe(), "fingerprint": checkpoint.fingerprint()}


def tune_report(
    tuner: TunePlan, *, front: Sequence[int], generated: Sequence[int], choices: Sequence[Choice]
) -> dict[str, Any]:
    from kvwctl.tune import profile_path

    folds = list(tuner.fold_indices) if tuner.options.folds > 1 else []

    def by_fold(number: int | None, role: str) -> dict[str, Any]:
        return {
            "all": _results_json(tuner.results(number), role),
            "folds": {str(fold): _results_json(tuner.results(number, fold), role) for fold in folds},
        }

    trials = []
    for trial in tuner.trials:
        scored = trial.problem is None and f"screen {trial.number}" in tuner.log.done
        trials.append(
            {
                "trial": trial.number,
                **trial.settings.to_json(),
                "gamma_used": trial.gamma,
                "layer_list": trial.layers,
                "exposed_vectors": trial.exposed,
                "mean_gate_reached": trial.mean_gate,
                "problem": trial.problem,
                "frontier": trial.number in front,
                "generated": f"generation {trial.number}" in tuner.log.done,
                "results": by_fold(trial.number, "model") if scored else None,
            }
        )
    selection = []
    for choice in choices:
        entry = choice.to_json()
        shown = choice.trial if choice.trial is not None else choice.closest
        if choice.fold is not None and shown is not None:
            held = tuner.results_on(shown, tuner.held_out(choice.fold))
            entry["held_out"] = {
                "folds": [fold for fold in folds if fold != choice.fold],
                **{role: _results_json(held, role) for role in ("model", "baseline", "reference")},
            }
        selection.append(entry)
    space: dict[str, Any] = {
        "search": tuner.options.search,
        "positions": tuner.modes,
        "forget_batch_size": ["all" if size is None else size for size in tuner.sizes],
        "layers": list(dict.fromkeys(trial.settings.layers for trial in tuner.trials)),
        **({"mean_gate": tuner.strengths["mean_gates"]} if "mean_gates" in tuner.strengths else {}),
        **({"gamma": tuner.strengths["gammas"]} if "gammas" in tuner.strengths else {}),
    }
    profiles = {
        mode: {
            split: {"path": str(path), "sha256": file_sha256(path)}
            for split in ("retain", "forget")
            for path in [profile_path(tuner.inputs.profiles_dir, split, mode)]
        }
        for mode in tuner.modes
    }
    shown = choices[0].trial if choices and choices[0].trial is not None else (choices[0].closest if choices else None)
    data = dict(tuner.data_info)
    data["fold_samples"] = {
        name: {str(fold): len(indices[name]) for fold, indices in tuner.fold_indices.items()}
        for name in tuner.evaluated
    }
    return {
        "format": TUNE_FORMAT,
        "tool_version": __version__,
        "model": _model(tuner.checkpoint),
        "reference_model": _model(tuner.reference),
        "data": data,
        "settings": tuner.recorded_settings,
        "space": space,
        "requirements": list(tuner.options.require),
        "objective": tuner.objective.text,
        "profiles": profiles,
        "baseline": by_fold(None, "baseline"),
        "reference": by_fold(None, "reference") if tuner.reference is not None else None,
        "trials": trials,
        "frontier": list(front),
        "generated": list(generated),
        "sampled": getattr(tuner, "sampled", None),
        "selection": selection,
        "chosen": choices[0].trial if choices else None,
        "chosen_layers": _layers(tuner, shown) if shown is not None else None,
    }


def _layers(tuner: TunePlan, number: int) -> list[dict[str, Any]]:
    """Per edited layer of trial ``number``: its vectors, those with E > 0, their mean E and mean gate."""
    from kvwctl.method import gates

    trial = tuner.trials[number]
    exposures = tuner.exposures[trial.exposure_key]
    rows = []
    for layer in trial.layers:
        exposed = exposures[layer][exposures[layer] > 0]
        gate = gates(exposed, trial.gamma or 0.0)
        rows.append(
            {
                "layer": layer,
                "vectors": exposures[layer].numel(),
                "exposed": exposed.numel(),
                "mean_exposure": float(exposed.double().mean()) if exposed.numel() else 0.0,
                "mean_gate": float(gate.double().mean()) if exposed.numel() else 1.0,
                "min_gate": float(gate.min()) if exposed.numel() else 1.0,
            }
        )
    return rows
