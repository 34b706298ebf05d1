"""Profile throughput: length-sorted batches, no language-model head, no host sync in the loop.

The results must not depend on any of it: rows come back in sample order, and a profile of the
same samples in another order is the same profile, row for row and byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import MULTIMODAL, TEXT_ONLY

from kvwctl.checkpoint import open_checkpoint
from kvwctl.conversation import RenderedSample
from kvwctl.data import load_samples
from kvwctl.modeling import CoefficientCollector, LoadedModel, encode_batch, length_order, load_model, render_all
from kvwctl.profile import collect_sums
from kvwctl.progress import NullTracker
from kvwctl.source import resolve_model
from kvwctl.testing import PEOPLE, PLACES, make_image


def loaded_model(checkpoint: Path) -> LoadedModel:
    return load_model(open_checkpoint(resolve_model(str(checkpoint))), device=torch.device("cpu"), dtype=torch.float32)


def sums_of(loaded: LoadedModel, rendered: list[RenderedSample], batch_size: int) -> tuple[list[torch.Tensor], Any]:
    """As ``write_profile`` profiles: batches in ``length_order``, rows put back in sample order."""
    order = length_order(rendered)
    rows = collect_sums(
        loaded,
        [rendered[index] for index in order],
        positions="answer",
        batch_size=batch_size,
        tracker=NullTracker(),
        description="test",
    )
    back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), dtype=torch.int64)  # row of sample i
    layers = [rows[f"layers.{layer}.sum"][back] for layer in range(len(loaded.down_projections))]
    return layers, rows["count"][back]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Samples of many lengths, in no order of length; with images (every third sample) or without."""
    root = tmp_path_factory.mktemp("uneven")
    splits = {}
    for with_images in (True, False):
        records = []
        for index in range(10):
            person, place = PEOPLE[index % len(PEOPLE)], PLACES[(index * 3) % len(PLACES)]
            padding = "Who is this person? " * ((index * 7) % 5)
            record = {"id": f"u{index}", "question": f"{padding}Where was {person} born?", "answer": place}
            if with_images and index % 3 == 0:
                record["image"] = "images/" + make_image(root / "images" / f"u{index}.png", seed=index).name
            records.append(json.dumps(record))
        path = root / f"uneven-{with_images}.jsonl"
        path.write_text("\n".join(records) + "\n")
        splits[with_images] = path
    return splits


def both_splits(model_type: str, uneven: dict[bool, Path]) -> list[Any]:
    return load_samples(uneven[model_type in MULTIMODAL])


@pytest.mark.parametrize("model_type", sorted(MULTIMODAL + TEXT_ONLY))  # the families `checkpoints` builds
def test_sorted_batches_return_rows_in_sample_order(
    model_type: str, checkpoints: dict[str, Path], uneven: dict[bool, Path]
) -> None:
    """Every registered family: any input order gives the same rows byte for byte, in that order.

    Both orders sort into the same batches (the sort key is a total order on distinct samples), so
    every row is computed from the very same padded batch; a row out of place would differ
    (the samples' sums are distinct). Against one sample per batch (no padding at all), the sums
    agree to float32 rounding of the forward pass (a different padded length changes the
    kernels' blocking, not the positions summed), and the counts exactly.
    """
    loaded = loaded_model(checkpoints[model_type])
    rendered = render_all(loaded.renderer, both_splits(model_type, uneven))
    lengths = [len(item.token_ids) for item in rendered]
    assert len(set(lengths)) > 1 and lengths != sorted(lengths), "the data must need sorting"
    permutation = [*range(1, len(rendered), 2), *range(0, len(rendered), 2)][::-1]

    sums, counts = sums_of(loaded, rendered, batch_size=3)
    permuted_sums, permuted_counts = sums_of(loaded, [rendered[index] for index in permutation], batch_size=3)
    alone_sums, alone_counts = sums_of(loaded, rendered, batch_size=1)

    assert torch.equal(permuted_counts, counts[permutation])
    assert torch.equal(alone_counts, counts)
    assert len(sums) == len(loaded.down_projections)
    for layer, layer_sums in enumerate(sums):
        assert layer_sums.dtype == torch.float64 and layer_sums.shape[0] == len(rendered)
        assert torch.equal(permuted_sums[layer], layer_sums[permutation]), f"layer {layer}"
        torch.testing.assert_close(layer_sums, alone_sums[layer], rtol=1e-5, atol=1e-6)
        assert len({row.sum().item() for row in layer_sums}) == len(rendered)  # distinct rows


@pytest.mark.parametrize("model_type", ["llava", "qwen2"])
def test_profile_runs_no_language_model_head(
    model_type: str, checkpoints: dict[str, Path], uneven: dict[bool, Path]
) -> None:
    """The head (a vocab-sized matmul per position) is never run; the decoder's layers all are."""
    loaded = loaded_model(checkpoints[model_type])
    calls: list[str] = []
    head = loaded.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda *_: calls.append("head"))
    try:
        rendered = render_all(loaded.renderer, both_splits(model_type, uneven))
        sums, _ = sums_of(loaded, rendered, batch_size=4)
        assert calls == []
        loaded.model(**encode_batch(loaded, rendered[:1], positions="answer").inputs)
        assert calls == ["head"]  # the hook does see the full model's head
    finally:
        handle.remove()
    assert all(bool((layer_sums > 0).all()) for layer_sums in sums)


@contextmanager
def host_reads_forbidden() -> Iterator[list[str]]:
    """Make every way kvwctl's code could read a tensor back to the host raise, and record it."""
    attempts: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "nonzero", "__bool__", "__int__")}

    def forbid(name: str) -> Any:
        def refused(*_: Any, **__: Any) -> Any:
            attempts.append(name)
            raise AssertionError(f"Tensor.{name} read a tensor back to the host")

        return refused

    for name in originals:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield attempts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_collector_reads_nothing_back_to_the_host(checkpoints: dict[str, Path], uneven: dict[bool, Path]) -> None:
    """Inside the loop (the hooks and run) no .item()/.tolist()/.nonzero()/bool()/int() is called.

    The base model's own forward is replaced by a stand-in that calls the hooked down projections
    with random activations, so that only kvwctl's code runs under the ban (transformers' mask
    code may read tensors on its own; that is not kvwctl's loop). The sums are checked against a
    hand computation with a boolean mask.
    """
    loaded = loaded_model(checkpoints["llama"])
    rendered = render_all(loaded.renderer, both_splits("llama", uneven))[:4]
    encoded = encode_batch(loaded, rendered, positions="answer")
    mask = encoded.position_mask  # (batch, sequence)
    width = loaded.down_projections[0].in_features
    generator = torch.Generator().manual_seed(0)
    activations = [torch.randn(*mask.shape, width, generator=generator) for _ in loaded.down_projections]

    class StandIn(torch.nn.Module):
        def forward(self, **_: Any) -> None:
            for module, layer_input in zip(loaded.down_projections, activations, strict=True):
                module(layer_input)

    real_base = loaded.model.base_model
    loaded.model.model = StandIn()  # base_model is getattr(model, "model")
    assert loaded.model.base_model is not real_base
    with CoefficientCollector(loaded.down_projections) as collector, host_reads_forbidden() as attempts:
        parts, counts = collector.run(loaded, encoded)
    assert attempts == []
    sums = [parts[f"layers.{layer}"][0] for layer in range(len(loaded.down_projections))]
    assert torch.equal(counts, mask.sum(dim=1))
    for layer_input, layer_sums in zip(activations, sums, strict=True):
        expected = (layer_input.double().abs() * mask[..., None]).sum(dim=1)  # (batch, m)
        torch.testing.assert_close(layer_sums, expected, rtol=1e-12, atol=1e-12)
    with host_reads_forbidden() as attempts, pytest.raises(AssertionError, match="read a tensor back"):
        torch.ones(2).nonzero()  # the ban itself works
    assert attempts == ["nonzero"]
