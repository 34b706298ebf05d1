"""kvwctl.method, one test (or more) per public function, against hand-computed values."""

from __future__ import annotations

import doctest
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvwctl.method
from kvwctl.errors import UsageError
from kvwctl.method import (
    EPSILON,
    LayerSummary,
    batch_accessors,
    batch_ranges,
    exposure,
    forget_accessor,
    gates,
    parse_layers,
    pooled_coefficient,
    scale_vectors,
    summarize_exposures,
    tensor_bytes,
)


def test_importing_the_method_does_not_import_torch() -> None:
    code = "import sys, kvwctl.method; assert 'torch' not in sys.modules"
    # From the directory above this checkout's package, so that it is the one imported.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(kvwctl.method.__file__).parents[1])


def test_the_manual_example_runs() -> None:
    assert doctest.testmod(kvwctl.method).failed == 0


def test_batch_ranges_are_consecutive_and_the_last_may_be_smaller() -> None:
    assert batch_ranges(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert batch_ranges(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    assert batch_ranges(2, 10) == [range(0, 2)]
    assert batch_ranges(0, 1) == []


def test_forget_accessor_is_clamped_log_ratio() -> None:
    forget = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    retain = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    accessor = forget_accessor(forget, retain)
    # log 2 = 0.693147..., log 1 = 0, log 0.5 < 0 -> 0, and 0/0 with eps -> log(eps/eps) = 0.
    assert accessor.tolist() == pytest.approx([math.log(2.0), 0.0, 0.0, 0.0], abs=1e-12)
    # A vector never used by the retain set: log(C_f + eps) - log(eps).
    lonely = forget_accessor(torch.tensor([1e-3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    assert lonely.item() == pytest.approx(math.log(1e-3 + EPSILON) - math.log(EPSILON))


def test_pooling_is_token_weighted_not_a_mean_of_means() -> None:
    # Sample 0: 1 position with |a| = 4; sample 1: 3 positions with |a| summing to 0 (all zero).
    sums = torch.tensor([[4.0], [0.0]], dtype=torch.float64)
    counts = torch.tensor([1, 3])
    assert pooled_coefficient(sums, counts).item() == pytest.approx(1.0)  # 4 / 4, not (4 + 0) / 2


def test_batch_accessors_and_exposure_by_hand() -> None:
    # Three forget samples, two vectors; retain coefficient (1, 1).
    sums = torch.tensor([[2.0, 1.0], [6.0, 0.5], [1.0, 3.0]], dtype=torch.float64)
    counts = torch.tensor([1, 2, 1])
    retain = torch.tensor([1.0, 1.0], dtype=torch.float64)
    batches = batch_ranges(3, 2)
    assert batches == [range(0, 2), range(2, 3)]
    accessors = batch_accessors(sums, counts, retain, batches)
    # Batch 0: C_f = (2+6)/3, (1+0.5)/3 -> log(8/3), log(0.5) -> 0.  Batch 1: C_f = (1, 3) -> 0, log 3.
    expected = [[math.log(8 / 3), 0.0], [0.0, math.log(3)]]
    torch.testing.assert_close(accessors, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    total = exposure(accessors)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, torch.tensor([math.log(8 / 3), math.log(3)]))


def test_exposure_sums_in_the_accessors_precision_and_rounds_once() -> None:
    # 1 + 2**-30 twice: float64 keeps 2 + 2**-29 before the float32 rounding; one vector never exposed.
    accessors = torch.tensor([[1.0 + 2**-30, 0.0], [1.0 + 2**-30, 0.0]], dtype=torch.float64)
    assert exposure(accessors).tolist() == [2.0, 0.0]
    torch.testing.assert_close(exposure(torch.tensor([[0.5, 1.0]])), torch.tensor([0.5, 1.0]))


def test_summarize_exposures_by_hand() -> None:
    exposures = [torch.tensor([0.0, 1.0, 3.0, 0.0]), torch.tensor([0.0, 0.0])]
    assert summarize_exposures(exposures) == [
        LayerSummary(layer=0, vectors=4, exposed=2, max_exposure=3.0, mean_exposure=1.0),
        LayerSummary(layer=1, vectors=2, exposed=0, max_exposure=0.0, mean_exposure=0.0),
    ]
    # The mean is taken in float64: float32 would lose 2**-24 next to 1 (and round the result).
    (summary,) = summarize_exposures([torch.tensor([1.0, 2**-24, 2**-24])])
    assert summary.mean_exposure == (1.0 + 2**-23) / 3


def test_batch_size_one_equals_per_sample_accessors() -> None:
    sums = torch.rand(5, 7, dtype=torch.float64)
    counts = torch.tensor([1, 2, 3, 4, 5])
    retain = torch.rand(7, dtype=torch.float64)
    accessors = batch_accessors(sums, counts, retain, batch_ranges(5, 1))
    for index in range(5):
        torch.testing.assert_close(accessors[index], forget_accessor(sums[index] / counts[index], retain))


def test_gates() -> None:
    exposure = torch.tensor([0.0, 1.0, 10.0])
    assert gates(exposure, 0.5).tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-5.0)], rel=1e-6)
    assert gates(exposure, 0.0).tolist() == [1.0, 1.0, 1.0]
    assert gates(exposure, 1.0).dtype == torch.float32


def test_scale_vectors_scales_columns_of_linear_weights() -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # (d_model=2, m=3)
    gate = torch.tensor([1.0, 0.5, 0.0])
    assert scale_vectors(weight, gate, axis=1).tolist() == [[0.0, 0.5, 0.0], [3.0, 2.0, 0.0]]
    # The column is the vector that multiplies input a_i: Linear(W * g)(a) == Linear(W)(a * g).
    linear = torch.nn.Linear(3, 2, bias=False)
    activations = torch.randn(4, 3)
    scaled = scale_vectors(linear.weight.detach(), gate, axis=1)
    torch.testing.assert_close(activations @ scaled.T, linear(activations * gate).detach())


def test_scale_vectors_scales_rows_of_conv1d_weights() -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(3, 2)  # (m=3, d_model=2), GPT-2 Conv1D
    gate = torch.tensor([1.0, 0.5, 0.0])
    assert scale_vectors(weight, gate, axis=0).tolist() == [[0.0, 1.0], [1.0, 1.5], [0.0, 0.0]]


def test_scaling_is_float32_rounded_once_to_the_stored_dtype() -> None:
    weight = torch.randn(8, 16).to(torch.bfloat16)
    gate = torch.rand(16)
    scaled = scale_vectors(weight, gate, axis=1)
    assert scaled.dtype == torch.bfloat16
    assert torch.equal(scaled, (weight.float() * gate).to(torch.bfloat16))
    with pytest.raises(ValueError, match="vectors on axis 1"):
        scale_vectors(weight, torch.rand(8), axis=1)


def test_tensor_bytes_are_safetensors_bytes() -> None:
    tensor = torch.tensor([1.0, -2.0], dtype=torch.float16)
    assert tensor_bytes(tensor) == bytes.fromhex("003c00c0")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2:5", [2, 3, 4, 5]),
        (":2", [0, 1, 2]),
        ("6:", [6, 7]),
        (":", list(range(8))),
        ("0,3,5", [0, 3, 5]),
        ("0, 4:6", [0, 4, 5, 6]),
        ("3", [3]),
        ("7:7", [7]),
    ],
)
def test_parse_layers_is_inclusive_and_zero_based(spec: str, expected: list[int]) -> None:
    assert parse_layers(spec, 8) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2:26", "layer 8 in '2:26' is out of range"),
        ("5:2", "start 5 is after end 2"),
        ("a:3", "'a' is not a layer number"),
        ("", "invalid layer selection"),
        ("1,,2", "invalid layer selection"),
        ("-1", "is not a layer number"),
    ],
)
def test_parse_layers_errors_are_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        parse_layers(spec, 8)
    assert raised.value.exit_code == 2
