"""Sweep KVW's settings on the example model: accessor batch size, positions, layers and gamma.

    python examples/people/sweep.py --workdir sweep-run [--positions answer all] \
        [--batch-sizes 1 7 28] [--layers 8:21] [--gammas 0.1 0.3 1 3]

Profiles the vanilla example model once per positions mode with ``kvwctl profile`` (retain and
forget), forms the exposure for each accessor batch size with kvwctl's own accessor functions,
and for each layer range and gamma scales the down projections of the loaded model in memory,
exactly as ``kvwctl apply`` computes them (float32, rounded once), then scores greedy generations
with eval's keyword accuracy on the forget, retain, test and world splits. Nothing is written
but the profiles, so one row costs a few generations, not a 540 MB checkpoint; ``kvwctl apply`` +
``kvwctl eval`` on the chosen setting give the same numbers (the quickstart does that).
Prints a markdown table on stdout and writes it as JSON to ``<workdir>/sweep.json``.

The forget split lists each person's 7 questions together, so ``--batch-sizes 7`` puts one
person in each accessor batch; ``28`` pools the whole forget set into one batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_model  # noqa: E402

from kvwctl.artifacts import PROFILE_FORMAT, read_artifact, retain_coefficients  # noqa: E402
from kvwctl.checkpoint import open_checkpoint  # noqa: E402
from kvwctl.console import NullTracker  # noqa: E402
from kvwctl.data import load_samples  # noqa: E402
from kvwctl.evaluate import generate_answers  # noqa: E402
from kvwctl.method import batch_accessors, batch_ranges, gates, parse_layers, scale_vectors  # noqa: E402
from kvwctl.metrics import keyword_accuracy, keyword_targets  # noqa: E402
from kvwctl.modeling import load_model  # noqa: E402
from kvwctl.source import resolve_model  # noqa: E402

SPLITS = ("forget", "retain", "test", "world")


def keyword_scores(loaded, splits: dict, *, max_new_tokens: int) -> dict[str, float]:
    scores = {}
    for name, samples in splits.items():
        generations = generate_answers(
            loaded, samples, max_new_tokens=max_new_tokens, batch_size=32, tracker=NullTracker(), description=name
        )
        values = [keyword_accuracy(keyword_targets(s), g) for s, g in zip(samples, generations, strict=True)]
        scores[name] = sum(values) / len(values)
    return scores


def diagnose(loaded, layer_text: str, splits: dict, max_new_tokens: int) -> dict[str, float]:
    """Keyword accuracy with SmolLM2's own MLP weights back in the given layers (then restored).

    If the fine-tuned facts survive this, they do not live in those MLPs and KVW cannot reach them.
    """
    from safetensors import safe_open

    layers = parse_layers(layer_text, len(loaded.down_projections))
    decoder = loaded.model.model.language_model.layers
    saved = {}
    base_file = build_model.smollm2.base_checkpoint() / "model.safetensors"
    with safe_open(str(base_file), framework="pt") as base, torch.no_grad():
        for layer in layers:
            for name in build_model.LORA_TARGETS:
                module = getattr(decoder[layer].mlp, name)
                saved[layer, name] = module.weight.detach().clone()
                module.weight.copy_(base.get_tensor(f"model.layers.{layer}.mlp.{name}.weight"))
    scores = keyword_scores(loaded, splits, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        for (layer, name), weight in saved.items():
            getattr(decoder[layer].mlp, name).weight.copy_(weight)
    return scores


def profile(model: Path, split: str, positions: str, out: Path) -> Path:
    if not out.is_file():
        data = build_model.DATA / f"{split}.jsonl"
        subprocess.run(
            ["kvwctl", "profile", "--model", str(model), "--data", str(data), "--split", split,
             "--positions", positions, "--out", str(out), "--quiet"],
            check=True,
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--positions", nargs="+", default=["answer"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 7, 28])
    parser.add_argument("--layers", nargs="+", default=["8:21"])
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--retain-people", type=int, default=8, help="retain people scored (7 questions each)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument(
        "--diagnose", nargs="*", default=[], metavar="A:B",
        help="also score vanilla with the base model's MLP weights put back in these layers",
    )  # fmt: skip
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)

    vanilla = build_model.checkpoint("vanilla")
    checkpoint = open_checkpoint(resolve_model(str(vanilla)))
    loaded = load_model(checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    splits = {name: load_samples(build_model.DATA / f"{name}.jsonl") for name in SPLITS}
    splits["retain"] = splits["retain"][: 7 * arguments.retain_people]
    originals = [module.weight.detach().clone() for module in loaded.down_projections]
    axis = checkpoint.architecture.vector_axis

    rows = []
    started = time.time()
    baseline = keyword_scores(loaded, splits, max_new_tokens=arguments.max_new_tokens)
    rows.append({"setting": "vanilla", **baseline})
    print(f"vanilla: {baseline} ({time.time() - started:.0f} s)", file=sys.stderr)
    for layer_text in arguments.diagnose:
        rows.append({"diagnostic": layer_text, **diagnose(loaded, layer_text, splits, arguments.max_new_tokens)})
        print(f"{rows[-1]} ({time.time() - started:.0f} s)", file=sys.stderr)

    for positions in arguments.positions:
        retain = read_artifact(
            profile(vanilla, "retain", positions, arguments.workdir / f"retain-{positions}.safetensors"),
            PROFILE_FORMAT,
        )
        forget = read_artifact(
            profile(vanilla, "forget", positions, arguments.workdir / f"forget-{positions}.safetensors"),
            PROFILE_FORMAT,
        )
        retain_c = retain_coefficients(retain)
        counts = forget.tensors["count"]  # (samples,)
        for batch_size in arguments.batch_sizes:
            batches = batch_ranges(counts.numel(), batch_size)
            exposures = [
                batch_accessors(forget.layer_tensor(layer, "sum"), counts, retain_c[layer], batches).sum(dim=0)
                for layer in range(checkpoint.num_layers)
            ]  # per layer (m,): E = sum_b A_b
            for layer_text in arguments.layers:
                layers = parse_layers(layer_text, checkpoint.num_layers)
                exposed = torch.cat([exposures[layer] for layer in layers])
                for gamma in arguments.gammas:
                    with torch.no_grad():
                        for layer, module in enumerate(loaded.down_projections):
                            weight = originals[layer]
                            if layer in layers:
                                weight = scale_vectors(weight, gates(exposures[layer], gamma), axis=axis)
                            module.weight.copy_(weight)
                    scores = keyword_scores(loaded, splits, max_new_tokens=arguments.max_new_tokens)
                    row = {
                        "positions": positions, "batch_size": batch_size, "layers": layer_text, "gamma": gamma,
                        "exposed": float((exposed > 0).float().mean()),
                        "mean_gate": float(torch.exp(-gamma * exposed.float()).mean()), **scores,
                    }  # fmt: skip
                    rows.append(row)
                    print(f"{row} ({time.time() - started:.0f} s)", file=sys.stderr)
    (arguments.workdir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| positions | batch | layers | γ | vectors with E>0 | mean gate | forget | retain | test | world |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row.get("setting") == "vanilla":
            print("| vanilla | | | | | | " + " | ".join(f"{row[s]:.2f}" for s in SPLITS) + " |")
            continue
        if "diagnostic" in row:
            label = f"vanilla, base MLPs in {row['diagnostic']}"
            print(f"| {label} | | | | | | " + " | ".join(f"{row[s]:.2f}" for s in SPLITS) + " |")
            continue
        print(
            f"| {row['positions']} | {row['batch_size']} | {row['layers']} | {row['gamma']:g} | "
            f"{row['exposed']:.0%} | {row['mean_gate']:.3f} | " + " | ".join(f"{row[s]:.2f}" for s in SPLITS) + " |"
        )


if __name__ == "__main__":
    main()
