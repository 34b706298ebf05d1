"""Mixture-of-experts layers: every routed expert's knowledge vectors, on disk and in memory.

Each routed expert ``e`` of a layer is an FFN of its own, ``down_e(a_e)`` with
``a_e = act(gate_e(h)) * up_e(h)`` (gpt-oss: its clamped SwiGLU), so it has its own ``m``
knowledge vectors: the columns of its down projection. Its coefficient counts **only the tokens
routed to it**: the sums ``(E, m)`` add ``|a_e|`` over the profiled positions whose top-k experts
include ``e``, and each expert has its own count ``(E,)`` of such positions, so pooling stays
token-weighted per expert. A shared expert (Qwen2-MoE) sees every token: it is an ordinary MLP,
profiled as the layer's dense down projection.

**On disk** (:func:`expert_projections`) the published checkpoints store one 2-D ``nn.Linear``
weight ``(d_model, m)`` per expert (Mixtral ``block_sparse_moe.experts.E.w2.weight``, Qwen-MoE
``mlp.experts.E.down_proj.weight``) or one fused 3-D tensor per layer (Qwen3-VL-MoE
``(E, m, d_model)``, gpt-oss ``(E, m, d_model)``, the transformers 5 module tree ``(E, d_model, m)``);
``kvwctl.architectures`` names them. Quantised expert weights (gpt-oss MXFP4 ``*_blocks`` /
``*_scales``, or any ``quantization_config``) are refused.

**In memory** transformers 5 holds the experts of a layer as one module with fused 3-D parameters
(``gate_up_proj``, ``down_proj``) and no per-expert submodule, and may dispatch its forward to
grouped kernels. :class:`ExpertCoefficients` therefore hooks the experts module's *input* (the
hidden states ``(tokens, d_model)``, the routing ``top_k_index (tokens, k)``) and recomputes
``a_e`` for the profiled routed tokens from the module's own parameters and its own gate function
(``_apply_gate``, the one transformers' forward uses), which is exact whichever kernel runs.

torch is imported inside functions so that importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.architectures import Architecture
from kvwctl.checkpoint import DownProjection, ExpertProjection, ExpertTensor, StoredTensor
from kvwctl.errors import ModelError

if TYPE_CHECKING:
    import torch

QUANTISED_SUFFIXES = ("_blocks", "_scales", "_scale_inv", ".qweight", ".scales")


def num_experts(config: dict[str, Any], keys: tuple[str, ...]) -> int:
    """The number of routed experts from ``config.json`` (the text config's, for vision-language models)."""
    text_config = config.get("text_config")
    for source in (text_config if isinstance(text_config, dict) else {}, config):
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raise ModelError(f"config.json gives no positive {' or '.join(keys)} (the number of routed experts)")


def expert_projections(
    path: Path,
    config: dict[str, Any],
    architecture: Architecture,
    found: list[ExpertTensor],
    tensors: list[StoredTensor],
    num_layers: int,
) -> list[ExpertProjection | None]:
    """Group the expert down projections found on disk by layer and check them whole.

    Per layer either one 2-D weight per expert, every expert present and all of one shape, or one
    fused 3-D tensor of ``E`` experts; never both. Layers without experts are dense (None).
    """
    layout = architecture.experts
    assert layout is not None, "called for mixture-of-experts architectures only"
    quantised = [
        tensor.name for tensor in tensors if "experts" in tensor.name and tensor.name.endswith(QUANTISED_SUFFIXES)
    ]
    if "quantization_config" in config or quantised:
        settings = config.get("quantization_config")
        method = settings.get("quant_method") if isinstance(settings, dict) else settings
        what = quantised[0] if quantised else f"quantization_config {method!r}"
        raise ModelError(
            f"{path}: the expert weights are quantised ({what}); kvwctl edits only unquantised (bf16, fp16, fp32) weights",
            hint="use a bf16 copy of the model: load it with transformers (dequantize=True for MXFP4) and save_pretrained",
        )
    count = num_experts(config, layout.num_experts_keys)
    by_layer: dict[int, list[ExpertTensor]] = {}
    for tensor in found:
        if tensor.layer >= num_layers:
            raise ModelError(
                f"{path}: expert weight {tensor.name} is for layer {tensor.layer}; config.json has {num_layers}"
            )
        by_layer.setdefault(tensor.layer, []).append(tensor)
    projections: list[ExpertProjection | None] = []
    for layer in range(num_layers):
        entries = sorted(by_layer.get(layer, []), key=lambda tensor: -1 if tensor.expert is None else tensor.expert)
        projections.append(_layer_experts(path, layer, entries, count, config) if entries else None)
    return projections


def _axis_by_shape(path: Path, tensor: ExpertTensor, config: dict[str, Any]) -> int:
    """The vector axis of a fused tensor whose orientation its shape tells (see ``ExpertLayout``)."""
    nested = config.get("text_config")
    text_config: dict[str, Any] = nested if isinstance(nested, dict) else config
    d_model, m = text_config.get("hidden_size"), text_config.get("moe_intermediate_size")
    if tensor.shape[1:] == (d_model, m):
        return 2  # as transformers holds it in memory: loaded without a transpose
    if tensor.shape[1:] == (m, d_model):
        return 1
    raise ModelError(
        f"{path}: {tensor.name} has shape {list(tensor.shape)}; config.json makes it (E, {d_model}, {m}) or (E, {m}, {d_model})"
    )


def _layer_experts(
    path: Path, layer: int, entries: list[ExpertTensor], count: int, config: dict[str, Any]
) -> ExpertProjection:
    fused = [tensor for tensor in entries if tensor.expert is None]
    if fused:
        if len(entries) != 1:
            names = ", ".join(tensor.name for tensor in entries[:3])
            raise ModelError(f"{path}: layer {layer} stores its experts both fused and per expert ({names}, ...)")
        tensor = fused[0]
        if tensor.axis == 0:
            tensor = replace(tensor, axis=_axis_by_shape(path, tensor, config))
        if len(tensor.shape) != 3 or tensor.shape[0] != count:
            raise ModelError(
                f"{path}: {tensor.name} has shape {list(tensor.shape)}; expected ({count}, ., .) for {count} experts"
            )
        return ExpertProjection(
            layer=layer, num_experts=count, num_vectors=tensor.shape[tensor.axis], tensors=(tensor,)
        )
    experts = [tensor.expert for tensor in entries]
    if experts != list(range(count)):
        raise ModelError(
            f"{path}: layer {layer} has down projections for experts {experts}; config.json declares {count} experts",
            hint="the checkpoint is incomplete or saved for another configuration",
        )
    shapes = {tensor.shape for tensor in entries}
    if len(shapes) != 1 or len(entries[0].shape) != 2:
        raise ModelError(f"{path}: the expert down projections of layer {layer} have shapes {sorted(shapes)}")
    return ExpertProjection(layer=layer, num_experts=count, num_vectors=entries[0].shape[1], tensors=tuple(entries))


def dense_layers(
    path: Path, projections: dict[int, DownProjection], experts: list[ExpertProjection | None]
) -> list[DownProjection | None]:
    """Per layer of a mixture-of-experts model its dense (or shared-expert) down projection, if any.

    Every layer needs a dense down projection or routed experts, and no projection may lie beyond
    the decoder layers.
    """
    beyond = sorted(layer for layer in projections if layer >= len(experts))
    if beyond:
        raise ModelError(f"{path}: down-projection weights for layers {beyond} beyond config.json's {len(experts)}")
    empty = [layer for layer in range(len(experts)) if layer not in projections and experts[layer] is None]
    if empty:
        raise ModelError(f"{path}: layers {empty} have neither a down-projection weight nor expert weights on disk")
    return [projections.get(layer) for layer in range(len(experts))]


# --- in memory -----------------------------------------------------------------------------------


def experts_module(layer: Any, architecture: Architecture) -> Any | None:
    """The experts module of a decoder layer, or None for a dense layer."""
    assert architecture.experts is not None
    module = layer
    for attribute in architecture.experts.module.split("."):
        if not hasattr(module, attribute):
            return None
        module = getattr(module, attribute)
    return module


def expert_activations(module: Any, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """``a_e`` ``(tokens, m)``: the input of expert ``expert``'s down projection for ``hidden`` ``(tokens, d)``.

    The same arithmetic as the experts' eager forward in transformers 5: ``gate_up_proj[e]`` as a
    Linear weight ``(2m, d)`` or, transposed (gpt-oss), as ``(d, 2m)``, its bias if any, then the
    module's own ``_apply_gate`` (``act(gate) * up``; gpt-oss's clamped SwiGLU on interleaved halves).
    """
    import torch.nn.functional as F

    weight = module.gate_up_proj[expert]
    gate_up = hidden @ weight if getattr(module, "is_transposed", False) else F.linear(hidden, weight)
    if getattr(module, "has_bias", False):
        gate_up = gate_up + module.gate_up_proj_bias[expert]
    activations: torch.Tensor = module._apply_gate(gate_up)
    return activations


class ExpertCoefficients:
    """Per-sample, per-expert sums of ``|a_e|`` and counts over the profiled routed positions.

    A forward pre-hook on each layer's experts module reads the hidden states and the routing it
    is called with (``(hidden_states, top_k_index, top_k_weights)``, positionally or by name);
    ``start(mask)`` sets the profiled positions ``(batch, sequence)`` of the next forward pass and
    ``results()`` returns, per layer with experts, sums ``(batch, E, m)`` float64 and counts
    ``(batch, E)`` int64.
    """

    def __init__(self, modules: list[Any | None]) -> None:
        self.modules = modules
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> ExpertCoefficients:
        for layer, module in enumerate(self.modules):
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start(self, mask: torch.Tensor) -> None:
        self._mask = mask
        self._results = {}

    def results(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        expected = [layer for layer, module in enumerate(self.modules) if module is not None]
        if sorted(self._results) != expected:
            raise ModelError("the forward pass did not run every decoder layer's experts")
        return self._results

    def _hook(self, layer: int) -> Any:
        import torch

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask = self._mask
            assert mask is not None, "ExpertCoefficients.start sets it first"
            values = list(args) + [kwargs[name] for name in kwargs]
            hidden, routing = values[0], values[1]  # (tokens, d), (tokens, k)
            batch, sequence = mask.shape
            if hidden.dim() != 2 or hidden.shape[0] != batch * sequence or routing.shape[0] != hidden.shape[0]:
                raise ModelError(
                    f"the experts of layer {layer} saw hidden states {tuple(hidden.shape)} and routing "
                    f"{tuple(routing.shape)}; expected ({batch * sequence}, d) and ({batch * sequence}, k)"
                )
            flat = mask.reshape(-1)  # (tokens,): row-major, as the sparse block flattens (batch, sequence)
            rows = torch.arange(batch, device=mask.device).repeat_interleave(sequence)[flat]  # (positions,)
            selected, selected_routing = hidden[flat], routing[flat]  # (positions, d), (positions, k)
            count = int(module.down_proj.shape[0])
            sums: torch.Tensor | None = None
            counts = torch.zeros(batch, count, dtype=torch.int64, device=mask.device)
            for expert in range(count):
                routed = (selected_routing == expert).any(dim=-1)  # (positions,)
                activations = expert_activations(module, expert, selected[routed]).abs().to(torch.float64)
                if sums is None:
                    sums = torch.zeros(batch, count, activations.shape[-1], dtype=torch.float64, device=mask.device)
                sums[:, expert].index_add_(0, rows[routed], activations)  # (batch, m)
                counts[:, expert] = torch.bincount(rows[routed], minlength=batch)
            assert sums is not None
            self._results[layer] = (sums, counts)

        return hook
