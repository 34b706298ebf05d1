"""Tiny random mixture-of-experts checkpoints, built offline (the MoE companion of ``kvwctl.testing``).

Each is a real transformers 5 model with a few routed experts per layer, saved by
``save_pretrained`` — which writes the layout the family's published checkpoints use — in several
shards:

* ``mixtral`` — ``model.layers.N.block_sparse_moe.experts.E.w2.weight`` per expert; the Mistral
  template (it writes ``<s>``; the tokenizer adds it too).
* ``qwen2_moe`` — ``model.layers.N.mlp.experts.E.down_proj.weight`` per expert plus the shared
  expert ``mlp.shared_expert.down_proj.weight``; layer 1 is dense (``mlp_only_layers``). ChatML.
* ``qwen3_moe`` — per-expert weights as Qwen2-MoE, no shared expert; layer 2 dense. ChatML.
* ``gpt_oss`` — fused ``model.layers.N.mlp.experts.down_proj`` ``(E, m, d)`` with its bias. A
  ChatML template stands in for the harmony format (the template is not what is tested here).
* ``qwen3_vl_moe`` — a vision-language model: fused
  ``model.language_model.layers.N.mlp.experts.down_proj`` ``(E, m, d)`` and ``gate_up_proj``
  ``(E, d, 2m)``, the orientation of the transformers 4.x module that the published checkpoints
  were saved from (5.24 transposes them at load time; its own ``save_pretrained`` writes
  ``(E, d, m)``, which ``layout="module"`` keeps); layer 1 dense. ChatML, the Qwen2-VL image
  processor with 14-pixel patches.

``layout="module"`` saves the transformers 5 module tree instead (fused ``mlp.experts.down_proj``
``(E, d, m)`` and ``gate_up_proj``), which transformers loads as well.

    python -m kvwctl.testing_moe mixtral /tmp/tiny-mixtral [--layout module]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kvwctl.files import save_safetensors_atomically, write_text_atomically
from kvwctl.testing import (
    CHATML_TEMPLATE,
    MISTRAL_TEMPLATE,
    _text_config,
    byte_level_tokenizer,
    sentencepiece_tokenizer,
)

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "qwen3_vl_moe")
NUM_EXPERTS = 4


def build_moe(model_type: str, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random mixture-of-experts model (4 layers, 4 experts, top 2) and its tokenizer."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if model_type == "mixtral":
        tokenizer = sentencepiece_tokenizer()
        tokenizer.chat_template = MISTRAL_TEMPLATE
        config: Any = tf.MixtralConfig(**_text_config(tokenizer), num_local_experts=NUM_EXPERTS, num_experts_per_tok=2)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        tokenizer = byte_level_tokenizer()
        tokenizer.chat_template = CHATML_TEMPLATE
        experts: dict[str, Any] = dict(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=24)
        if model_type == "qwen2_moe":
            config = tf.Qwen2MoeConfig(
                **_text_config(tokenizer), **experts, shared_expert_intermediate_size=40, mlp_only_layers=[1]
            )
        else:
            config = tf.Qwen3MoeConfig(**_text_config(tokenizer), **experts, mlp_only_layers=[2], head_dim=8)  # type: ignore[call-arg]
    elif model_type == "gpt_oss":
        tokenizer = byte_level_tokenizer()
        tokenizer.chat_template = CHATML_TEMPLATE
        config = tf.GptOssConfig(
            **_text_config(tokenizer),
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    elif model_type == "qwen3_vl_moe":
        return _qwen3_vl_moe()
    else:
        raise ValueError(f"no tiny mixture-of-experts model for {model_type!r}")
    model = tf.AutoModelForCausalLM.from_config(config)
    _spread_routing(model, model_type)
    return model, tokenizer


def _spread_routing(model: Any, model_type: str) -> None:
    import torch

    # Random routers of a tiny model route almost every token alike; larger router weights spread
    # the tokens over the experts, so that each expert's own count is exercised.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                parameter.normal_(0.0, 1.0)
            if model_type == "gpt_oss" and "experts" in name:
                parameter.normal_(0.0, 0.05)  # from_config leaves gpt-oss's expert tensors uninitialised


def _qwen3_vl_moe() -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = byte_level_tokenizer()
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True}
    text = _text_config(
        tokenizer,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        mlp_only_layers=[1],
        head_dim=8,
        rope_parameters=rope,
    )
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=24,
        num_heads=2,
        out_hidden_size=32,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[1],
    )
    model = tf.Qwen3VLMoeForConditionalGeneration(tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids))
    _spread_routing(model, "qwen3_vl_moe")
    pixels = 56 * 56
    processor = tf.Qwen3VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2),
        tokenizer=tokenizer,
        video_processor=tf.Qwen3VLVideoProcessor(),
        chat_template=CHATML_TEMPLATE,
    )
    return model, processor


def save_moe(model: Any, tokenizer: Any, out: Path, *, layout: str = "hub", max_shard_size: str = "40KB") -> Path:
    """Save in several shards, in the published layout (``hub``) or the module tree (``module``)."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    if layout == "module":
        if model.config.model_type != "qwen3_vl_moe":  # whose save_pretrained writes the module layout
            _write_module_layout(model, out)
    elif layout == "hub" and model.config.model_type == "qwen3_vl_moe":
        _transpose_fused_experts(out)
    elif layout != "hub":
        raise ValueError(f"unknown layout {layout!r}")
    return out


def _write_module_layout(model: Any, out: Path) -> None:
    """Replace the shards by the in-memory state dict (fused experts), split in two shards."""
    index_path = out / "model.safetensors.index.json"
    for shard in sorted(set(json.loads(index_path.read_text())["weight_map"].values())):
        (out / shard).unlink()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_safetensors_atomically({name: state[name] for name in shard_names}, out / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    write_text_atomically(index_path, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _transpose_fused_experts(out: Path) -> None:
    """Store every fused expert tensor ``(E, a, b)`` as ``(E, b, a)``, each shard replaced atomically."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(str(out / shard), framework="pt") as stream:
            metadata = stream.metadata()
            tensors = {name: stream.get_tensor(name) for name in stream.keys()}
        for name, tensor in tensors.items():
            if name.endswith(("experts.down_proj", "experts.gate_up_proj")):
                tensors[name] = tensor.transpose(1, 2).contiguous()
        save_safetensors_atomically(tensors, out / shard, metadata)


def build_moe_checkpoint(model_type: str, out: Path, *, layout: str = "hub", seed: int = 0) -> Path:
    model, tokenizer = build_moe(model_type, seed=seed)
    return save_moe(model, tokenizer, out, layout=layout)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) not in (2, 4) or (len(arguments) == 4 and arguments[2] != "--layout"):
        sys.exit("usage: python -m kvwctl.testing_moe MODEL_TYPE OUT_DIR [--layout hub|module]")
    from transformers.utils import logging

    logging.disable_progress_bar()
    layout = arguments[3] if len(arguments) == 4 else "hub"
    print(build_moe_checkpoint(arguments[0], Path(arguments[1]), layout=layout))
