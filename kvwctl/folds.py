"""Evaluation folds: a split's samples in N disjoint parts by a stable hash of their group.

    >>> from kvwctl.data import Sample
    >>> samples = [Sample(id=f"q{i}", question="?", answer="a", extra={"person": f"p{i // 2}"}) for i in range(6)]
    >>> assign_folds(samples, 2, group_by="person")  # each person's two questions stay together
    [1, 1, 1, 1, 2, 2]

The paper selects settings on one half of the evaluation data and reports on the other, both ways.
A sample's **group** is the value of its ``group_by`` field (``person``: one person's questions
stay in one fold, so a setting is never chosen on questions about the very people it is reported
on), or its ``id`` without ``group_by``. Groups are ordered by the sha256 of their value (stable
across runs, machines and file order) and dealt, in that order, to the fold with the fewest
samples so far (ties: the lowest fold), so folds are balanced in samples, not just in groups.
Folds are numbered from 1. Used by ``kvwctl tune --folds`` and ``kvwctl eval --fold K/N``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kvwctl.data import Sample
from kvwctl.errors import DataError, UsageError


def group_of(sample: Sample, group_by: str | None) -> str:
    """The group a sample belongs to: its ``group_by`` field as text, or its id."""
    if group_by is None:
        return sample.id
    if group_by == "id":
        return sample.id
    value = sample.extra.get(group_by)
    if value is None or isinstance(value, dict | list):
        found = "has no" if value is None else "has a non-scalar"
        raise DataError(f"{sample.source}: sample {sample.id!r} {found} field {group_by!r} to group folds by")
    return str(value)


def assign_folds(samples: Sequence[Sample], folds: int, *, group_by: str | None) -> list[int]:
    """The fold (1..folds) of every sample, in sample order (see the module docstring)."""
    if folds < 1:
        raise UsageError(f"--folds must be at least 1, got {folds}")
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(group_of(sample, group_by), []).append(index)
    if folds > 1 and len(groups) < folds:
        raise DataError(
            f"{len(groups)} group{'s' if len(groups) != 1 else ''} cannot fill {folds} folds",
            hint="use fewer --folds or a finer --group-by",
        )
    order = sorted(groups, key=lambda group: hashlib.sha256(group.encode("utf-8")).hexdigest())
    sizes = [0] * folds
    assignment = [0] * len(samples)
    for group in order:
        fold = min(range(folds), key=lambda index: (sizes[index], index))
        for index in groups[group]:
            assignment[index] = fold + 1
        sizes[fold] += len(groups[group])
    return assignment


def parse_fold(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N), 1 <= K <= N."""
    left, slash, right = text.partition("/")
    if slash and left.strip().isdigit() and right.strip().isdigit():
        fold, folds = int(left), int(right)
        if 1 <= fold <= folds:
            return fold, folds
    raise UsageError(f"invalid --fold {text!r}", hint="use K/N, e.g. 2/2 for the second of two folds")
