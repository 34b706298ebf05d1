"""The architecture registry: where each supported model keeps its knowledge vectors.

For every ``model_type`` this is data, not guesswork (DESIGN §5):

* ``decoder_layers`` — the module path of the language model's decoder layers in memory, as
  transformers 5 builds the model (``model.language_model.layers`` for LLaVA and Qwen2-VL);
  ``down_proj`` is the down projection inside one layer. Profiling hooks attach there.
* ``disk_patterns`` — regular expressions for the down-projection weights **on disk**, one for
  each layout the checkpoints of that family are published in. transformers 5 renames keys at
  load time, so the on-disk names differ from the module paths: the Hub's LLaVA-1.5 checkpoints
  store ``language_model.model.layers.N.mlp.down_proj.weight`` (the module is
  ``model.language_model.layers.N.mlp.down_proj``), Qwen2-VL stores ``model.layers.N...`` beside
  ``visual.blocks.*``. Vision-tower MLPs never match, so they are never edited.
* ``vector_axis`` — the axis of the weight that indexes knowledge vectors. ``nn.Linear`` stores
  ``weight`` as ``[d_model, m]`` (out, in), so vector ``i`` — the weights multiplying input
  ``a_i`` — is **column** ``i`` (axis 1). GPT-2's ``Conv1D`` stores ``[m, d_model]`` and would
  use rows (axis 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kvwctl.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    multimodal: bool
    auto_class: str
    decoder_layers: str
    down_proj: str
    disk_patterns: tuple[str, ...]
    vector_axis: int = 1

    def disk_layer(self, tensor_name: str) -> int | None:
        """The decoder-layer index of a down-projection weight stored as ``tensor_name``."""
        for pattern in self.disk_patterns:
            match = re.fullmatch(pattern, tensor_name)
            if match:
                return int(match.group("layer"))
        return None


_DOWN = r"\.layers\.(?P<layer>\d+)\.mlp\.down_proj\.weight"


def _text_only(model_type: str) -> Architecture:
    return Architecture(
        model_type=model_type,
        multimodal=False,
        auto_class="AutoModelForCausalLM",
        decoder_layers="model.layers",
        down_proj="mlp.down_proj",
        disk_patterns=(r"model" + _DOWN,),
    )


def _qwen_vl(model_type: str) -> Architecture:
    return Architecture(
        model_type=model_type,
        multimodal=True,
        auto_class="AutoModelForImageTextToText",
        decoder_layers="model.language_model.layers",
        down_proj="mlp.down_proj",
        # The Hub layout, then the layout of the transformers 5 module tree.
        disk_patterns=(r"model" + _DOWN, r"model\.language_model" + _DOWN),
    )


REGISTRY: dict[str, Architecture] = {
    architecture.model_type: architecture
    for architecture in (
        Architecture(
            model_type="llava",
            multimodal=True,
            auto_class="AutoModelForImageTextToText",
            decoder_layers="model.language_model.layers",
            down_proj="mlp.down_proj",
            # The Hub layout, then the layout of the transformers 5 module tree.
            disk_patterns=(r"language_model\.model" + _DOWN, r"model\.language_model" + _DOWN),
        ),
        _qwen_vl("qwen2_vl"),
        _qwen_vl("qwen2_5_vl"),
        _text_only("llama"),
        _text_only("qwen2"),
        _text_only("mistral"),
    )
}


def get_architecture(model_type: str | None) -> Architecture:
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    supported = ", ".join(sorted(REGISTRY))
    raise ModelError(
        f"unsupported model_type {model_type!r}",
        hint=f"supported model types: {supported}",
    )


def num_decoder_layers(config: dict[str, Any]) -> int:
    """The number of language-model decoder layers from a ``config.json`` dictionary."""
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and isinstance(text_config.get("num_hidden_layers"), int):
        return int(text_config["num_hidden_layers"])
    if isinstance(config.get("num_hidden_layers"), int):
        return int(config["num_hidden_layers"])
    raise ModelError("config.json gives no num_hidden_layers for the language model")


def context_length(config: dict[str, Any]) -> int | None:
    """The language model's context in tokens (``max_position_embeddings``), if config.json gives it."""
    text_config = config.get("text_config")
    for source in (text_config if isinstance(text_config, dict) else {}, config):
        value = source.get("max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
