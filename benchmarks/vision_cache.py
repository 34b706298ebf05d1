"""How much the vision-feature cache saves: one profile without it, cold and warm, on the CPU.

    python benchmarks/vision_cache.py [--workdir DIR] [--images 16] [--repeats 2]

Builds (once, offline, random weights) a Qwen2-VL whose vision tower is no longer trivial — depth
4, width 256, 224×224 images (256 patches, 64 image tokens each) — with kvwctl's tiny language
model, then profiles the same forget split (batch 4) with ``--vision-cache off``, with an empty
cache (cold) and with the filled one (warm), ``--repeats`` times each, interleaved. Every profile's
tensors must equal the uncached one's. Prints a markdown table on stdout: the best time of each
(model load and fingerprint included, as a user runs it) and the warm speed-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(workdir: Path, images: int) -> tuple[Path, Path]:
    import torch
    import transformers

    from kvwctl import testing

    model_dir, data = workdir / "qwen2-vl-vision-256", workdir / "data" / "samples.jsonl"
    if not model_dir.exists():
        model, processor = testing.build("qwen2_vl")
        text = model.config.text_config.to_dict()
        ids = {name: getattr(model.config, name) for name in ("image_token_id", "video_token_id")}
        ids |= {name: getattr(model.config, name) for name in ("vision_start_token_id", "vision_end_token_id")}
        vision = dict(depth=4, embed_dim=256, hidden_size=32, num_heads=4, mlp_ratio=4, patch_size=14)
        vision |= dict(spatial_merge_size=2, temporal_patch_size=2)
        torch.manual_seed(0)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = transformers.Qwen2VLForConditionalGeneration(config)
        pixels = 224 * 224
        processor.image_processor.min_pixels = processor.image_processor.max_pixels = pixels
        processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
        testing.save(model, processor, model_dir, max_shard_size="2MB")
    records = []
    for index in range(images):
        testing.make_image(data.parent / "images" / f"i{index}.png", seed=index, size=224)
        person = testing.PEOPLE[index % len(testing.PEOPLE)]
        records.append(
            {"id": f"s{index}", "image": f"images/i{index}.png", "question": "Who is this?", "answer": person}
        )
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return model_dir, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=HERE / "vision-cache-run")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    arguments = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from kvwctl.options import ProfileOptions
    from kvwctl.profile import run_profile
    from kvwctl.source import ModelSpec

    workdir: Path = arguments.workdir
    model_dir, data = build(workdir, arguments.images)
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    times: dict[str, list[float]] = {"off": [], "cold": [], "warm": []}
    runs = ["off", "cold", "warm"] + ["off", "warm"] * (arguments.repeats - 1)
    reference = None
    for number, name in enumerate(runs):
        out = workdir / f"profile-{number}-{name}.safetensors"
        options = ProfileOptions(
            split="forget", batch_size=4, device="cpu", vision_cache="off" if name == "off" else str(cache), force=True
        )
        start = time.perf_counter()
        run_profile(ModelSpec(str(model_dir), None), data, out, options)
        times[name].append(time.perf_counter() - start)
        tensors = load_file(out)
        reference = reference or tensors
        if not all(torch.equal(reference[key], tensors[key]) for key in reference):
            raise SystemExit(f"{out}: differs from the uncached profile")
    best = {name: min(values) for name, values in times.items()}
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}")
    print(f"{arguments.images} images 224x224, Qwen2-VL vision depth 4 width 256, batch 4; best of each\n")
    print("| run | seconds | vs uncached |")
    print("|---|---|---|")
    for name in ("off", "cold", "warm"):
        print(f"| {name} | {best[name]:.2f} | {best['off'] / best[name]:.2f}× |")


if __name__ == "__main__":
    main()
