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
  ``a_i`` — is **column** ``i`` (axis 1). GPT-2's ``Conv1D`` stores ``[m, d_model]`` (in, out)
  and computes ``x @ W``, so its vectors are **rows** (axis 0).
* ``published`` — the family's reference published checkpoint; README's table of supported models
  says how each layout was checked (published weight names, transformers' load-time renames).
* ``experts`` — for mixture-of-experts families (:class:`ExpertLayout`), where the routed experts
  are: every expert has its own ``m`` knowledge vectors, stored on disk either as one 2-D weight
  per expert or as one fused 3-D tensor per layer, and held in memory by transformers 5 as one
  fused 3-D parameter. A shared expert (Qwen2-MoE) is an ordinary MLP: its down projection is the
  layer's dense down projection (``shared_down_proj``).

Vision-language families keep the language model's layers under their own prefix: the
``language_model.model.layers.N`` of LLaVA-style checkpoints (Gemma 3, LLaVA-NeXT,
LLaVA-OneVision, InternVL-hf, Mllama, Mistral 3, PaliGemma), the ``model.language_model.layers.N`` of Qwen3-VL
(published after the transformers 4.52 refactor, beside ``model.visual.blocks``) and the
``model.text_model.layers.N`` of Idefics3 / SmolVLM. Every pattern must match the whole name, so
vision towers (``vision_tower.…``, ``model.visual.…``, ``model.vision_model.…``) never match.
Mllama's cross-attention layers are decoder layers with an MLP like the others: they are numbered
with the self-attention layers (``text_config.num_hidden_layers`` counts both) and edited alike.
PaliGemma has no chat template and its processor rewrites the text it is given (``<bos>`` after
the images, ``"\n"`` after the prompt, the answer as ``suffix=``): ``rendering="prefix-suffix"``
selects ``kvwctl.prefix_suffix`` for it, and every sample needs an image.
Mixture-of-experts families have their own entries (``MOE_REGISTRY``) beside these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
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
    published: str = ""  # the family's reference published checkpoint (README: how its layout was checked)
    image_required: str | None = None  # why every sample must have an image, for the families that need one
    experts: ExpertLayout | None = None
    # How samples become the processor's input: "chat" (the chat template renders the conversation)
    # or "prefix-suffix" (no chat template; the answer goes to the processor as suffix=: PaliGemma).
    rendering: str = "chat"

    def disk_layer(self, tensor_name: str) -> int | None:
        """The decoder-layer index of a down-projection weight stored as ``tensor_name``."""
        for pattern in self.disk_patterns:
            match = re.fullmatch(pattern, tensor_name)
            if match:
                return int(match.group("layer"))
        return None

    @property
    def module_path(self) -> str:
        """The down projection of layer N in memory: ``model.language_model.layers.N.mlp.down_proj``."""
        return f"{self.decoder_layers}.N.{self.down_proj}"

    @property
    def disk_layouts(self) -> list[str]:
        """The ``disk_patterns`` as names, ``N`` for the layer: ``model.layers.N.mlp.down_proj.weight``."""
        return [pattern.replace(r"(?P<layer>\d+)", "N").replace("\\.", ".") for pattern in self.disk_patterns]

    def to_json(self) -> dict[str, Any]:
        """What ``kvwctl architectures --json`` prints for this family."""
        return {
            "model_type": self.model_type,
            "multimodal": self.multimodal,
            "auto_class": self.auto_class,
            "module_path": self.module_path,
            "disk_layouts": self.disk_layouts,
            "disk_patterns": list(self.disk_patterns),
            "vector_axis": self.vector_axis,
            "published": self.published,
            "image_required": self.image_required is not None,
        }


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts family keeps its routed experts, in memory and on disk.

    * ``module`` — the experts module inside a decoder layer (``mlp.experts``): transformers 5
      holds ``down_proj`` there as one 3-D parameter, ``(E, d_model, m)`` (``memory_axis`` 2) or,
      for gpt-oss, ``(E, m, d_model)`` (``memory_axis`` 1).
    * ``per_expert_patterns`` — on-disk names of one 2-D ``nn.Linear`` weight ``(d_model, m)`` per
      expert (groups ``layer`` and ``expert``): vectors are columns.
    * ``fused_patterns`` — on-disk names of one fused 3-D tensor per layer (group ``layer``), each
      with the axis that indexes the vectors; 0 when the shape decides, as transformers'
      ``Transpose(1, 2, check_dims=True)`` does on load (Qwen3-VL-MoE): ``(E, d, m)`` as in
      memory (also when ``d == m``) is axis 2, ``(E, m, d)`` axis 1.
    * ``shared_down_proj`` — the shared expert's down projection inside a layer (in memory), if the
      family has one; its on-disk name is among the architecture's ``disk_patterns``.
    * ``num_experts_keys`` — the config keys that may hold the number of routed experts (the
      published Qwen3-MoE configs write ``num_experts``, transformers 5.24 ``num_local_experts``).
    """

    module: str
    memory_axis: int
    per_expert_patterns: tuple[str, ...]
    fused_patterns: tuple[tuple[str, int], ...]
    num_experts_keys: tuple[str, ...]
    shared_down_proj: str | None = None

    def disk_match(self, tensor_name: str) -> tuple[int, int | None, int] | None:
        """``(layer, expert or None when fused, vector axis)`` of an expert down projection on disk."""
        for pattern in self.per_expert_patterns:
            match = re.fullmatch(pattern, tensor_name)
            if match:
                return int(match.group("layer")), int(match.group("expert")), 1
        for pattern, axis in self.fused_patterns:
            match = re.fullmatch(pattern, tensor_name)
            if match:
                return int(match.group("layer")), None, axis
        return None


_DOWN = r"\.layers\.(?P<layer>\d+)\.mlp\.down_proj\.weight"


def _text_only(model_type: str, published: str = "") -> Architecture:
    return Architecture(
        model_type=model_type,
        multimodal=False,
        auto_class="AutoModelForCausalLM",
        decoder_layers="model.layers",
        down_proj="mlp.down_proj",
        disk_patterns=(r"model" + _DOWN,),
        published=published,
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


def _llava_style(model_type: str, published: str) -> Architecture:
    """A vision-language model whose Hub checkpoints store ``language_model.model.layers.N…``."""
    return Architecture(
        model_type=model_type,
        multimodal=True,
        auto_class="AutoModelForImageTextToText",
        decoder_layers="model.language_model.layers",
        down_proj="mlp.down_proj",
        # The Hub layout, then the layout of the transformers 5 module tree.
        disk_patterns=(r"language_model\.model" + _DOWN, r"model\.language_model" + _DOWN),
        published=published,
    )


REGISTRY: dict[str, Architecture] = {
    architecture.model_type: architecture
    for architecture in (
        _llava_style("llava", "llava-hf/llava-1.5-7b-hf"),
        _qwen_vl("qwen2_vl"),
        _qwen_vl("qwen2_5_vl"),
        Architecture(
            model_type="qwen3_vl",
            multimodal=True,
            auto_class="AutoModelForImageTextToText",
            decoder_layers="model.language_model.layers",
            down_proj="mlp.down_proj",
            # Published in the module-tree layout, beside model.visual.blocks.N.mlp.linear_fc2.
            disk_patterns=(r"model\.language_model" + _DOWN,),
            published="Qwen/Qwen3-VL-2B-Instruct",
        ),
        _llava_style("gemma3", "google/gemma-3-4b-it"),
        *(
            Architecture(
                model_type=model_type,
                multimodal=True,
                auto_class="AutoModelForImageTextToText",
                decoder_layers="model.text_model.layers",
                down_proj="mlp.down_proj",
                disk_patterns=(r"model\.text_model" + _DOWN,),
                published=published,
            )
            for model_type, published in (
                ("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3"),
                ("smolvlm", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
            )
        ),
        _llava_style("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf"),
        _llava_style("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        _llava_style("internvl", "OpenGVLab/InternVL3-1B-hf"),
        replace(
            _llava_style("mllama", "meta-llama/Llama-3.2-11B-Vision-Instruct"),
            # MllamaTextModel skips its cross-attention layers (and their MLPs) without an image, and
            # its image processor cannot batch an image-less sample first: no coefficients for them.
            image_required="Mllama runs its cross-attention layers (and their MLPs) only with an image",
        ),
        _llava_style("mistral3", "mistralai/Mistral-Small-3.1-24B-Instruct-2503"),
        replace(
            _llava_style("paligemma", "google/paligemma2-3b-pt-224"),
            rendering="prefix-suffix",
            image_required="PaliGemma's processor refuses text without an image",
        ),
        _text_only("llama", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        _text_only("qwen2"),
        _text_only("mistral"),
        _text_only("qwen3", "Qwen/Qwen3-0.6B"),
        _text_only("gemma2", "google/gemma-2-2b-it"),
        _text_only("gemma3_text", "google/gemma-3-1b-it"),
        # Fused gate_up_proj; the down projection's input is still act(gate) * up.
        _text_only("phi3", "microsoft/Phi-3-mini-4k-instruct"),
        _text_only("olmo2", "allenai/OLMo-2-1124-7B-Instruct"),
        Architecture(
            model_type="gpt2",
            multimodal=False,
            auto_class="AutoModelForCausalLM",
            decoder_layers="transformer.h",
            down_proj="mlp.c_proj",
            # The Hub's GPT-2 weights have no prefix; save_pretrained writes "transformer.".
            disk_patterns=(
                r"h\.(?P<layer>\d+)\.mlp\.c_proj\.weight",
                r"transformer\.h\.(?P<layer>\d+)\.mlp\.c_proj\.weight",
            ),
            vector_axis=0,  # Conv1D: weight (m, d_model), the output is a @ W
            published="openai-community/gpt2",
        ),
        Architecture(
            model_type="gpt_neox",
            multimodal=False,
            auto_class="AutoModelForCausalLM",
            decoder_layers="gpt_neox.layers",
            down_proj="mlp.dense_4h_to_h",
            disk_patterns=(r"gpt_neox\.layers\.(?P<layer>\d+)\.mlp\.dense_4h_to_h\.weight",),
            published="EleutherAI/pythia-160m",
        ),
    )
}

# --- mixture of experts --------------------------------------------------------------------------
# Layouts read from transformers 5.24 (conversion_mapping.py, which renames and fuses the published
# per-expert tensors at load time, and each family's modeling file) and from what its
# save_pretrained writes back:
#   mixtral       disk model.layers.N.block_sparse_moe.experts.E.w2.weight (d, m)  -> memory
#                 model.layers.N.mlp.experts.down_proj (E, d, m)
#   qwen2_moe,    disk model.layers.N.mlp.experts.E.down_proj.weight (d, m); qwen2_moe's shared
#   qwen3_moe     expert model.layers.N.mlp.shared_expert.down_proj.weight; dense layers
#                 (mlp_only_layers, decoder_sparse_step) model.layers.N.mlp.down_proj.weight
#   qwen3_vl_moe  disk model.language_model.layers.N.mlp.experts.down_proj fused, (E, m, d) as the
#                 4.x module held it (transposed at load time) or (E, d, m) as 5.24 saves it
#   gpt_oss       disk = memory model.layers.N.mlp.experts.down_proj (E, m, d) with a bias; the
#                 published openai/gpt-oss files are MXFP4 (down_proj_blocks/_scales): refused.
# The module-tree fused layout (model.layers.N.mlp.experts.down_proj (E, d, m)) is accepted for
# mixtral and the Qwen MoE families too.

_LAYER = r"\.layers\.(?P<layer>\d+)"
_FUSED_MODULE = ((r"model" + _LAYER + r"\.mlp\.experts\.down_proj", 2),)


def _qwen_moe(model_type: str, *, shared: bool) -> Architecture:
    dense: tuple[str, ...] = (r"model" + _DOWN,)
    if shared:
        dense += (r"model" + _LAYER + r"\.mlp\.shared_expert\.down_proj\.weight",)
    return Architecture(
        model_type=model_type,
        multimodal=False,
        auto_class="AutoModelForCausalLM",
        decoder_layers="model.layers",
        down_proj="mlp.down_proj",
        disk_patterns=dense,
        experts=ExpertLayout(
            module="mlp.experts",
            memory_axis=2,
            per_expert_patterns=(r"model" + _LAYER + r"\.mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight",),
            fused_patterns=_FUSED_MODULE,
            num_experts_keys=("num_experts", "num_local_experts"),
            shared_down_proj="mlp.shared_expert.down_proj" if shared else None,
        ),
    )


MOE_REGISTRY: dict[str, Architecture] = {
    architecture.model_type: architecture
    for architecture in (
        Architecture(
            model_type="mixtral",
            multimodal=False,
            auto_class="AutoModelForCausalLM",
            decoder_layers="model.layers",
            down_proj="mlp.down_proj",  # no dense MLP: every layer is sparse
            disk_patterns=(),
            experts=ExpertLayout(
                module="mlp.experts",
                memory_axis=2,
                per_expert_patterns=(r"model" + _LAYER + r"\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight",),
                fused_patterns=_FUSED_MODULE,
                num_experts_keys=("num_local_experts", "num_experts"),
            ),
        ),
        _qwen_moe("qwen2_moe", shared=True),
        _qwen_moe("qwen3_moe", shared=False),
        Architecture(
            model_type="qwen3_vl_moe",
            multimodal=True,
            auto_class="AutoModelForImageTextToText",
            decoder_layers="model.language_model.layers",
            down_proj="mlp.down_proj",
            disk_patterns=(r"model\.language_model" + _DOWN,),
            experts=ExpertLayout(
                module="mlp.experts",
                memory_axis=2,
                per_expert_patterns=(),
                # Axis 0: by shape, as transformers' Transpose(1, 2, check_dims=True) decides.
                fused_patterns=((r"model\.language_model" + _LAYER + r"\.mlp\.experts\.down_proj", 0),),
                num_experts_keys=("num_experts", "num_local_experts"),
            ),
        ),
        Architecture(
            model_type="gpt_oss",
            multimodal=False,
            auto_class="AutoModelForCausalLM",
            decoder_layers="model.layers",
            down_proj="mlp.down_proj",  # no dense MLP: every layer is sparse
            disk_patterns=(),
            experts=ExpertLayout(
                module="mlp.experts",
                memory_axis=1,
                per_expert_patterns=(),
                fused_patterns=((r"model" + _LAYER + r"\.mlp\.experts\.down_proj", 1),),
                num_experts_keys=("num_local_experts", "num_experts"),
            ),
        ),
    )
}
REGISTRY.update(MOE_REGISTRY)


def get_architecture(model_type: str | None) -> Architecture:
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    supported = ", ".join(sorted(REGISTRY))
    raise ModelError(
        f"unsupported model_type {model_type!r}",
        hint=f"supported model types: {supported} (kvwctl architectures lists their layouts)",
    )


def num_decoder_layers(config: dict[str, Any]) -> int:
    """The number of language-model decoder layers from a ``config.json`` dictionary."""
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and isinstance(text_config.get("num_hidden_layers"), int):
        return int(text_config["num_hidden_layers"])
    for key in ("num_hidden_layers", "n_layer"):  # n_layer: GPT-2's config.json
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ModelError("config.json gives no num_hidden_layers for the language model")


def context_length(config: dict[str, Any]) -> int | None:
    """The language model's context in tokens (``max_position_embeddings``), if config.json gives it."""
    text_config = config.get("text_config")
    for source in (text_config if isinstance(text_config, dict) else {}, config):
        for key in ("max_position_embeddings", "n_positions"):  # n_positions: GPT-2's config.json
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
