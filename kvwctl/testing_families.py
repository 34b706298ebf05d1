"""Tiny random checkpoints of the families beyond ``kvwctl.testing``'s six, built offline.

Each builder (text-only families here, vision-language ones in ``kvwctl.testing_vision``) returns
a real transformers model of the family (one or two decoder layers, hidden
size 32) and its real processor or tokenizer, with a tokenizer trained on the spot, a small image
size and a chat template shaped like the family's own where it matters: where the BOS comes from
and which placeholder stands for an image. ``save_published`` saves it in several shards and then
renames the tensors from what ``save_pretrained`` writes to the layout the family's published
checkpoints use (``PUBLISHED_RENAMES``; the families not listed are published exactly as
transformers 5 saves them).

    python -m kvwctl.testing_families gpt2 /tmp/tiny-gpt2

The layouts were read from published checkpoints' weight names (README, "Supported models").
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvwctl.testing import CORPUS, _rename_keys

# --- tokenizers and templates --------------------------------------------------------------------


def trained_tokenizer(
    specials: list[str],
    *,
    byte_level: bool,
    bos: str | None = None,
    eos: str,
    pad: str,
    unk: str | None = None,
    adds_bos: bool = False,
    extra: dict[str, str] | None = None,
    vocab_size: int = 500,
) -> Any:
    """A fast tokenizer trained on ``kvwctl.testing.CORPUS``: byte-level BPE (GPT-2, Qwen, OLMo) or
    Metaspace BPE (SentencePiece-like: Llama, Gemma, Mistral); ``adds_bos`` prepends ``bos`` to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if byte_level:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=unk))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    if adds_bos:
        assert bos is not None
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{key: value for key, value in named.items() if value is not None},
        extra_special_tokens=extra or {},
    )


def _content(image: str) -> str:
    """Jinja for a message's content: a plain string, or parts with ``image`` for each image part."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image + "{% else %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


def _template(*, start: str, turn: Callable[[str], str], end: str, generation: str, image: str = "") -> str:
    """A chat template: ``start``, then per message ``turn(role)`` + content + ``end``."""
    roles = "{% set role = message['role'] %}"
    heads = "".join(
        "{% " + ("if" if index == 0 else "elif") + " role == '" + role + "' %}" + turn(role)
        for index, role in enumerate(("user", "assistant", "system"))
    )
    return (
        start + "{% for message in messages %}" + roles + heads + "{% endif %}" + _content(image) + end + "{% endfor %}"
        "{% if add_generation_prompt %}" + generation + "{% endif %}"
    )


CHATML = _template(
    start="",
    turn=lambda role: f"<|im_start|>{role}\n",
    end="<|im_end|>\n",
    generation="<|im_start|>assistant\n",
    image="<|vision_start|><|image_pad|><|vision_end|>",
)
GEMMA = _template(
    start="{{ bos_token }}",
    turn=lambda role: f"<start_of_turn>{'model' if role == 'assistant' else role}\n",
    end="<end_of_turn>\n",
    generation="<start_of_turn>model\n",
    image="<start_of_image>",
)
PLAIN = _template(  # GPT-2 and GPT-NeoX publish no chat template; this is the test's own
    start="",
    turn=lambda role: f"{role.capitalize()}: ",
    end="\n",
    generation="Assistant: ",
)
GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
CHATML_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
]


QWEN_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}


def chatml_tokenizer(extra: dict[str, str] | None = None, template: str = CHATML) -> Any:
    """Qwen-style: byte-level, ChatML, no BOS; ``extra`` names the family's image tokens."""
    tokenizer = trained_tokenizer(
        CHATML_SPECIALS,
        byte_level=True,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=QWEN_VL_TOKENS if extra is None else extra,
    )
    tokenizer.chat_template = template
    return tokenizer


def gemma_tokenizer() -> Any:
    """Gemma-style: Metaspace, a template that writes ``<bos>`` and a tokenizer that also adds it."""
    tokenizer = trained_tokenizer(
        GEMMA_SPECIALS,
        byte_level=False,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        adds_bos=True,
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    tokenizer.chat_template = GEMMA
    return tokenizer


def _text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """A tiny decoder's config fields: 2 layers, hidden 32, 4 heads of 8."""
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    fields.update(extra)
    return fields


# --- text-only families --------------------------------------------------------------------------


def _causal(config_name: str, tokenizer: Any, **extra: Any) -> tuple[Any, Any]:
    import transformers as tf

    config = getattr(tf, config_name)(**_text(tokenizer, **extra))
    return tf.AutoModelForCausalLM.from_config(config), tokenizer


def build_qwen3() -> tuple[Any, Any]:
    return _causal("Qwen3Config", chatml_tokenizer())


def build_gemma2() -> tuple[Any, Any]:
    return _causal("Gemma2Config", gemma_tokenizer(), sliding_window=16)


def build_gemma3_text() -> tuple[Any, Any]:
    return _causal("Gemma3TextConfig", gemma_tokenizer(), sliding_window=16)


def build_phi3() -> tuple[Any, Any]:
    """Phi-3: Llama's SentencePiece tokenizer adds ``<s>``; the template writes none; fused gate_up_proj."""
    tokenizer = trained_tokenizer(
        ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        byte_level=False,
        bos="<s>",
        eos="<|end|>",
        pad="<|endoftext|>",
        unk="<unk>",
        adds_bos=True,
    )
    tokenizer.chat_template = _template(
        start="", turn=lambda role: f"<|{role}|>\n", end="<|end|>\n", generation="<|assistant|>\n"
    )
    extra = _text(tokenizer)
    extra.pop("head_dim")
    import transformers as tf

    return tf.AutoModelForCausalLM.from_config(tf.Phi3Config(**extra)), tokenizer


def build_olmo2() -> tuple[Any, Any]:
    """OLMo 2: byte-level, a template that writes ``<|endoftext|>`` (its BOS) itself."""
    tokenizer = trained_tokenizer(
        ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"],
        byte_level=True,
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|pad|>",
    )
    tokenizer.chat_template = _template(
        start="{{ bos_token }}", turn=lambda role: f"<|{role}|>\n", end="\n", generation="<|assistant|>\n"
    )
    extra = _text(tokenizer)
    extra.pop("head_dim")
    import transformers as tf

    return tf.AutoModelForCausalLM.from_config(tf.Olmo2Config(**extra)), tokenizer


def _plain_tokenizer() -> Any:
    tokenizer = trained_tokenizer(
        ["<|endoftext|>"], byte_level=True, bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>"
    )
    tokenizer.chat_template = PLAIN
    return tokenizer


def build_gpt2() -> tuple[Any, Any]:
    """GPT-2: ``Conv1D`` MLP, ``c_proj.weight`` is ``(m, d_model)``; its vectors are rows."""
    import transformers as tf

    tokenizer = _plain_tokenizer()
    config = tf.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_inner=48,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tf.GPT2LMHeadModel(config), tokenizer


def build_gpt_neox() -> tuple[Any, Any]:
    import transformers as tf

    tokenizer = _plain_tokenizer()
    config = tf.GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return tf.GPTNeoXForCausalLM(config), tokenizer


TEXT_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen3": build_qwen3,
    "gemma2": build_gemma2,
    "gemma3_text": build_gemma3_text,
    "phi3": build_phi3,
    "olmo2": build_olmo2,
    "gpt2": build_gpt2,
    "gpt_neox": build_gpt_neox,
}

# From what transformers 5.24's save_pretrained writes to the published layout, where they differ.
PUBLISHED_RENAMES: dict[str, list[tuple[str, str]]] = {
    "gpt2": [("transformer.", "")],  # openai-community/gpt2: h.N.…, wte, wpe, ln_f
    # google/paligemma*: vision_tower.vision_model.encoder.… (5.24 saves vision_tower.encoder.…, loads both)
    "paligemma": [("vision_tower.", "vision_tower.vision_model.")],
}


def build(model_type: str, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random model of ``model_type`` and its processor (or tokenizer)."""
    import torch

    from kvwctl.testing_vision import VISION_BUILDERS

    builders = {**TEXT_BUILDERS, **VISION_BUILDERS}
    if model_type not in builders:
        raise ValueError(f"no tiny model for {model_type!r}")
    torch.manual_seed(seed)
    return builders[model_type]()


def save_published(model: Any, processor: Any, out: Path, *, max_shard_size: str = "40KB") -> Path:
    """Save in several shards, with the tensor names of the family's published checkpoints."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    renames = PUBLISHED_RENAMES.get(model.config.model_type)
    if renames:
        _rename_keys(out, renames)
    return out


def build_checkpoint(model_type: str, out: Path, *, seed: int = 0) -> Path:
    model, processor = build(model_type, seed=seed)
    return save_published(model, processor, out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m kvwctl.testing_families MODEL_TYPE OUT_DIR")
    from transformers.utils import logging

    logging.disable_progress_bar()
    print(build_checkpoint(sys.argv[1], Path(sys.argv[2])))
