"""How much faster tune's screen is from the first edited layer (``kvwctl.layercache``) than a full pass.

    python benchmarks/screen_cache.py [--first 14] [--conversations 96] [--batch-size 16]

On the bundled example's vanilla model (``examples/people/build_model.py checkpoint vanilla``,
built at first use), the first ``--conversations`` retain conversations are scored teacher-forced
as tune's screen scores them: a capturing pass (a full pass that keeps each batch's input to layer
``--first``), then full passes and passes from layer ``--first`` alternately, twice each, in one
process so that the machine's load falls on both alike. Every pass's scores are checked equal.
Prints one line: the times, their ratio and the cache's size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvwctl.checkpoint import open_checkpoint
from kvwctl.evaluate import load_split, render_split, score_conversations
from kvwctl.layercache import LayerInputCache
from kvwctl.modeling import load_model
from kvwctl.progress import NullTracker
from kvwctl.source import resolve_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "people"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=14)
    parser.add_argument("--conversations", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    arguments = parser.parse_args()
    model = subprocess.run(
        [sys.executable, str(EXAMPLE / "build_model.py"), "checkpoint", "vanilla"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    loaded = load_model(open_checkpoint(resolve_model(model)), device=torch.device("cpu"), dtype=torch.float32)
    prepared = render_split(loaded.renderer, load_split("retain", EXAMPLE / "data" / "retain.jsonl"))
    conversations = prepared.conversations[: arguments.conversations]
    cache = LayerInputCache(arguments.first)

    def timed(layer_cache: LayerInputCache | None) -> tuple[float, list[float]]:
        started = time.perf_counter()
        scores = score_conversations(
            loaded,
            conversations,
            batch_size=arguments.batch_size,
            tracker=NullTracker(),
            description="screen",
            layer_cache=layer_cache,
        )
        return time.perf_counter() - started, scores

    timed(None)  # warm-up
    capture, reference = timed(cache)
    runs = [timed(None), timed(cache), timed(None), timed(cache)]
    if any(scores != reference for _, scores in runs):
        raise SystemExit("the cached passes' scores differ from the full pass's")
    full, cached = [runs[0][0], runs[2][0]], [runs[1][0], runs[3][0]]
    print(
        f"{len(conversations)} conversations, batch {arguments.batch_size}: full {full[0]:.1f} s, {full[1]:.1f} s "
        f"(capturing pass {capture:.1f} s); from layer {arguments.first} {cached[0]:.1f} s, {cached[1]:.1f} s; "
        f"{sum(full) / sum(cached):.2f}x; cache {cache.used_bytes / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
