"""Property-based tests (issue 9, class 10): the method's math, the layer parser, the requirement parser.

Hypothesis generates the inputs; example counts stay modest so the suite stays fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvwctl.errors import UsageError
from kvwctl.method import (
    batch_accessors,
    batch_ranges,
    exposure,
    forget_accessor,
    gates,
    parse_layers,
    pooled_coefficient,
    scale_vectors,
)
from kvwctl.metrics import METRICS
from kvwctl.requirements import parse_requirement

SETTINGS = settings(max_examples=200, deadline=None)
coefficients = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@st.composite
def profiles(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sums (samples, m) float64 >= 0 and counts (samples,) > 0."""
    samples, vectors = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    sums = draw(st.lists(coefficients, min_size=samples * vectors, max_size=samples * vectors))
    counts = draw(st.lists(st.integers(1, 50), min_size=samples, max_size=samples))
    return torch.tensor(sums, dtype=torch.float64).reshape(samples, vectors), torch.tensor(counts)


# --- coefficients and the accessor -----------------------------------------------------------


@SETTINGS
@given(profiles())
def test_pooling_is_token_weighted(profile: tuple[torch.Tensor, torch.Tensor]) -> None:
    sums, counts = profile
    pooled = pooled_coefficient(sums, counts)
    means = sums / counts.unsqueeze(1)  # per-sample means
    weighted = (means * counts.unsqueeze(1)).sum(dim=0) / counts.sum()  # weighted by tokens, not by samples
    torch.testing.assert_close(pooled, weighted, rtol=1e-12, atol=1e-9)
    # Splitting a sample's positions in two does not change the pooled coefficient.
    split_sums = torch.cat([sums[:1] / 2, sums[:1] / 2, sums[1:]])
    split_counts = torch.cat([counts[:1] / 2, counts[:1] / 2, counts[1:]])
    torch.testing.assert_close(pooled_coefficient(split_sums, split_counts), pooled, rtol=1e-12, atol=1e-9)


@SETTINGS
@given(profiles(), st.lists(coefficients, min_size=1, max_size=5))
def test_accessor_is_non_negative_and_zero_when_forget_equals_retain(
    profile: tuple[torch.Tensor, torch.Tensor], retain_values: list[float]
) -> None:
    sums, counts = profile
    forget = pooled_coefficient(sums, counts)
    retain = torch.tensor((retain_values * sums.shape[1])[: sums.shape[1]], dtype=torch.float64)
    accessor = forget_accessor(forget, retain)
    assert bool((accessor >= 0).all()) and bool(torch.isfinite(accessor).all())
    assert bool((forget_accessor(forget, forget) == 0).all())
    assert bool((forget_accessor(retain, retain) == 0).all())


@SETTINGS
@given(profiles(), st.integers(1, 7))
def test_exposure_is_the_sum_of_the_batch_accessors(
    profile: tuple[torch.Tensor, torch.Tensor], batch_size: int
) -> None:
    sums, counts = profile
    retain = pooled_coefficient(sums.flip(0), counts) + 1.0
    batches = batch_ranges(sums.shape[0], batch_size)
    assert [index for batch in batches for index in batch] == list(range(sums.shape[0]))
    assert all(len(batch) == batch_size for batch in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    accessors = batch_accessors(sums, counts, retain, batches)
    assert accessors.shape == (len(batches), sums.shape[1])
    for row, batch in zip(accessors, batches, strict=True):
        expected = forget_accessor(
            pooled_coefficient(sums[batch.start : batch.stop], counts[batch.start : batch.stop]), retain
        )
        assert torch.equal(row, expected)
    total = exposure(accessors)
    assert total.dtype == torch.float32
    assert torch.equal(total, accessors.sum(dim=0).float())  # summed in float64, rounded once


# --- gates and scaling -----------------------------------------------------------------------


@SETTINGS
@given(
    st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=8),
    st.floats(0, 1e3, allow_nan=False),
)
def test_gates_are_in_zero_one(exposures: list[float], gamma: float) -> None:
    gate = gates(torch.tensor(exposures), gamma)
    assert gate.dtype == torch.float32
    assert bool(((gate >= 0) & (gate <= 1)).all())
    product = torch.tensor(exposures, dtype=torch.float32) * gamma
    assert bool((gate[product <= 80] > 0).all())  # no underflow to 0: in (0, 1]
    assert bool((gate[torch.tensor(exposures) == 0] == 1).all())


@SETTINGS
@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.sampled_from([0, 1]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.data(),
)
def test_scale_vectors_scales_only_along_the_vector_axis(
    rows: int, columns: int, axis: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    values = data.draw(
        st.lists(st.floats(-100, 100, allow_nan=False, width=16), min_size=rows * columns, max_size=rows * columns)
    )
    weight = torch.tensor(values, dtype=torch.float32).reshape(rows, columns).to(dtype)
    vectors = weight.shape[axis]
    gate = torch.tensor(
        data.draw(st.lists(st.floats(0, 1, width=32), min_size=vectors, max_size=vectors)), dtype=torch.float32
    )
    scaled = scale_vectors(weight, gate, axis=axis)
    assert scaled.dtype == dtype and scaled.shape == weight.shape
    for index in range(vectors):
        original = weight.select(axis, index)
        expected = (original.to(torch.float32) * gate[index]).to(dtype)  # float32 product, rounded once
        assert torch.equal(scaled.select(axis, index), expected)
        if gate[index] == 1:
            assert torch.equal(scaled.select(axis, index), original)
    with pytest.raises(ValueError, match="vectors on axis"):
        scale_vectors(weight, torch.ones(vectors + 1), axis=axis)


# --- layer selections ------------------------------------------------------------------------


def reference_layers(spec: str, num_layers: int) -> list[int] | None:
    """An independent reading of the layer syntax; None where kvwctl must raise a UsageError."""
    selected: set[int] = set()
    if not spec.strip():
        return None
    for item in spec.split(","):
        item = item.strip()
        if not item:
            return None
        parts = [part.strip() for part in item.split(":", 1)]
        if any(part and not (part.isascii() and part.isdigit()) for part in parts):
            return None
        if len(parts) == 1:
            if not parts[0]:
                return None
            start = end = int(parts[0])
        else:
            start = int(parts[0]) if parts[0] else 0
            end = int(parts[1]) if parts[1] else num_layers - 1
            if parts[1] and start > end:
                return None
        if end > num_layers - 1 or (start > num_layers - 1):
            return None
        selected.update(range(start, end + 1))
    return sorted(selected)


layer_item = st.one_of(
    st.integers(0, 12).map(str),
    st.tuples(
        st.one_of(st.just(""), st.integers(0, 12).map(str)), st.one_of(st.just(""), st.integers(0, 12).map(str))
    ).map(":".join),
    st.sampled_from(["", " ", "a", "-1", "1:2:3", "٣", "+1", " 2 "]),
)


@SETTINGS
@given(st.lists(layer_item, min_size=1, max_size=4).map(",".join), st.integers(1, 12))
@example("20:", 12)  # was [] (nothing selected, silently)
@example("²", 3)  # was a ValueError traceback: "²".isdigit() but int("²") fails
def test_parse_layers_matches_a_reference(spec: str, num_layers: int) -> None:
    expected = reference_layers(spec, num_layers)
    if expected is None:
        with pytest.raises(UsageError):
            parse_layers(spec, num_layers)
    else:
        assert parse_layers(spec, num_layers) == expected


@SETTINGS
@given(st.text(max_size=30), st.integers(1, 40))
def test_parse_layers_raises_only_usage_errors(spec: str, num_layers: int) -> None:
    try:
        layers = parse_layers(spec, num_layers)
    except UsageError:
        return
    assert layers == sorted(set(layers)) and all(0 <= layer < num_layers for layer in layers)


# --- requirements ----------------------------------------------------------------------------

numbers = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda value: f"{value:g}")
unsigned = st.floats(min_value=0, max_value=1e6, allow_nan=False).map(lambda value: f"{value:g}")


@st.composite
def requirements(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A valid requirement's text and the fields it must parse to."""
    split = draw(st.from_regex(r"\A[A-Za-z0-9_-]{1,8}\Z"))
    metric = draw(st.sampled_from(METRICS))
    operator = draw(st.sampled_from([">=", "<=", ">", "<"]))
    space = draw(st.sampled_from(["", " ", "  "]))
    fields: dict[str, object]
    if draw(st.booleans()):
        number = draw(numbers)
        expression, fields = number, {"constant": float(number), "factor": 1.0, "role": None}
    else:
        role = draw(st.sampled_from(["baseline", "reference"]))
        factor = draw(st.one_of(st.none(), numbers))
        offset = draw(st.one_of(st.none(), st.tuples(st.sampled_from("+-"), unsigned)))
        expression = (f"{factor}{space}*{space}" if factor is not None else "") + role
        constant = 0.0
        if offset is not None:
            expression += f"{space}{offset[0]}{space}{offset[1]}"
            constant = float(offset[1]) * (-1 if offset[0] == "-" else 1)
        fields = {"constant": constant, "factor": float(factor) if factor is not None else 1.0, "role": role}
    text = f"{split}.{metric}{space}{operator}{space}{expression}"
    return text, {"split": split, "metric": metric, "operator": operator, **fields}


@SETTINGS
@given(requirements())
def test_valid_requirements_round_trip(generated: tuple[str, dict[str, object]]) -> None:
    text, fields = generated
    requirement = parse_requirement(text)
    assert requirement.text == text.strip()
    for name, value in fields.items():
        assert getattr(requirement, name) == value, name
    assert parse_requirement(requirement.text) == requirement


@SETTINGS
@given(st.text(max_size=60))
@example("forget.keyword_acc <= 1e400")  # an infinite threshold: now a usage error
def test_random_requirements_raise_only_usage_errors(text: str) -> None:
    try:
        requirement = parse_requirement(text)
    except UsageError:
        return
    assert requirement.metric in METRICS and math.isfinite(requirement.constant) and math.isfinite(requirement.factor)
