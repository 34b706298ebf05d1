"""eval's requirements (--require) by hand: the grammar, thresholds, outcomes and their errors."""

from __future__ import annotations

import pytest

from kvwctl.errors import KvwError, UsageError
from kvwctl.metrics import MetricSummary
from kvwctl.requirements import (
    check_requirements,
    check_requirements_have_values,
    parse_requirement,
    validate_requirements,
)


def test_parse_requirement_grammar() -> None:
    requirement = parse_requirement("retain.keyword_acc >= 0.95*baseline")
    assert (requirement.split, requirement.metric, requirement.operator) == ("retain", "keyword_acc", ">=")
    assert (requirement.factor, requirement.role, requirement.constant) == (0.95, "baseline", 0.0)
    requirement = parse_requirement("forget.keyword_acc <= reference + 0.1")
    assert (requirement.role, requirement.factor, requirement.constant) == ("reference", 1.0, 0.1)
    requirement = parse_requirement("forget.rougeL_f1<baseline-0.05")
    assert (requirement.operator, requirement.role, requirement.constant) == ("<", "baseline", -0.05)
    requirement = parse_requirement("  forget.answer_logprob > -2.5e0 ")
    assert (requirement.text, requirement.role, requirement.constant) == ("forget.answer_logprob > -2.5e0", None, -2.5)
    for malformed in (
        "forget.keyword_acc",
        "keyword_acc <= 0.1",
        "forget.keyword_acc => 0.1",
        "forget.keyword_acc == 0.1",
        "forget.keyword_acc <= baseline * 0.9",
        "forget.keyword_acc <= 0.9 baseline",
        "forget.keyword_acc <= oracle",
        "forget.keyword_acc <= ",
    ):
        with pytest.raises(UsageError, match="invalid --require"):
            parse_requirement(malformed)
    with pytest.raises(UsageError, match="unknown metric 'accuracy'") as error:
        parse_requirement("forget.accuracy <= 0.1")
    assert error.value.exit_code == 2


def test_check_requirements_by_hand() -> None:
    results = {
        "model": {"retain": {"keyword_acc": MetricSummary(0.812, 10)}, "forget": {"keyword_acc": MetricSummary(0.25, 4)}},
        "baseline": {"retain": {"keyword_acc": MetricSummary(0.9, 10)}, "forget": {"keyword_acc": MetricSummary(0.75, 4)}},
        "reference": {"forget": {"keyword_acc": MetricSummary(0.2, 4)}},
    }  # fmt: skip
    requirements = [
        parse_requirement("retain.keyword_acc >= 0.95*baseline"),
        parse_requirement("forget.keyword_acc <= 0.10"),
        parse_requirement("forget.keyword_acc <= reference + 0.1"),
        parse_requirement("forget.keyword_acc < 0.5*baseline - 0.1"),
    ]
    outcomes = check_requirements(requirements, results)
    assert [outcome.passed for outcome in outcomes] == [False, False, True, True]
    assert outcomes[0].describe() == "retain.keyword_acc >= 0.95*baseline failed: 0.812 < 0.855"
    assert outcomes[1].describe() == "forget.keyword_acc <= 0.10 failed: 0.25 > 0.1"
    assert outcomes[2].threshold == pytest.approx(0.3)
    assert outcomes[3].threshold == pytest.approx(0.275)
    assert outcomes[2].describe() == "forget.keyword_acc <= reference + 0.1 passed: 0.25 <= 0.3"
    assert outcomes[1].to_json() == {
        "requirement": "forget.keyword_acc <= 0.10", "value": 0.25, "threshold": 0.1, "passed": False,
    }  # fmt: skip


def test_a_requirement_on_a_metric_without_values() -> None:
    results = {"model": {"forget": {"mc_acc": MetricSummary(None, 0)}}}
    with pytest.raises(KvwError, match="forget.mc_acc of the model has no value"):
        check_requirements([parse_requirement("forget.mc_acc >= 0.5")], results)
    requirements = [parse_requirement("forget.keyword_acc <= 0.1"), parse_requirement("retain.mc_acc >= 0.5")]
    check_requirements_have_values(requirements, {"forget": 0, "retain": 3})
    with pytest.raises(KvwError, match="no sample of retain has options, so mc_acc has no value"):
        check_requirements_have_values(requirements, {"forget": 3, "retain": 0})


def test_validate_requirements_names_the_missing_split_or_model() -> None:
    requirements = [parse_requirement("forget.keyword_acc <= reference + 0.1")]
    validate_requirements(requirements, ["forget"], ["model", "reference"])
    with pytest.raises(UsageError, match="split 'forget' is not evaluated") as error:
        validate_requirements(requirements, ["retain"], ["model", "reference"])
    assert error.value.hint == "evaluated splits: retain"
    with pytest.raises(UsageError, match="compares with the reference, but no --reference was given"):
        validate_requirements(requirements, ["forget"], ["model", "baseline"])
