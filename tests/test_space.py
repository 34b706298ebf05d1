"""tune's search space, the γ solved for a mean gate, the fold split, and eval --fold."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import invoke

from kvwctl import folds, space
from kvwctl.data import Sample
from kvwctl.errors import DataError, UsageError
from kvwctl.method import exposed_mean_gate, gamma_for_mean_gate
from kvwctl.selection import bisect_order, frontier


def test_gamma_and_mean_gate_ranges() -> None:
    assert space.gamma_values("0.01:30:log12")[0] == 0.01 and space.gamma_values("0.01:30:log12")[-1] == 30.0
    values = space.gamma_values("0.01:30:log12")
    assert len(values) == 12
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)  # evenly spaced in log space
    assert space.gamma_values("0.1,0.3,0.1") == [0.1, 0.3]
    assert space.mean_gate_values("0.995:0.6:8") == [
        0.995,
        0.938571,
        0.882143,
        0.825714,
        0.769286,
        0.712857,
        0.656429,
        0.6,
    ]
    for bad in ("0", "-1", "a", "1:2", "1:2:0", "0:1:log3"):
        with pytest.raises(UsageError):
            space.gamma_values(bad)
    for bad in ("1", "0", "0.5:1.2:3"):
        with pytest.raises(UsageError):
            space.mean_gate_values(bad)


def test_layers_batches_positions_and_grid() -> None:
    assert space.layer_selections("14:27,8:27,:", 28) == ["14:27", "8:27", ":"]
    assert space.auto_layers(28) == ["0:27", "0:24", "3:27", "3:24"]  # buckets of 4: starts 0..3, ends 24..27
    assert space.auto_layers(2) == ["0:1"]  # one bucket: the start and end ranges coincide
    with pytest.raises(UsageError, match="out of range"):
        space.layer_selections("0:28", 28)
    assert space.batch_sizes("1,7,all") == [1, 7, None]
    with pytest.raises(UsageError):
        space.batch_sizes("0")
    with pytest.raises(UsageError):
        space.position_modes("answer,everything")
    trials = space.grid(["answer"], [1, None], ["0:1", "1:"], mean_gates=[0.9, 0.8])
    assert len(trials) == 8 and trials[0].mean_gate == 0.9 and trials[-1].forget_batch_size is None


def test_gamma_for_mean_gate_matches_the_closed_form() -> None:
    """E = (1, 2): mean(x, x^2) = t with x = exp(-γ) gives x = (sqrt(1 + 8t) - 1) / 2."""
    exposed = torch.tensor([1.0, 2.0])
    for target in (0.99, 0.75, 0.3, 0.01):
        gamma = gamma_for_mean_gate(exposed, target)
        assert gamma is not None
        assert gamma == pytest.approx(-math.log((math.sqrt(1 + 8 * target) - 1) / 2), rel=1e-7)
        assert exposed_mean_gate(exposed, gamma) == pytest.approx(target, abs=1e-6)
    assert gamma_for_mean_gate(torch.tensor([]), 0.5) is None
    assert gamma_for_mean_gate(exposed, 0.5) == gamma_for_mean_gate(exposed, 0.5)  # deterministic


def _samples(groups: list[str]) -> list[Sample]:
    return [Sample(id=f"q{i}", question="?", answer="a", extra={"person": group}) for i, group in enumerate(groups)]


def test_folds_keep_each_group_together_are_balanced_and_stable() -> None:
    groups = [f"p{index // 7}" for index in range(70)]  # 10 people x 7 questions, as the example
    samples = _samples(groups)
    assigned = folds.assign_folds(samples, 2, group_by="person")
    by_group: dict[str, set[int]] = {}
    for sample, fold in zip(samples, assigned, strict=True):
        by_group.setdefault(sample.extra["person"], set()).add(fold)
    assert all(len(found) == 1 for found in by_group.values())  # never split
    assert sorted([assigned.count(1), assigned.count(2)]) == [35, 35]
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    again = dict(zip((s.id for s in shuffled), folds.assign_folds(shuffled, 2, group_by="person"), strict=True))
    assert again == {
        sample.id: fold for sample, fold in zip(samples, assigned, strict=True)
    }  # file order is irrelevant
    by_id = folds.assign_folds(samples, 2, group_by=None)
    assert sorted([by_id.count(1), by_id.count(2)]) == [35, 35]
    with pytest.raises(DataError, match="has no field 'city'"):
        folds.assign_folds(samples, 2, group_by="city")
    with pytest.raises(DataError, match="cannot fill 3 folds"):
        folds.assign_folds(_samples(["a", "a", "b"]), 3, group_by="person")
    assert folds.parse_fold("2/2") == (2, 2)
    for bad in ("0/2", "3/2", "2", "a/b"):
        with pytest.raises(UsageError):
            folds.parse_fold(bad)


def test_frontier_and_bisection() -> None:
    losses = {0: [1.0, 5.0], 1: [2.0, 4.0], 2: [2.5, 4.5], 3: [3.0, 1.0], 4: [0.5, 9.0]}
    assert frontier(losses) == [4, 0, 1, 3]  # 2 is beaten by 1 on both
    # feasible from the third trial of the order on: bisection finds it, then its neighbours
    order = list(range(10))
    visited = bisect_order(order, 5, lambda trial: trial >= 6)
    assert visited[:4] == [4, 7, 5, 6] and len(visited) == 5
    assert bisect_order(order, 0, lambda trial: True) == []
    assert sorted(bisect_order([3, 1], 9, lambda trial: False)) == [1, 3]


def test_eval_fold_evaluates_only_that_fold(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    records = [{"id": f"p{i // 2}-{i % 2}", "question": f"Where is {i}?", "answer": "Lagos", "person": f"p{i // 2}"}
               for i in range(8)]  # fmt: skip
    split = tmp_path / "split.jsonl"
    split.write_text("".join(json.dumps(record) + "\n" for record in records))
    reports = {}
    for fold in ("1/2", "2/2"):
        out = tmp_path / f"eval-{fold[0]}.json"
        result = invoke(
            "eval", "--model", checkpoints["qwen2"], "--data", f"s={split}", "--fold", fold, "--group-by", "person",
            "--max-new-tokens", "2", "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        reports[fold] = json.loads(out.read_text())
        ids = [
            json.loads(line)["id"] for line in out.with_name(f"eval-{fold[0]}.samples.jsonl").read_text().splitlines()
        ]
        expected = folds.assign_folds(
            [Sample(id=str(r["id"]), question="", answer="", extra=r) for r in records], 2, group_by="person"
        )
        assert ids == [r["id"] for r, f in zip(records, expected, strict=True) if f == int(fold[0])]
        assert reports[fold]["data"]["s"]["fold"] == f"{fold} by person"
    assert reports["1/2"]["data"]["s"]["samples"] + reports["2/2"]["data"]["s"]["samples"] == 8
    bad = invoke("eval", "--model", checkpoints["qwen2"], "--data", f"s={split}", "--fold", "3/2")
    assert bad.exit_code == 2 and "invalid --fold" in bad.stderr
