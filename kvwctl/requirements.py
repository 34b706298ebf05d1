"""Eval's requirements (``--require``): a metric of the evaluated model compared with a threshold.

    >>> requirement = parse_requirement("retain.keyword_acc >= 0.95*baseline")
    >>> (requirement.split, requirement.metric, requirement.operator, requirement.factor, requirement.role)
    ('retain', 'keyword_acc', '>=', 0.95, 'baseline')

The grammar is ``SPLIT.METRIC OP EXPR``, ``OP`` one of ``>= <= > <``, ``EXPR`` a number or
``[NUMBER*]baseline|reference [+|- NUMBER]`` (see ``parse_requirement``). The left side is always
the ``--model``'s mean of that split and metric; ``baseline`` and ``reference`` stand for the same
split and metric of that model. Requirements are checked in three steps: their syntax and metric
when parsed, their splits and models before any data is read (``validate_requirements``), that
their metric has values once the splits are loaded (``check_requirements_have_values``) — all before
any model work — and finally their outcome on the results (``check_requirements``). Failing one is
left to the caller (the CLI exits 1). A requirement fails, whatever its operator, when its value or
threshold is not a finite number, and also when the model it reads has *any* non-finite metric on
that split: a model that gives NaN log-probabilities generates garbage, and garbage has a low
keyword accuracy, so ``forget.keyword_acc <= 0.1`` must not pass on it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvwctl.errors import KvwError, UsageError
from kvwctl.metrics import METRICS, Results

_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_REQUIREMENT = re.compile(
    r"^(?P<split>[^\s.<>=]+)\.(?P<metric>[^\s<>=]+)\s*(?P<operator>>=|<=|>|<)\s*(?P<expression>.*)$"
)
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
REQUIREMENT_SYNTAX = (
    "SPLIT.METRIC OP EXPR, OP one of >= <= > <, EXPR a number or [NUMBER*]baseline|reference [+|- NUMBER]"
)


@dataclass(frozen=True)
class Requirement:
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

    def threshold(self, results: Results) -> float | None:
        """The threshold; None when the compared model's value is not a finite number."""
        if self.role is None:
            return self.constant
        value = _metric_mean(results, self.role, self.split, self.metric)
        if value is None:
            return None
        threshold = self.factor * value + self.constant
        return threshold if math.isfinite(threshold) else None


@dataclass(frozen=True)
class RequirementOutcome:
    requirement: Requirement
    value: float | None  # None: the model's value is not a finite number (the requirement failed)
    threshold: float | None  # None: the threshold is not a finite number (the requirement failed)
    passed: bool

    def describe(self) -> str:
        """``TEXT passed: VALUE OP THRESHOLD``, or ``TEXT failed: …`` with the negated operator."""
        requirement = self.requirement
        if self.value is None or self.threshold is None:
            role = "model" if self.value is None else requirement.role
            return (
                f"{requirement.text} failed: the {role} has non-finite (NaN or infinite) results on "
                f"{requirement.split}, so {requirement.split}.{requirement.metric} cannot be trusted"
            )
        if self.passed:
            return f"{self.requirement.text} passed: {self.value:.6g} {self.requirement.operator} {self.threshold:.6g}"
        negation = _NEGATIONS[self.requirement.operator]
        return f"{self.requirement.text} failed: {self.value:.6g} {negation} {self.threshold:.6g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "requirement": self.requirement.text,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
        }


def parse_requirement(text: str) -> Requirement:
    """Parse ``SPLIT.METRIC OP EXPR``; a malformed requirement or an unknown metric is a usage error.

    ``EXPR`` is a number (``0.1``, ``-2.5``) or ``[NUMBER*]baseline|reference [+|- NUMBER]``
    (``0.95*baseline``, ``reference + 0.1``), where baseline/reference stand for the same split
    and metric of that model. Examples: ``retain.keyword_acc >= 0.95*baseline``,
    ``forget.keyword_acc <= 0.10``, ``forget.keyword_acc <= reference + 0.1``.
    """
    stripped = text.strip()
    match = _REQUIREMENT.match(stripped)
    expression = _EXPRESSION.match(match["expression"].strip()) if match else None
    if match is None or expression is None:
        raise UsageError(
            f"invalid --require {text!r}", hint=f"write {REQUIREMENT_SYNTAX}, e.g. 'forget.keyword_acc <= 0.1'"
        )
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
    if not (math.isfinite(constant) and math.isfinite(factor)):
        raise UsageError(f"invalid --require {text!r}: a number is too large", hint="numbers must be finite")
    return Requirement(
        text=stripped,
        split=match["split"],
        metric=match["metric"],
        operator=match["operator"],
        constant=constant,
        factor=factor,
        role=expression["role"],
    )


def validate_requirements(requirements: Sequence[Requirement], splits: Sequence[str], roles: Sequence[str]) -> None:
    """Refuse requirements that name a split that is not evaluated or a model that was not given."""
    for requirement in requirements:
        if requirement.split not in splits:
            raise UsageError(
                f"--require {requirement.text!r}: split {requirement.split!r} is not evaluated",
                hint=f"evaluated splits: {', '.join(splits)}",
            )
        if requirement.role is not None and requirement.role not in roles:
            raise UsageError(
                f"--require {requirement.text!r} compares with the {requirement.role}, "
                f"but no --{requirement.role} was given"
            )


def check_requirements_have_values(requirements: Sequence[Requirement], with_options: Mapping[str, int]) -> None:
    """Refuse a requirement on mc_acc of a split where no sample has options (``with_options``: split -> count).

    Only mc_acc can have no values: every sample has the other metrics.
    """
    for requirement in requirements:
        if requirement.metric == "mc_acc" and with_options[requirement.split] == 0:
            raise KvwError(
                f"--require {requirement.text!r}: no sample of {requirement.split} has options, so mc_acc has no value",
                hint="add options to the samples, or require another metric",
            )


def check_requirements(requirements: Sequence[Requirement], results: Results) -> list[RequirementOutcome]:
    """The outcome of every requirement on ``results[role][split][metric]``."""
    outcomes = []
    for requirement in requirements:
        value = _metric_mean(results, "model", requirement.split, requirement.metric)
        threshold = requirement.threshold(results)
        passed = value is not None and threshold is not None and _OPERATORS[requirement.operator](value, threshold)
        outcomes.append(RequirementOutcome(requirement, value, threshold, passed))
    return outcomes


def _metric_mean(results: Results, role: str, split: str, metric: str) -> float | None:
    """The mean of a metric; None when any metric of ``role`` on ``split`` has a non-finite value."""
    summary = results[role][split][metric]
    if any(other.non_finite for other in results[role][split].values()):
        return None
    if summary.mean is None:
        raise KvwError(f"{split}.{metric} of the {role} has no value: no sample of {split} has it")
    return summary.mean
