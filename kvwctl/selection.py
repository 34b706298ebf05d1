"""How ``kvwctl tune`` chooses: constraints, an objective, the screen's frontier, folds.

* **Constraints** are eval's requirements (``kvwctl.requirements``): ``model`` is the trial,
  ``baseline`` the model before unlearning, ``reference`` the oracle (``--reference``).
* The **objective** is ``minimize SPLIT.METRIC``, ``maximize SPLIT.METRIC`` or
  ``closest SPLIT.METRIC:reference`` (the MLLMU protocol: as close to the oracle as possible);
  :meth:`Objective.loss` is lower-is-better in every case.
* The **screen** scores every trial without generating (``answer_logprob``, ``mc_acc``). A
  generation metric is screened through its split's ``answer_logprob`` (its *proxy*); a screen
  metric is its own proxy. The screen's **frontier** is the set of trials that no other trial beats
  on every proxy at once (the objective's, and each constraint's in its direction).
* **Which trials generate** (:func:`bisect_order`): the frontier ordered by the objective's proxy,
  most forgetting first, is searched by bisection for the first trial that meets the constraints
  on all evaluation samples (assuming that forgetting more costs more retain, true along a
  frontier up to noise), then the budget left goes to that trial's neighbours. Only trials with
  every metric the selection reads are candidates.
* **Selection on a fold** (:func:`select`): among the candidates that meet every constraint on
  that fold, the lowest objective loss (ties: the lowest trial number). If none meets them, the
  candidate with the smallest relative violation is named as the closest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvwctl.errors import UsageError
from kvwctl.metrics import METRICS, Results
from kvwctl.requirements import Requirement, RequirementOutcome, check_requirements
from kvwctl.trials import SCREEN_METRICS


@dataclass(frozen=True)
class Objective:
    kind: str  # minimize, maximize or closest
    split: str
    metric: str

    @property
    def text(self) -> str:
        suffix = ":reference" if self.kind == "closest" else ""
        return f"{self.kind} {self.split}.{self.metric}{suffix}"

    def loss(self, results: Results, metric: str | None = None) -> float | None:
        """Lower is better; None when a value it needs is missing or not finite."""
        metric = metric or self.metric
        value = _mean(results, "model", self.split, metric)
        if value is None:
            return None
        if self.kind == "minimize":
            return value
        if self.kind == "maximize":
            return -value
        reference = _mean(results, "reference", self.split, metric)
        return None if reference is None else abs(value - reference)


def parse_objective(minimize: str | None, closest: str | None) -> Objective:
    """``--minimize SPLIT.METRIC`` or ``--closest SPLIT.METRIC:reference`` (default: minimise forget.keyword_acc)."""
    if closest is not None:
        target, colon, role = closest.rpartition(":")
        if not colon or role.strip() != "reference":
            raise UsageError(f"invalid --closest {closest!r}", hint="use SPLIT.METRIC:reference")
        kind, text = "closest", target
    else:
        kind, text = "minimize", minimize or "forget.keyword_acc"
    split, dot, metric = text.strip().partition(".")
    if not dot or not split or metric not in METRICS:
        raise UsageError(f"invalid objective {text!r}", hint=f"use SPLIT.METRIC, METRIC one of {', '.join(METRICS)}")
    return Objective(kind=kind, split=split, metric=metric)


def proxy(metric: str) -> str:
    """The screen metric that stands for ``metric`` in the screen."""
    return metric if metric in SCREEN_METRICS else "answer_logprob"


def needs_generation(requirements: Sequence[Requirement], objective: Objective) -> bool:
    return any(metric not in SCREEN_METRICS for metric in [objective.metric, *(r.metric for r in requirements)])


def screen_losses(requirements: Sequence[Requirement], objective: Objective, results: Results) -> list[float] | None:
    """A trial's lower-is-better screen values: the objective's proxy, then each constraint's."""
    losses = [objective.loss(results, proxy(objective.metric))]
    for requirement in requirements:
        value = _mean(results, "model", requirement.split, proxy(requirement.metric))
        sign = 1.0 if requirement.operator in ("<=", "<") else -1.0
        losses.append(None if value is None else sign * value)
    return None if any(loss is None for loss in losses) else [float(loss) for loss in losses if loss is not None]


def frontier(losses: dict[int, list[float]]) -> list[int]:
    """The trials no other trial beats on every loss (lower is better), ordered by the first loss
    (ties: trial number)."""

    def beats(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))

    front = [trial for trial, mine in losses.items() if not any(beats(other, mine) for other in losses.values())]
    return sorted(front, key=lambda trial: (losses[trial][0], trial))


def bisect_order(order: Sequence[int], budget: int, feasible: Callable[[int], bool]) -> list[int]:
    """The trials of ``order`` to generate, in the order they are generated (see the module docstring).

    ``feasible(trial)`` generates the trial and says whether it meets the constraints.
    """
    done: list[int] = []
    verdict: dict[int, bool] = {}

    def visit(index: int) -> bool:
        if index not in verdict:
            done.append(order[index])
            verdict[index] = feasible(order[index])
        return verdict[index]

    low, high, best = 0, len(order) - 1, None
    while low <= high and len(done) < budget:
        middle = (low + high) // 2
        if visit(middle):
            best, high = middle, middle - 1
        else:
            low = middle + 1
    centre = best if best is not None else min(low, len(order) - 1)
    for distance in range(1, len(order)):
        for index in (centre - distance, centre + distance):
            if len(done) >= budget:
                return done
            if 0 <= index < len(order):
                visit(index)
    return done


@dataclass(frozen=True)
class Choice:
    """The selection on one fold: the trial chosen (None if no candidate meets the constraints)."""

    fold: int | None  # None: selected on all samples (--folds 1)
    trial: int | None
    closest: int | None  # with no trial chosen, the one that came closest
    outcomes: list[RequirementOutcome]  # of the chosen (or closest) trial on the selection fold
    loss: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "trial": self.trial,
            "closest": self.closest,
            "objective_loss": self.loss,
            "requirements": [outcome.to_json() for outcome in self.outcomes],
        }


def select(
    candidates: Sequence[int],
    results: Callable[[int], Results],
    requirements: Sequence[Requirement],
    objective: Objective,
    fold: int | None,
) -> Choice:
    """The best candidate on one fold under the constraints (see the module docstring)."""
    best: tuple[float, int] | None = None
    nearest: tuple[float, int] | None = None
    outcomes_of: dict[int, list[RequirementOutcome]] = {}
    for trial in candidates:
        trial_results = results(trial)
        outcomes = check_requirements(requirements, trial_results)
        outcomes_of[trial] = outcomes
        loss = objective.loss(trial_results)
        if all(outcome.passed for outcome in outcomes) and loss is not None:
            if best is None or (loss, trial) < best:
                best = (loss, trial)
        else:
            violation = sum(_violation(outcome) for outcome in outcomes)
            if nearest is None or (violation, trial) < nearest:
                nearest = (violation, trial)
    if best is not None:
        return Choice(fold=fold, trial=best[1], closest=None, outcomes=outcomes_of[best[1]], loss=best[0])
    closest = nearest[1] if nearest is not None else None
    outcomes = outcomes_of.get(closest, []) if closest is not None else []
    return Choice(fold=fold, trial=None, closest=closest, outcomes=outcomes, loss=None)


def _violation(outcome: RequirementOutcome) -> float:
    """How far a requirement is from passing, relative to its threshold (0 when it passes)."""
    if outcome.passed:
        return 0.0
    if outcome.value is None or outcome.threshold is None:
        return math.inf
    return abs(outcome.value - outcome.threshold) / max(abs(outcome.threshold), 1e-9)


def _mean(results: Results, role: str, split: str, metric: str) -> float | None:
    summary = results.get(role, {}).get(split, {}).get(metric)
    if summary is None or summary.mean is None or not math.isfinite(summary.mean):
        return None
    return summary.mean
