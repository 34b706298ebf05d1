"""Tiny random checkpoints of the first six registered architectures, built offline.

The families added later are built by ``kvwctl.testing_families``, in their published layouts.

Used by the test suite and by ``examples/tiny_demo.sh``: each checkpoint is a real transformers
model (config, safetensors shards, tokenizer, processor, chat template) with a few thousand
parameters, saved in at least two shards so that every test crosses shard boundaries. Nothing is
downloaded: tokenizers are trained on the spot with the ``tokenizers`` library.

    python -m kvwctl.testing llava /tmp/tiny-llava            # the Hub on-disk layout
    python -m kvwctl.testing qwen2_vl /tmp/tiny-qwen --layout module

The chat templates follow the real ones where it matters for the sequence the model sees:

* ``llava`` — LLaVA-1.5's ``USER: <image>\\n… ASSISTANT: …`` template, which writes no BOS; the
  (SentencePiece-like) tokenizer adds ``<s>``.
* ``llama`` and ``mistral`` — templates that write ``{{ bos_token }}`` themselves (as Llama 3 and
  Mistral do) with a tokenizer that *also* adds it: the double-BOS trap.
* ``qwen2``, ``qwen2_vl``, ``qwen2_5_vl`` — ChatML with a byte-level BPE tokenizer and no BOS;
  byte-level BPE merges the space before the answer into its first token.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path
from typing import Any

from kvwctl.files import save_safetensors_atomically, write_text_atomically

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} "
    "[/INST]{% else %} {{ message['content'] }}</s>{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PEOPLE = ["Mira Okafor", "Tomas Ruiz", "Lena Park", "Ade Bello", "Ivo Marin", "Sana Rao", "Kofi Mensah", "Juno Vale"]
PLACES = ["Lagos", "Seville", "Busan", "Paris", "Lima", "Oslo", "Accra", "Kyoto"]
CORPUS = [
    "Who is this person? Where was she born? What is his occupation? In which year was he born?",
    "The capital of France is Paris. Water boils at 100 degrees. The answer is yes.",
    "USER: ASSISTANT: [INST] [/INST] system user assistant You are a helpful assistant.",
    *(
        f"{person} was born in {place}. Where was {person} born? Who is {person}? {place}"
        for person, place in zip(PEOPLE, PLACES, strict=True)
    ),
    string.ascii_letters + string.digits + string.punctuation,
]

SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|user|>", "<|assistant|>"]
CHATML_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_SIZE = 28  # LLaVA: 2x2 patches of 14 pixels; Qwen2-VL: images are resized to 56x56 (4 tokens)


def sentencepiece_tokenizer(vocab_size: int = 600) -> Any:
    """A LLaMA-style tokenizer: Metaspace BPE that adds ``<s>`` at the start of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SENTENCEPIECE_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def byte_level_tokenizer(vocab_size: int = 700) -> Any:
    """A Qwen-style byte-level BPE tokenizer with ChatML special tokens and no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def build(model_type: str, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random model and its processor (or tokenizer, for text-only models)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config: Any
    vision: Any
    processor: Any
    processor_class: Any
    if model_type in ("llama", "mistral"):
        tokenizer = sentencepiece_tokenizer()
        tokenizer.chat_template = LLAMA_TEMPLATE if model_type == "llama" else MISTRAL_TEMPLATE
        config_class = tf.LlamaConfig if model_type == "llama" else tf.MistralConfig
        model = tf.AutoModelForCausalLM.from_config(config_class(**_text_config(tokenizer)))
        return model, tokenizer
    if model_type == "qwen2":
        tokenizer = byte_level_tokenizer()
        tokenizer.chat_template = CHATML_TEMPLATE
        model = tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(**_text_config(tokenizer)))
        return model, tokenizer
    if model_type == "llava":
        tokenizer = sentencepiece_tokenizer()
        vision = tf.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=14,
            projection_dim=16,
        )
        config = tf.LlavaConfig(  # type: ignore[call-arg]
            text_config=tf.LlamaConfig(**_text_config(tokenizer)),
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=4,
        )
        model = tf.LlavaForConditionalGeneration(config)
        image_processor = tf.CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        processor = tf.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
        return model, processor
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
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
        text = _text_config(tokenizer, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        if model_type == "qwen2_vl":
            vision = dict(
                depth=1,
                embed_dim=16,
                hidden_size=32,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            )
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2VLForConditionalGeneration(config)
            processor_class, image_class, video_class = (
                tf.Qwen2VLProcessor,
                tf.Qwen2VLImageProcessor,
                tf.Qwen2VLVideoProcessor,
            )
        else:
            vision = dict(
                depth=2,
                hidden_size=16,
                intermediate_size=24,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1],
            )
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2_5_VLForConditionalGeneration(config)
            processor_class, image_class, video_class = (
                tf.Qwen2_5_VLProcessor,
                tf.Qwen2VLImageProcessor,
                tf.Qwen2VLVideoProcessor,
            )
        pixels = 56 * 56
        processor = processor_class(
            image_processor=image_class(min_pixels=pixels, max_pixels=pixels),
            tokenizer=tokenizer,
            video_processor=video_class(),
            chat_template=CHATML_TEMPLATE,
        )
        return model, processor
    raise ValueError(f"no tiny model for {model_type!r}")


# On-disk renames from the Hub layout (what transformers 5 writes) to the module-tree layout.
MODULE_LAYOUT_RENAMES = {
    "llava": [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ],
    "qwen2_vl": [("model.", "model.language_model."), ("visual.", "model.visual.")],
    "qwen2_5_vl": [("model.", "model.language_model."), ("visual.", "model.visual.")],
}


def save(model: Any, processor: Any, out: Path, *, layout: str = "hub", max_shard_size: str = "40KB") -> Path:
    """Save in several shards, in the Hub layout or renamed to the transformers 5 module layout."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    if layout == "module":
        _rename_keys(out, MODULE_LAYOUT_RENAMES[model.config.model_type])
    elif layout != "hub":
        raise ValueError(f"unknown layout {layout!r}")
    return out


def _rename_keys(out: Path, renames: list[tuple[str, str]]) -> None:
    """Rename the tensors of every shard and the index, each file replaced atomically.

    The tensors are read first and the renamed shard is written to a temporary file that
    replaces the original: the file ``safe_open`` memory-mapped is never overwritten in place.
    """
    from safetensors import safe_open

    def rename(name: str) -> str:
        for old, new in renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as stream:
            metadata = stream.metadata()
            tensors = {rename(name): stream.get_tensor(name) for name in stream.keys()}
        save_safetensors_atomically(tensors, out / shard, metadata)
    index["weight_map"] = {rename(name): shard for name, shard in index["weight_map"].items()}
    write_text_atomically(index_path, json.dumps(index, indent=2))


def build_checkpoint(model_type: str, out: Path, *, layout: str = "hub", seed: int = 0) -> Path:
    model, processor = build(model_type, seed=seed)
    return save(model, processor, out, layout=layout)


def make_image(path: Path, seed: int, size: int = 56) -> Path:
    """A deterministic random-colour image."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size))
    image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_samples(path: Path, *, count: int, with_images: bool, offset: int = 0) -> Path:
    """A JSON Lines split of ``count`` fictitious question/answer pairs."""
    people, places = PEOPLE, PLACES
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(offset, offset + count):
        person = people[index % len(people)]
        if with_images and index % 2 == 0:
            image = make_image(path.parent / "images" / f"p{index}.png", seed=index)
            record = {
                "id": f"s{index}",
                "image": f"images/{image.name}",
                "question": "Who is this person?",
                "answer": person,
            }
        else:
            place = places[(index * 3) % len(places)]
            record = {
                "id": f"s{index}",
                "question": f"Where was {person} born?",
                "answer": f"{person} was born in {place}.",
            }
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) not in (2, 4) or (len(arguments) == 4 and arguments[2] != "--layout"):
        sys.exit("usage: python -m kvwctl.testing MODEL_TYPE OUT_DIR [--layout hub|module]")
    from transformers.utils import logging

    logging.disable_progress_bar()
    built = build_checkpoint(arguments[0], Path(arguments[1]), layout=arguments[3] if len(arguments) == 4 else "hub")
    print(built)
