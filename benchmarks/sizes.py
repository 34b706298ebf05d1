"""The benchmark's model sizes: random weights at real shapes, and scaled-down ones for 2 CPU cores.

Real shapes (for a GPU): the language models of Qwen2-VL-2B (Qwen2: hidden 1536, MLP 8960, 28
layers, 12 heads / 2 KV heads, vocabulary 151,936) and LLaVA-1.5-7B (Llama 2 7B: hidden 4096,
MLP 11008, 32 layers, 32 heads, vocabulary 32,064), and the whole of Qwen2-VL-2B (its 32-block
vision tower, embed 1280) with one 448x448 image per sample (1024 patches, 256 image tokens).

Scaled-down shapes keep each model's proportions where they decide the comparisons: the head
dimension (128), the ratio of MLP to hidden width, and the language-model head's share of the
compute (the vocabulary is scaled with the layers, so the head costs the same fraction of a
forward pass as at the real size). Weights are random (``from_config``); tokenizers and
processors are the offline ones of ``kvwctl.testing``, so nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvwctl import testing

WORDS = " ".join(testing.CORPUS[:-1]).replace("?", "").replace(".", "").split()


@dataclass(frozen=True)
class Size:
    name: str
    family: str  # qwen2 (Qwen2-VL's language model), llama (LLaVA's) or qwen2_vl (the whole model)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision: dict[str, int] = field(default_factory=dict)  # qwen2_vl only: depth, embed_dim, num_heads
    image: int = 0  # image side in pixels (qwen2_vl only)
    samples: int = 32  # profiled retain samples
    forget: int = 6  # forget samples (accessor, progressive apply)
    eval_samples: int = 8
    batch_size: int = 8
    max_new_tokens: int = 8
    question_words: tuple[int, int] = (4, 48)  # the range of question lengths, in words
    dtype: str = "float32"  # stored on disk
    shard_size: str = "20MB"
    real: bool = False  # a real model's shapes (meant for a GPU)

    def describe(self) -> str:
        shape = f"hidden {self.hidden}, MLP {self.intermediate}, {self.layers} layers, vocab {self.vocab}"
        if self.vision:
            shape += f", vision {self.vision['depth']}x{self.vision['embed_dim']}, image {self.image}px"
        return shape


QWEN2_VL_LM = dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936)
LLAVA_LM = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064)
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16)
REAL = dict(samples=256, forget=16, eval_samples=32, batch_size=16, max_new_tokens=16, dtype="bfloat16")
REAL_SHARD = "2GB"

SIZES: dict[str, Size] = {
    size.name: size
    for size in (
        Size("tiny", "llama", 32, 64, 2, 2, 1, 700, samples=6, forget=2, eval_samples=2, batch_size=3,
             max_new_tokens=2, question_words=(2, 12), shard_size="40KB"),
        # Scaled down: width / 4 (Qwen2-VL) or / 8 (LLaVA), layers / 4, vocabulary so that the head
        # keeps its share of the compute (about 15% of a token's multiply-adds for Qwen2-VL, 2% for LLaVA).
        Size("qwen2-vl-2b-lm-small", "qwen2", 384, 2240, 7, 3, 1, 9496),
        Size("llava-1.5-7b-lm-small", "llama", 512, 1376, 8, 4, 4, 1002),
        Size("qwen2-vl-2b-448-small", "qwen2_vl", 384, 2240, 7, 3, 1, 9496,
             vision=dict(depth=4, embed_dim=320, num_heads=4), image=224, samples=12, forget=4,
             eval_samples=4, batch_size=4, question_words=(4, 24)),
        Size("qwen2-vl-2b-lm", "qwen2", **QWEN2_VL_LM, **REAL, shard_size=REAL_SHARD, real=True),  # type: ignore[arg-type]
        Size("llava-1.5-7b-lm", "llama", **LLAVA_LM, **REAL, shard_size=REAL_SHARD, real=True),  # type: ignore[arg-type]
        Size("qwen2-vl-2b-448", "qwen2_vl", **QWEN2_VL_LM, vision=QWEN2_VL_VISION, image=448, **REAL,  # type: ignore[arg-type]
             shard_size=REAL_SHARD, real=True),
    )
}  # fmt: skip
CPU_DEFAULT = ["qwen2-vl-2b-lm-small", "llava-1.5-7b-lm-small", "qwen2-vl-2b-448-small"]
GPU_DEFAULT = ["qwen2-vl-2b-lm", "llava-1.5-7b-lm", "qwen2-vl-2b-448"]


def _text_config(size: Size, tokenizer: Any) -> dict[str, Any]:
    return dict(
        vocab_size=max(size.vocab, len(tokenizer)),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=size.family != "llama",  # as the real models
    )


def build_checkpoint(size: Size, out: Path, *, device: str) -> Path:
    """A random model of ``size`` with its tokenizer or processor, saved in shards to ``out``.

    The weights are initialised on ``device`` (a GPU makes a 7B model in seconds) and saved in
    the size's dtype.
    """
    import torch
    import transformers as tf

    torch.manual_seed(0)
    processor: Any
    if size.family == "qwen2_vl":
        tokenizer = testing.byte_level_tokenizer()
        ids = {
            name: tokenizer.convert_tokens_to_ids(token)
            for name, token in (
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            )
        }
        section = size.hidden // size.heads // 2  # rotary pairs per head, split 1:1.5:1.5 as Qwen2-VL's 16/24/24
        text = _text_config(size, tokenizer) | {
            "rope_scaling": {"type": "mrope", "mrope_section": [section // 4, section * 3 // 8, section * 3 // 8]}
        }
        vision = dict(**size.vision, hidden_size=size.hidden, mlp_ratio=4, patch_size=14, spatial_merge_size=2)
        config: Any = tf.Qwen2VLConfig(text_config=text, vision_config=vision | {"temporal_patch_size": 2}, **ids)
        pixels = size.image * size.image
        processor = tf.Qwen2VLProcessor(
            image_processor=tf.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
            tokenizer=tokenizer,
            video_processor=tf.Qwen2VLVideoProcessor(),
            chat_template=testing.CHATML_TEMPLATE,
        )
        model_class: Any = tf.Qwen2VLForConditionalGeneration
    elif size.family == "qwen2":
        processor = testing.byte_level_tokenizer()
        processor.chat_template = testing.CHATML_TEMPLATE
        config, model_class = tf.Qwen2Config(**_text_config(size, processor)), tf.AutoModelForCausalLM
    else:
        processor = testing.sentencepiece_tokenizer()
        processor.chat_template = testing.LLAMA_TEMPLATE
        config, model_class = tf.LlamaConfig(**_text_config(size, processor)), tf.AutoModelForCausalLM
    with torch.device(device):
        model = (
            model_class(config)
            if model_class is tf.Qwen2VLForConditionalGeneration
            else model_class.from_config(config)
        )
    model.to(getattr(torch, size.dtype))
    model.save_pretrained(out, max_shard_size=size.shard_size)
    processor.save_pretrained(out)
    del model
    return out


def _image(path: Path, side: int, seed: int) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(path)
    return f"images/{path.name}"


def write_data(size: Size, root: Path) -> dict[str, Path]:
    """retain, forget and eval splits: questions of random lengths in no order, answers of 1-6 words."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    offset = 0
    for name, count in (("retain", size.samples), ("forget", size.forget), ("eval", size.eval_samples)):
        lines = []
        for index in range(offset, offset + count):
            question = " ".join(rng.choices(WORDS, k=rng.randint(*size.question_words))) + "?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            options = [answer, *(" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(3))]
            record: dict[str, Any] = {"id": f"{name}-{index}", "question": question, "answer": answer}
            if name == "eval":
                record |= {"keywords": [answer.split()[0]], "options": options}
            if size.image:
                record["image"] = _image(root / "images" / f"{index}.png", size.image, index)
            lines.append(json.dumps(record))
        offset += count
        splits[name] = root / f"{name}.jsonl"
        splits[name].write_text("\n".join(lines) + "\n")
    return splits
