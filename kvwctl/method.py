"""The Knowledge Vector Weakening method (DESIGN §1) as pure functions of tensors.

Every stage imports its math from here; nothing here reads a file, loads a model or prints.
torch is imported inside the functions, so importing this module is cheap.

Knowledge vectors and coefficients
    Each decoder layer ``l`` has an FFN whose output is ``down(a)``, ``a`` in ``R^m`` the input
    of the down projection. Knowledge vector ``v_i`` is the weight that multiplies ``a_i``:
    column ``i`` of an ``nn.Linear`` weight ``(d_model, m)``, row ``i`` of a GPT-2 ``Conv1D``
    weight ``(m, d_model)``. The knowledge coefficient of a sample set is the token-pooled mean
    ``C = sum_t |a_t| / |T|`` over every profiled position ``t`` of every sample: the per-sample
    sums ``(samples, m)`` and counts ``(samples,)`` are added up *before* dividing
    (:func:`pooled_coefficient`), never a mean of per-sample means.

Mixture of experts
    Each routed expert ``e`` of a layer has its own ``m`` vectors and counts only the profiled
    positions routed to it: sums ``(samples, E, m)``, counts ``(samples, E)``. Pooling adds them per
    expert, ``C_e = sum_s sums[s, e] / sum_s counts[s, e]`` ``(E, m)``, and an expert that no
    position of the set was routed to has ``C_e = 0`` (no activation seen): for a forget batch that
    gives ``A_b = 0`` (the batch never used it); for the retain set, ``A_b = log((C_f + eps) / eps)``
    wherever the forget batch used it. The accessor, exposure, gates and scaling are elementwise,
    so they apply to ``(E, m)`` exactly as to ``(m,)``. Stage files and these functions name each
    part of a layer by its tensor prefix: :func:`dense_part` (``layers.N``) and :func:`experts_part`
    (``layers.N.experts``).

Forget Knowledge Accessor
    Forget batches are consecutive runs of ``batch_size`` samples (:func:`batch_ranges`). For a
    batch ``b`` with coefficient ``C_f^b`` and the whole retain set's ``C_r``, both ``(m,)``::

        A_b = max(0, log(C_f^b + eps) - log(C_r + eps)),   eps = 1e-12       (forget_accessor)
        A   = stack_b A_b                                  (batches, m)       (batch_accessors)
        E   = sum_b A_b                                    (m,) float32       (exposure)

Gates and scaling
    ``g = exp(-gamma * E)`` in float32 (:func:`gates`); vector ``i`` becomes ``g_i * v_i``,
    computed in float32 from the original weight and rounded once to its stored dtype
    (:func:`scale_vectors`). :func:`tensor_bytes` gives the bytes safetensors stores for it.
    ``gamma * E`` must stay a finite float32 (:func:`check_gamma`): an infinite product would
    turn ``0 * inf`` into NaN weights, so ``gamma`` and ``gamma * max(E)`` are both bounded by
    ``FLOAT32_MAX``. ``kvwctl tune`` can ask for a mean gate instead of a γ: the γ for which the mean
    of ``g`` over the exposed vectors (E > 0) of the edited layers is a target
    (:func:`gamma_for_mean_gate`, :func:`exposed_mean_gate`).

Layer selections
    ``l_s:l_e`` is inclusive at both ends and 0-based over the language-model decoder layers;
    open ends (``:26``, ``2:``, ``:``) and lists (``0,3,5``, ``0,4:6``) are accepted
    (:func:`parse_layers`). A malformed or out-of-range selection is a :class:`UsageError`.

Example::

    >>> import torch
    >>> from kvwctl.method import batch_accessors, batch_ranges, exposure, gates
    >>> sums = torch.tensor([[2.0, 1.0], [6.0, 0.5]], dtype=torch.float64)  # (samples, m)
    >>> counts = torch.tensor([1, 2])  # profiled positions per sample
    >>> retain = torch.tensor([1.0, 1.0], dtype=torch.float64)  # C_r, (m,)
    >>> accessors = batch_accessors(sums, counts, retain, batch_ranges(2, 2))  # (1, m): log(8/3), 0
    >>> gates(exposure(accessors), 1.0)  # (3/8, 1)
    tensor([0.3750, 1.0000])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvwctl.errors import UsageError

if TYPE_CHECKING:
    import torch

EPSILON = 1e-12
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


# --- coefficients and the accessor ---------------------------------------------------------------


def batch_ranges(num_samples: int, batch_size: int) -> list[range]:
    """Consecutive forget batches of ``batch_size`` samples; the last one may be smaller."""
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def dense_part(layer: int) -> str:
    """The name of a layer's dense (or shared-expert) down projection in stage files: ``layers.N``."""
    return f"layers.{layer}"


def experts_part(layer: int) -> str:
    """The name of a layer's routed experts in stage files: ``layers.N.experts``."""
    return f"layers.{layer}.experts"


def part_layer(part: str) -> int:
    """The layer of a part name (``layers.N`` or ``layers.N.experts``)."""
    return int(part.split(".")[1])


def pooled_coefficient(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Token-pooled coefficient ``sum_t |a_t| / |T|`` from per-sample sums and counts.

    Dense: sums ``(samples, m)``, counts ``(samples,)`` -> ``(m,)``. Experts: sums
    ``(samples, E, m)``, counts ``(samples, E)`` -> ``(E, m)``, an expert with no position 0.
    Pooling adds the sums and the counts before dividing: a mean over every profiled position,
    not a mean of per-sample means.
    """
    total = counts.sum(dim=0).unsqueeze(-1)  # (1,) or (E, 1)
    return sums.sum(dim=0) / total.clamp(min=1)  # (m,) or (E, m); a zero count has a zero sum


def forget_accessor(forget: torch.Tensor, retain: torch.Tensor, epsilon: float = EPSILON) -> torch.Tensor:
    """``A = max(0, log(C_f + eps) - log(C_r + eps))``, elementwise."""
    return ((forget + epsilon).log() - (retain + epsilon).log()).clamp(min=0)


def batch_accessors(
    forget_sums: torch.Tensor, forget_counts: torch.Tensor, retain: torch.Tensor, batches: list[range]
) -> torch.Tensor:
    """``A_b`` for every batch: ``(batches, m)`` from per-sample sums ``(samples, m)``."""
    import torch

    return torch.stack(
        [
            forget_accessor(
                pooled_coefficient(forget_sums[batch.start : batch.stop], forget_counts[batch.start : batch.stop]),
                retain,
            )
            for batch in batches
        ]
    )


def exposure(accessors: torch.Tensor) -> torch.Tensor:
    """``E = sum_b A_b``: ``(m,)`` float32 from the batch accessors ``(batches, m)``.

    The sum is taken in the accessors' own precision (float64 from the profiles) and rounded
    to float32 once, at the end.
    """
    return accessors.sum(dim=0).float()  # (m,)


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    vectors: int
    exposed: int  # vectors with E > 0
    max_exposure: float
    mean_exposure: float


def summarize_exposures(exposures: list[torch.Tensor]) -> list[LayerSummary]:
    """One :class:`LayerSummary` per layer from its exposure ``(m,)``; the mean in float64."""
    return [
        LayerSummary(
            layer=layer,
            vectors=layer_exposure.numel(),
            exposed=int((layer_exposure > 0).sum()),
            max_exposure=float(layer_exposure.max()),
            mean_exposure=float(layer_exposure.double().mean()),
        )
        for layer, layer_exposure in enumerate(exposures)
    ]


def summarize_parts(exposures: dict[str, torch.Tensor]) -> list[LayerSummary]:
    """One :class:`LayerSummary` per layer over all of its parts (dense ``(m,)``, experts ``(E, m)``)."""
    import torch

    by_layer: dict[int, list[torch.Tensor]] = {}
    for part, values in exposures.items():
        by_layer.setdefault(part_layer(part), []).append(values.reshape(-1))
    flat = [torch.cat(by_layer[layer]) for layer in sorted(by_layer)]
    return [
        LayerSummary(layer=layer, **{key: value for key, value in vars(summary).items() if key != "layer"})
        for layer, summary in zip(sorted(by_layer), summarize_exposures(flat), strict=True)
    ]


# --- gates and scaling ---------------------------------------------------------------------------


def gamma_problem(gamma: float) -> str | None:
    """What makes ``gamma`` unusable as a float32 factor, or None (for the option check)."""
    if gamma > FLOAT32_MAX:
        return f"must be at most {FLOAT32_MAX:.8g} (the largest float32), got {gamma!r}"
    return None


def check_gamma(gamma: float, exposures: Sequence[torch.Tensor], layers: Sequence[int]) -> None:
    """Refuse a ``gamma`` for which ``gamma * E`` of an edited layer is not a finite float32.

    The product is taken in float64, so an overflow is seen before float32 would hide it as inf.
    """
    problem = gamma_problem(gamma)
    if problem is not None:
        raise UsageError(f"--gamma {problem}")
    for layer in layers:
        largest = float(exposures[layer].double().max()) if exposures[layer].numel() else 0.0
        if not gamma * largest <= FLOAT32_MAX:  # also refuses a NaN
            raise UsageError(
                f"--gamma {gamma!r} times the largest exposure of layer {layer} ({largest:.6g}) is "
                f"{gamma * largest:.6g}, beyond the largest float32 ({FLOAT32_MAX:.6g})",
                hint="choose a smaller --gamma: exp(-gamma * E) must be computed in float32",
            )


def check_gamma_parts(gamma: float, exposures: dict[str, torch.Tensor]) -> None:
    """:func:`check_gamma` over named parts (``layers.N``, ``layers.N.experts``), the error naming the part."""
    problem = gamma_problem(gamma)
    if problem is not None:
        raise UsageError(f"--gamma {problem}")
    for part, values in exposures.items():
        largest = float(values.double().max()) if values.numel() else 0.0
        if not gamma * largest <= FLOAT32_MAX:
            raise UsageError(
                f"--gamma {gamma!r} times the largest exposure of {_part_name(part)} ({largest:.6g}) is "
                f"{gamma * largest:.6g}, beyond the largest float32 ({FLOAT32_MAX:.6g})",
                hint="choose a smaller --gamma: exp(-gamma * E) must be computed in float32",
            )


def _part_name(part: str) -> str:
    """``layer 3`` or ``layer 3 experts``, for messages."""
    return f"layer {part_layer(part)}" + (" experts" if part.endswith(".experts") else "")


def gates(exposure: torch.Tensor, gamma: float) -> torch.Tensor:
    """``g = exp(-gamma * E)`` in float32."""
    return (exposure.float() * -gamma).exp()


def exposed_mean_gate(exposed: torch.Tensor, gamma: float) -> float:
    """The mean of ``exp(-gamma * E)`` over exposed vectors ``(n,)``, float32 gates, float64 mean."""
    return float(gates(exposed, gamma).double().mean())


def gamma_for_mean_gate(exposed: torch.Tensor, target: float) -> float | None:
    """The γ whose mean gate over the exposed vectors ``(n,)`` (E > 0) is ``target``; None if n = 0.

    The mean gate falls from 1 (γ = 0) towards 0 as γ grows, so γ is found by bisection on log γ
    (float64, a fixed 100 steps: the same inputs give the same γ), within ``(0, FLOAT32_MAX / max E]``.
    """
    import math

    if exposed.numel() == 0:
        return None
    values = exposed.double()
    largest = float(values.max())

    def mean_gate(gamma: float) -> float:
        return float((values * -gamma).exp().mean())

    low, high = math.log(1e-30), math.log(FLOAT32_MAX / largest)
    if mean_gate(math.exp(high)) >= target:
        return math.exp(high)
    for _ in range(100):
        middle = (low + high) / 2
        if mean_gate(math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    return float(f"{math.exp((low + high) / 2):.9g}")


def scale_expert_vectors(weight: torch.Tensor, gate: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Scale vector ``i`` of expert ``e`` of a fused ``(E, ., .)`` weight by ``gate[e, i]`` ``(E, m)``.

    ``axis`` (1 or 2) indexes the vectors: 2 for ``(E, d_model, m)``, 1 for ``(E, m, d_model)``.
    float32, rounded once to the weight's dtype.
    """
    if weight.dim() != 3 or axis not in (1, 2) or (weight.shape[0], weight.shape[axis]) != tuple(gate.shape):
        raise ValueError(
            f"weight {tuple(weight.shape)} with vectors on axis {axis} does not fit gates {tuple(gate.shape)}"
        )
    shaped = gate.to(weight.device).float().unsqueeze(3 - axis)  # (E, 1, m) or (E, m, 1)
    return (weight.float() * shaped).to(weight.dtype)


def scale_vectors(weight: torch.Tensor, gate: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Scale knowledge vector ``i`` of ``weight`` by ``gate[i]``; float32, rounded once.

    ``axis`` indexes the vectors: 1 for ``nn.Linear`` weights ``(d_model, m)`` (columns),
    0 for ``Conv1D`` weights ``(m, d_model)`` (rows).
    """
    if weight.shape[axis] != gate.numel():
        raise ValueError(
            f"weight {tuple(weight.shape)} has {weight.shape[axis]} vectors on axis {axis}, gate has {gate.numel()}"
        )
    shape = [1, 1]
    shape[axis] = -1
    return (weight.float() * gate.to(weight.device).float().reshape(shape)).to(weight.dtype)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- layer selections ----------------------------------------------------------------------------


def layer_ranges(spec: str) -> list[tuple[int, int | None]]:
    """The syntax of a layer selection: inclusive ``(start, end)`` pairs, ``end`` None when open.

    Checked without the model: ``3:1`` (start after end) and ``a:b`` are usage errors here; a
    layer beyond the model's depth is found by ``parse_layers``.
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise UsageError(f"invalid layer selection {spec!r}", hint='use e.g. "2:26", ":26", "2:" or "0,3,5"')
    ranges: list[tuple[int, int | None]] = []
    for item in items:
        if ":" in item:
            start_text, _, end_text = item.partition(":")
            start = _layer_number(start_text, spec) if start_text.strip() else 0
            end = _layer_number(end_text, spec) if end_text.strip() else None
            if end is not None and start > end:
                raise UsageError(f"invalid layer range {item!r}: start {start} is after end {end}")
            ranges.append((start, end))
        else:
            number = _layer_number(item, spec)
            ranges.append((number, number))
    return ranges


def layer_selection_problem(spec: str) -> str | None:
    """What is wrong with the syntax of a layer selection, or None (for option checks)."""
    try:
        layer_ranges(spec)
    except UsageError as error:
        return error.message
    return None


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Resolve a layer selection over ``num_layers`` decoder layers into a sorted list.

    Ranges are inclusive at both ends and 0-based: ``2:26`` on a 28-layer model is layers
    2..26. Open ends (``:26``, ``2:``, ``:``) and comma lists (``0,3,5``, ``0,4:6``) are accepted.
    """
    last = num_layers - 1
    selected: set[int] = set()
    for start, end in layer_ranges(spec):
        for number in range(start, max(start, last if end is None else end) + 1):  # "20:" checks 20
            if number > last:
                raise UsageError(
                    f"layer {number} in {spec!r} is out of range",
                    hint=f"the model has {num_layers} decoder layers (0..{last})",
                )
            selected.add(number)
    return sorted(selected)


def _layer_number(text: str, spec: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):  # "²" and "٣" are str.isdigit() too
        raise UsageError(f"invalid layer selection {spec!r}: {text!r} is not a layer number")
    return int(text)
