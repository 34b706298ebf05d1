"""Per-expert coefficients against a hand computation from the routing, and the expert-axis math.

The collector recomputes each expert's down-projection input from the experts module's input; here
the same numbers are computed independently: the MoE block's input captured by a hook, the router's
top-k written out, and each family's gate function written out from its weights.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from helpers import expect_error, invoke
from safetensors.torch import save_file

from kvwctl.method import batch_accessors, forget_accessor, pooled_coefficient, scale_expert_vectors
from kvwctl.modeling import CoefficientCollector, EncodedBatch, LoadedModel
from kvwctl.testing_moe import NUM_EXPERTS, build_moe

BATCH, SEQUENCE = 2, 7


def _collect(model: Any, mask: torch.Tensor, dense: list[Any], experts: list[Any]) -> tuple[dict[str, Any], Any]:
    """Run the collector and capture every MoE block's input (batch, sequence, d)."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.register_forward_pre_hook(lambda module, args, index=index: captured.__setitem__(index, args[0]))
        for index, layer in enumerate(model.model.layers)
    ]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, model.config.vocab_size, (BATCH, SEQUENCE), generator=generator)
    batch = EncodedBatch.of(
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, mask, torch.device("cpu")
    )
    with CoefficientCollector(dense, experts) as collector:
        parts, counts = collector.run(cast(LoadedModel, SimpleNamespace(model=model)), batch)
    for handle in handles:
        handle.remove()
    assert counts.tolist() == mask.sum(dim=1).tolist()
    return parts, captured


def _hand_sums(hidden: torch.Tensor, mask: torch.Tensor, routed: torch.Tensor, activation: Any) -> tuple[Any, Any]:
    """Sums (batch, E, m) and counts (batch, E) by explicit loops over samples, positions and experts."""
    sums: list[list[torch.Tensor]] = [[torch.zeros(0)] * NUM_EXPERTS for _ in range(BATCH)]
    counts = torch.zeros(BATCH, NUM_EXPERTS, dtype=torch.int64)
    for sample in range(BATCH):
        for expert in range(NUM_EXPERTS):
            total = None
            for position in range(SEQUENCE):
                if mask[sample, position] and expert in routed[sample, position].tolist():
                    value = activation(expert, hidden[sample, position]).abs().double()
                    total = value if total is None else total + value
                    counts[sample, expert] += 1
            sums[sample][expert] = (
                total if total is not None else torch.zeros_like(activation(expert, hidden[0, 0])).double()
            )
    return torch.stack([torch.stack(row) for row in sums]), counts


MASK = torch.tensor([[0, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)


@torch.inference_mode()  # the captured inputs are inference tensors
def test_mixtral_expert_sums_and_counts_match_the_routing() -> None:
    model, _ = build_moe("mixtral")
    model.eval()
    experts = [layer.mlp.experts for layer in model.model.layers]
    parts, captured = _collect(model, MASK, [None] * 4, experts)
    assert sorted(parts) == [f"layers.{layer}.experts" for layer in range(4)]
    for layer, block in enumerate(model.model.layers):
        hidden = captured[layer]  # (batch, sequence, d)
        probabilities = torch.softmax((hidden @ block.mlp.gate.weight.T).float(), dim=-1)
        routed = probabilities.topk(2, dim=-1).indices  # (batch, sequence, 2)
        size = model.config.intermediate_size
        weights = block.mlp.experts.gate_up_proj.detach()  # (E, 2m, d): w1 (gate) then w3 (up)

        def activation(expert: int, h: torch.Tensor) -> torch.Tensor:
            product: torch.Tensor = F.silu(weights[expert, :size] @ h) * (weights[expert, size:] @ h)  # noqa: B023
            return product

        sums, counts = _hand_sums(hidden.detach(), MASK, routed, activation)
        got_sums, got_counts = parts[f"layers.{layer}.experts"]
        assert got_counts.tolist() == counts.tolist()
        assert int(got_counts.sum()) == 2 * int(MASK.sum())  # top-2: each position counts twice
        torch.testing.assert_close(got_sums, sums, rtol=1e-5, atol=1e-7)
    assert (parts["layers.0.experts"][1] > 0).sum() >= 3  # the tokens spread over several experts


@torch.inference_mode()  # the captured inputs are inference tensors
def test_gpt_oss_expert_sums_use_its_clamped_swiglu() -> None:
    model, _ = build_moe("gpt_oss")
    model.eval()
    experts = [layer.mlp.experts for layer in model.model.layers]
    parts, captured = _collect(model, MASK, [None] * 4, experts)
    alpha, limit = model.config.swiglu_alpha, model.config.swiglu_limit
    for layer, block in enumerate(model.model.layers):
        hidden = captured[layer]
        logits = hidden @ block.mlp.router.weight.T + block.mlp.router.bias
        routed = logits.topk(2, dim=-1).indices
        weights, bias = block.mlp.experts.gate_up_proj.detach(), block.mlp.experts.gate_up_proj_bias.detach()

        def activation(expert: int, h: torch.Tensor) -> torch.Tensor:
            gate_up = h @ weights[expert] + bias[expert]  # noqa: B023  (2m,), gate and up interleaved
            gate, up = gate_up[::2].clamp(max=limit), gate_up[1::2].clamp(min=-limit, max=limit)
            glu: torch.Tensor = (up + 1) * gate * torch.sigmoid(gate * alpha)
            return glu

        sums, counts = _hand_sums(hidden.detach(), MASK, routed, activation)
        got_sums, got_counts = parts[f"layers.{layer}.experts"]
        assert got_counts.tolist() == counts.tolist()
        torch.testing.assert_close(got_sums, sums, rtol=1e-5, atol=1e-7)


@torch.inference_mode()  # the captured inputs are inference tensors
def test_qwen2_moe_shared_expert_is_profiled_as_a_dense_mlp() -> None:
    model, _ = build_moe("qwen2_moe")
    model.eval()
    layers = model.model.layers
    dense = [
        layer.mlp.down_proj if index == 1 else layer.mlp.shared_expert.down_proj for index, layer in enumerate(layers)
    ]
    experts = [None if index == 1 else layer.mlp.experts for index, layer in enumerate(layers)]
    parts, captured = _collect(model, MASK, dense, experts)
    assert "layers.1.experts" not in parts and "layers.1" in parts
    shared = layers[0].mlp.shared_expert
    hidden = captured[0].detach()  # (batch, sequence, d): the shared expert sees every token
    activations = F.silu(hidden @ shared.gate_proj.weight.T) * (hidden @ shared.up_proj.weight.T)
    expected = torch.stack([activations[sample][MASK[sample]].abs().double().sum(dim=0) for sample in range(BATCH)])
    got_sums, got_counts = parts["layers.0"]
    torch.testing.assert_close(got_sums, expected, rtol=1e-5, atol=1e-7)
    assert got_counts.tolist() == MASK.sum(dim=1).tolist()


def test_pooling_is_per_expert_and_token_weighted() -> None:
    sums = torch.tensor([[[2.0, 4.0], [0.0, 0.0]], [[6.0, 0.0], [3.0, 9.0]]], dtype=torch.float64)  # (2, E=2, m=2)
    counts = torch.tensor([[1, 0], [3, 3]])  # (samples, E)
    pooled = pooled_coefficient(sums, counts)  # expert 0: (2+6)/4, (4+0)/4; expert 1: 3/3, 9/3
    assert pooled.tolist() == [[2.0, 1.0], [1.0, 3.0]]
    # An expert no position was routed to has coefficient 0, so a forget batch that never used it
    # gets A = 0 for it.
    assert pooled_coefficient(sums[:1], counts[:1]).tolist() == [[2.0, 4.0], [0.0, 0.0]]
    retain = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    accessors = batch_accessors(sums, counts, retain, [range(0, 1), range(1, 2)])  # (batches, E, m)
    assert accessors.shape == (2, 2, 2)
    assert accessors[0, 1].tolist() == [0.0, 0.0]
    assert accessors[1, 1].tolist() == pytest.approx([0.0, float(torch.tensor(3.0).log())])
    assert forget_accessor(torch.tensor([0.0]), torch.tensor([0.0])).tolist() == [0.0]


def test_scale_expert_vectors_on_either_axis() -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3)  # (E=2, 2, 3)
    gate = torch.tensor([[1.0, 0.5, 0.0], [0.25, 1.0, 2.0]])  # (E, m=3): vectors on axis 2
    assert scale_expert_vectors(weight, gate, axis=2).tolist() == [
        [[0.0, 0.5, 0.0], [3.0, 2.0, 0.0]],
        [[1.5, 7.0, 16.0], [2.25, 10.0, 22.0]],
    ]
    rows = torch.tensor([[0.5, 0.0], [1.0, 2.0]])  # (E, m=2): vectors on axis 1 (rows)
    assert scale_expert_vectors(weight, rows, axis=1).tolist() == [
        [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]],
        [[6.0, 7.0, 8.0], [18.0, 20.0, 22.0]],
    ]
    with pytest.raises(ValueError, match="does not fit"):
        scale_expert_vectors(weight, rows, axis=2)


def test_a_profile_of_format_1_is_refused_with_how_to_regenerate(tmp_path: Path) -> None:
    metadata = {"format": "kvwctl.profile/1", "split": "forget", "num_layers": "1"}
    for name in ("forget", "retain"):
        save_file({"count": torch.tensor([3])}, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
    result = invoke(
        "accessor", "--forget", tmp_path / "forget.safetensors", "--retain", tmp_path / "retain.safetensors",
        "--out", tmp_path / "a.safetensors",
    )  # fmt: skip
    expect_error(
        result, "has format kvwctl.profile/1, written by an earlier kvwctl; this kvwctl reads kvwctl.profile/2"
    )
    assert "regenerate it with kvwctl profile" in " ".join(result.stderr.split())


def test_negative_expert_counts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "retain.safetensors"
    tensors = {
        "count": torch.tensor(4),
        "layers.0.experts.sum": torch.ones(2, 3, dtype=torch.float64),
        "layers.0.experts.count": torch.tensor([5, -1]),
    }
    metadata = {"format": "kvwctl.profile/2", "split": "retain", "num_layers": "1", "model": "m",
                "model_fingerprint": "f", "positions": "answer"}  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)
    result = invoke("accessor", "--forget", path, "--retain", path, "--out", tmp_path / "a.safetensors")
    expect_error(result, "tensor layers.0.experts.count has negative values")


def test_a_checkpoint_missing_an_expert_is_refused_before_any_work(tmp_path: Path) -> None:
    import json
    import shutil

    from safetensors import safe_open

    from kvwctl.testing import write_samples
    from kvwctl.testing_moe import build_moe_checkpoint

    checkpoint = shutil.copytree(build_moe_checkpoint("mixtral", tmp_path / "model"), tmp_path / "broken")
    missing = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop(missing)
    with safe_open(str(checkpoint / shard), framework="pt") as stream:
        kept = {name: stream.get_tensor(name) for name in stream.keys() if name != missing}
    save_file(kept, str(checkpoint / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    data = write_samples(tmp_path / "retain.jsonl", count=1, with_images=False)
    result = invoke("profile", "--model", checkpoint, "--data", data, "--split", "retain", "--out", tmp_path / "r.st",
                    "--dry-run")  # fmt: skip
    expect_error(result, "layer 2 has down projections for experts [0, 1, 2]; config.json declares 4 experts")
