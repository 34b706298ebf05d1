"""Random checkpoints of a chosen size, and accessors for them, written without building the model.

For apply's bounded-memory test (``tests/test_apply_memory.py``) and its I/O benchmark
(``benchmarks/apply_io.py``), which need checkpoints of hundreds of megabytes in several shards:
:func:`write_random_checkpoint` writes a complete qwen2 checkpoint (``Qwen2ForCausalLM``'s own
tensor names and shapes, taken from the model built on the meta device, so ``from_pretrained``
loads it) one shard at a time, each tensor random, holding at most one shard in memory.
:func:`write_random_accessor` writes an accessor of random exposures made "from" a checkpoint (its
fingerprint), for ``apply`` to read. No tokenizer is written: ``apply`` needs none.

    python -m kvwctl.sized /tmp/big --hidden-size 1024 --intermediate-size 8192 --layers 8 --shard-mb 256
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvwctl.files import save_safetensors_atomically, write_text_atomically


def write_random_checkpoint(
    out: Path,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    shard_bytes: int,
    vocab_size: int = 512,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """A qwen2 checkpoint in ``out`` with shards of at most ``shard_bytes`` (or one tensor, if larger)."""
    import torch
    import transformers as tf

    config = tf.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    with torch.device("meta"):
        model = tf.Qwen2ForCausalLM(config)
    stored = getattr(torch, dtype)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():  # consecutive tensors fill a shard up to shard_bytes
        nbytes = stored.itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        shard = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: torch.empty(shapes[name]).uniform_(-0.05, 0.05, generator=generator).to(stored) for name in names
        }
        save_safetensors_atomically(tensors, out / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    total = sum(stored.itemsize * int(torch.Size(shape).numel()) for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomically(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return out


def write_random_accessor(checkpoint: Path, out: Path, *, seed: int = 0) -> Path:
    """An accessor of random exposures in ``[0, 3)`` for every layer of ``checkpoint`` (its fingerprint)."""
    import torch

    from kvwctl.artifacts import ACCESSOR_FORMAT, model_metadata, write_artifact
    from kvwctl.checkpoint import open_checkpoint
    from kvwctl.source import resolve_model

    opened = open_checkpoint(resolve_model(str(checkpoint), None))
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"layers.{layer}.exposure": torch.rand(opened.num_vectors(layer), generator=generator) * 3
        for layer in range(opened.num_layers)
    }
    metadata = {
        "format": ACCESSOR_FORMAT,
        **model_metadata(opened, opened.fingerprint()),
        "positions": "answer",
        "mode": "one-shot",
        "batch_size": "1",
    }
    write_artifact(out, tensors, metadata)
    return out


def main(arguments: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvwctl.sized", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    options = parser.parse_args(arguments)
    write_random_checkpoint(
        options.out,
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_layers=options.layers,
        shard_bytes=options.shard_mb << 20,
        dtype=options.dtype,
    )
    write_random_accessor(options.out, options.out.parent / f"{options.out.name}.accessor.safetensors")
    print(options.out)


if __name__ == "__main__":
    main(sys.argv[1:])
