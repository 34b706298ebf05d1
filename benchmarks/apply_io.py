"""How fast one-shot ``kvwctl apply`` writes a checkpoint, against a plain copy and transformers.

    python benchmarks/apply_io.py [--workdir DIR] [--layers 6] [--hidden-size 1024] [--intermediate-size 8192]
                                  [--dtype bfloat16] [--shard-mb 100] [--repeat 3] [--block-mb 4]

Writes a random qwen2 checkpoint (``kvwctl.sized``; bfloat16, about 320 MB in four shards by
default) and an accessor for it, then times, ``--repeat`` times each in turn (the best run counts):

* **copy** — ``shutil.copyfile`` of every file of the checkpoint: what the disk and page cache give;
* **apply** — ``run_apply`` (every layer, γ = 0.5), with the fingerprint's hash cache warm (as
  on every run after the first on a model); **apply, cold cache** once, which hashes the model first;
* **transformers** — ``from_pretrained`` → ``scale_vectors`` on every down projection →
  ``save_pretrained`` (same shard size), the usual way to edit weights.

Each stage runs with the input in the page cache ("warm") and with it dropped from the page cache
first ("cold", ``posix_fadvise(DONTNEED)``: the disk's read bandwidth). Outputs are not fsynced.

Each stage's CPU time (every thread; on a shared machine the wall time mostly measures the
scheduler) and peak resident memory above its start are measured too (Linux: ``/proc/self/clear_refs``
resets the peak). Prints a markdown table on stdout: seconds, MB/s of shard bytes, peak memory, and
apply's ratios to the others. Outputs are written beside the inputs in ``--workdir`` (page cache,
no fsync, for every stage alike).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kvwctl.checkpoint  # noqa: E402
from kvwctl.apply import run_apply  # noqa: E402
from kvwctl.options import ApplyOptions  # noqa: E402
from kvwctl.sized import write_random_accessor, write_random_checkpoint  # noqa: E402
from kvwctl.source import ModelSpec  # noqa: E402

MB = 1 << 20
GAMMA = 0.5


def resident(key: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` of this process in bytes (None off Linux)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return 1024 * int(line.split()[1])
    return None


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, every thread (the kernel's copy in sendfile too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(work: Callable[[], None]) -> tuple[float, float, float | None]:
    """Wall and CPU seconds of ``work`` and its peak resident memory above the start (bytes), if measurable."""
    start = resident("VmRSS")
    clear = Path("/proc/self/clear_refs")
    if start is not None and clear.exists():
        clear.write_text("5")  # the peak resident set is now the current one
    began, cpu = time.perf_counter(), cpu_seconds()
    work()
    seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
    peak = resident("VmHWM")
    return seconds, cpu, (peak - start) if peak is not None and start is not None else None


def plain_copy(source: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for path in sorted(source.iterdir()):
        shutil.copyfile(path, out / path.name)


def apply(source: Path, accessor: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    run_apply(ModelSpec(str(source)), accessor, out, ApplyOptions(gamma=GAMMA, layers=":"))


def transformers_edit(source: Path, accessor: Path, out: Path, shard_mb: int) -> None:
    import torch
    import transformers as tf

    from kvwctl.artifacts import ACCESSOR_FORMAT, read_artifact
    from kvwctl.method import gates, scale_vectors

    shutil.rmtree(out, ignore_errors=True)
    exposures = read_artifact(accessor, ACCESSOR_FORMAT)
    model = tf.AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            weight = block.mlp.down_proj.weight
            gate = gates(exposures.layer_tensor(layer, "exposure"), GAMMA)
            weight.copy_(scale_vectors(weight, gate, axis=1))
    model.save_pretrained(out, max_shard_size=f"{shard_mb}MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kvw-apply-io")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block-mb", type=float, default=None, help="apply's block size (default: kvwctl's)")
    options = parser.parse_args()
    if options.block_mb is not None:
        kvwctl.checkpoint.COPY_BLOCK_SIZE = int(options.block_mb * MB)
    workdir: Path = options.workdir
    os.environ["KVW_CACHE_DIR"] = str(workdir / "cache")
    source, accessor = workdir / "model", workdir / "accessor.safetensors"
    settings = (options.layers, options.hidden_size, options.intermediate_size, options.dtype, options.shard_mb)
    stamp = workdir / "settings.txt"
    if not stamp.is_file() or stamp.read_text() != repr(settings):
        shutil.rmtree(workdir, ignore_errors=True)
        write_random_checkpoint(
            source,
            hidden_size=options.hidden_size,
            intermediate_size=options.intermediate_size,
            num_layers=options.layers,
            shard_bytes=options.shard_mb * MB,
            dtype=options.dtype,
        )
        stamp.write_text(repr(settings))
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    write_random_accessor(source, accessor)  # hashes the model: the cache is warm from here on
    shards = sorted(source.glob("*.safetensors"))
    total = sum(path.stat().st_size for path in shards)

    stages: dict[str, Callable[[], None]] = {
        "copy (shutil.copyfile)": lambda: plain_copy(source, workdir / "copy"),
        "apply": lambda: apply(source, accessor, workdir / "apply"),
        "from_pretrained → scale → save_pretrained": lambda: transformers_edit(
            source, accessor, workdir / "transformers", options.shard_mb
        ),
    }
    inputs = [path for path in source.iterdir() if path.is_file()]
    runs: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {}
    for _ in range(options.repeat):
        for name, work in stages.items():
            for cache in ("warm", "cold"):
                if cache == "cold":
                    evict(inputs)
                runs.setdefault((name, cache), []).append(measured(work))
    shutil.rmtree(workdir / "cache")
    runs[("apply, first run on the model (hashes it for the fingerprint)", "warm")] = [
        measured(lambda: apply(source, accessor, workdir / "apply"))
    ]
    # The fastest run of each stage (wall and CPU apart), and the largest peak of any of its runs.
    best = {
        key: tuple(min(run[index] for run in done) for index in (0, 1)) + (max(run[2] or 0.0 for run in done),)
        for key, done in runs.items()
    }

    block = kvwctl.checkpoint.COPY_BLOCK_SIZE / MB
    largest = max(path.stat().st_size for path in shards) / MB
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; ", end="")
    print(f"{len(shards)} shards, {total / MB:.0f} MB ({options.dtype}), largest {largest:.0f} MB; ", end="")
    print(f"apply's blocks {block:g} MB; best of {options.repeat}\n")
    print("| stage | input in page cache | seconds | MB/s | CPU seconds | peak memory (MB) | apply's speed vs this |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, cache), (seconds, cpu, peak) in best.items():
        memory = f"{peak / MB:.0f}" if resident("VmRSS") is not None else "n/a"
        relative = seconds / best[("apply", cache)][0]
        print(
            f"| {name} | {cache} | {seconds:.2f} | {total / MB / seconds:.0f} | {cpu:.2f} | {memory} | {relative:.2f}× |"
        )


def evict(paths: list[Path]) -> None:
    """Drop ``paths`` from the page cache (``posix_fadvise``), so that the next read is the disk's."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # only clean pages are dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


if __name__ == "__main__":
    main()
