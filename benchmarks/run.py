"""Every kvwctl stage against its alternatives, in one run, on models with random weights.

    python benchmarks/run.py                      # CPU: the scaled-down sizes (a few minutes on 2 cores)
    python benchmarks/run.py --device cuda        # GPU: the real shapes of Qwen2-VL-2B and LLaVA-1.5-7B
    python benchmarks/run.py --sizes tiny --rows profile,bare --out table.json   # or table.md

For each size (``benchmarks/sizes.py``) a random checkpoint, data splits of random lengths and the
profiles and accessor that apply needs are made first (not timed). Then every row
(``benchmarks/rows.py``) runs in a forked child process of its own: its setup (loading the model
it starts from) is not timed; its work is, with its peak memory: on CPU the growth of the
process's resident set over its size after setup (``VmHWM`` after ``/proc/self/clear_refs`` reset
it), on GPU ``torch.cuda.max_memory_allocated`` over what was allocated after setup. Each child
starts cold (no warm-up pass), and its kvwctl fingerprint cache is empty.

The table gives, per row, seconds, throughput, peak memory and two ratios against the stage's
kvwctl row: ``kvwctl speed-up`` = kvwctl's throughput / the row's (above 1: kvwctl is faster) and
``memory vs kvwctl`` = the row's peak / kvwctl's (above 1: the row needs more). The machine
(CPU model, cores, load average before and after, torch version, device) is named above it.
Linux only (fork, /proc).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import rows as bench_rows  # noqa: E402
import sizes as bench_sizes  # noqa: E402

from kvwctl.files import write_text_atomically  # noqa: E402

ROW_IDS = {
    "profile": "kvwctl profile (collect_sums)",
    "bare": "bare forward, base decoder, same batches",
    "bare-unsorted": "bare forward, unsorted batches",
    "reference": "reference-style loop (batch 1, sync per layer)",
    "gradient-ascent": "gradient ascent (AdamW step per batch)",
    "apply": "kvwctl apply (run_apply)",
    "copy": "plain copy (shutil.copyfile)",
    "transformers": "from_pretrained -> scale -> save_pretrained",
    "progressive": "kvwctl apply --progressive (batch 1)",
    "forget-forward": "one forward per forget batch",
    "eval": "kvwctl eval",
    "generate": "model.generate, same prompts",
}
# (stage, row id, least kvwctl speed-up): the CPU targets, checked on the table.
TARGETS = [
    ("profile", "reference", 3.0),
    ("profile", "bare", 0.9),
    ("apply", "copy", 0.7),
    ("apply", "transformers", 5.0),
]


def in_child(function: Callable[[], Any]) -> Any:
    """``function()`` in a forked child; its JSON result, or a RuntimeError with the child's traceback."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            reply = {"result": function()}
        except BaseException:  # everything, to report it to the parent
            reply = {"error": traceback.format_exc()}
        with os.fdopen(write, "w") as stream:
            json.dump(reply, stream)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        text = stream.read()
    _, status = os.waitpid(pid, 0)
    if not text:
        raise RuntimeError(f"the child process died (wait status {status}) without a result")
    reply = json.loads(text)
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["result"]


class PeakMemory:
    """Peak memory of the work after setup: host resident set on CPU, allocated memory on GPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as stream:
                stream.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            return int(torch.cuda.max_memory_allocated()) - self.start
        return max(0, _status_kib("VmHWM") * 1024 - self.start)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_row(row: bench_rows.Row, context: bench_rows.Context, cache: Path, repeat: int) -> dict[str, Any]:
    """Runs in the row's child: setup, then the timed work and its peak memory, ``repeat`` times.

    The fastest repetition is kept (on a shared machine the others' load only ever slows a run
    down), with the largest peak of them all.
    """
    os.environ["KVW_CACHE_DIR"] = str(cache)  # a cold fingerprint cache for this row
    runs = []
    for attempt in range(repeat):
        if attempt and cache.exists():
            shutil.rmtree(cache)  # cold again
        state = row.setup(context)
        gc.collect()
        with PeakMemory(context.device) as memory:
            started = time.perf_counter()
            work = row.work(context, state)
            seconds = time.perf_counter() - started
        runs.append((seconds, work, memory.peak()))
        del state
    seconds, work, _ = min(runs)
    return {"seconds": seconds, "work": work, "peak_bytes": max(peak for _, _, peak in runs), "repeats": repeat}


def context_for(size: bench_sizes.Size, root: Path, device: str, dtype: str) -> bench_rows.Context:
    splits = ("retain", "forget", "eval")
    return bench_rows.Context(
        size=size,
        checkpoint=root / "checkpoint",
        data={split: root / "data" / f"{split}.jsonl" for split in splits},
        accessor=root / "accessor.safetensors",
        retain_profile=root / "profile-retain.safetensors",
        scratch=root / "scratch",
        device=device,
        dtype=dtype,
    )


def prepare(context: bench_rows.Context) -> None:
    """The checkpoint, the data, both profiles and the accessor of one size (not timed)."""
    from kvwctl.accessor import run_accessor
    from kvwctl.options import AccessorOptions, ProfileOptions
    from kvwctl.profile import run_profile
    from kvwctl.source import ModelSpec

    size, root = context.size, context.scratch.parent
    bench_sizes.build_checkpoint(size, context.checkpoint, device=context.device)
    data = bench_sizes.write_data(size, root / "data")
    assert data == context.data
    model = ModelSpec(str(context.checkpoint))
    profiles = {}
    for split in ("retain", "forget"):
        options = ProfileOptions(split=split, batch_size=size.batch_size, device=context.device, dtype=context.dtype)
        profiles[split] = run_profile(model, data[split], root / f"profile-{split}.safetensors", options).path
    run_accessor(profiles["forget"], profiles["retain"], context.accessor, AccessorOptions())
    context.scratch.mkdir()


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    facts = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
    }
    if device.startswith("cuda"):
        facts["gpu"] = in_child(lambda: __import__("torch").cuda.get_device_name(0))
    return facts


def ratios(results: list[dict[str, Any]]) -> None:
    """Adds each row's ratios against its size's and stage's kvwctl row, from the measured numbers."""
    for result in results:
        base = next(
            (other for other in results
             if other["size"] == result["size"] and other["stage"] == result["stage"] and other["kvwctl"]),
            None,
        )  # fmt: skip
        result["kvwctl_speedup"] = (
            base["throughput"] / result["throughput"] if base is not None and result["throughput"] > 0 else None
        )
        result["memory_vs_kvwctl"] = (
            result["peak_bytes"] / base["peak_bytes"] if base is not None and base["peak_bytes"] > 0 else None
        )


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for stage, row_id, least in TARGETS:
        for result in results:
            if result["stage"] == stage and result["id"] == row_id and result["kvwctl_speedup"] is not None:
                speedup = result["kvwctl_speedup"]
                checked.append({
                    "size": result["size"], "target": f"{stage} >= {least}x {row_id}", "speedup": speedup,
                    "met": speedup >= least,
                })  # fmt: skip
    return checked


def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    facts = report["machine"]
    where = facts.get("gpu", facts["cpu"])
    lines = [
        f"Machine: {facts['cpu']}, {facts['cores']} cores ({facts['torch_threads']} torch threads), "
        f"device {facts['device']}{' (' + where + ')' if 'gpu' in facts else ''}; torch {facts['torch']}, "
        f"transformers {facts['transformers']}; load average {facts['load_average_before']} before, "
        f"{facts['load_average_after']} after; {report['seconds']:.0f} s in all ({report['cpu_seconds']:.0f} CPU s); "
        f"fastest of {report['repeat']} per row.",
        "",
        "| size | stage | row | seconds | throughput | peak MiB | kvwctl speed-up | memory vs kvwctl |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in report["rows"]:
        throughput = f"{result['throughput']:,.1f} {result['unit']}/s"
        lines.append(
            f"| {result['size']} | {result['stage']} | {result['name']} | {result['seconds']:.2f} | {throughput} | "
            f"{result['peak_bytes'] / 2**20:,.1f} | {_number(result['kvwctl_speedup'])}× | "
            f"{_number(result['memory_vs_kvwctl'])}× |"
        )
    if report["targets"]:
        lines.append("")
        for target in report["targets"]:
            verdict = "met" if target["met"] else "MISSED"
            lines.append(f"* {target['size']}: {target['target']}: {target['speedup']:.3f}× ({verdict})")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", nargs="+", choices=sorted(bench_sizes.SIZES), help="default: by device")
    parser.add_argument("--rows", default=",".join(ROW_IDS), help=f"comma-separated, of: {', '.join(ROW_IDS)}")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="float32 on CPU, else bfloat16")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each row's work; the fastest is kept")
    parser.add_argument("--threads", type=int, help="torch threads per row (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, help="also write the table: .json or .md")
    parser.add_argument(
        "--workdir", type=Path, help="a new directory to make and keep the checkpoints in (default: a temporary one)"
    )
    arguments = parser.parse_args(argv)
    unknown = sorted(set(arguments.rows.split(",")) - set(ROW_IDS))
    if unknown:
        parser.error(f"unknown rows: {', '.join(unknown)} (choose from {', '.join(ROW_IDS)})")
    if arguments.out is not None and arguments.out.suffix not in (".json", ".md"):
        parser.error("--out must end in .json or .md")
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    if arguments.workdir is not None and arguments.workdir.exists():
        parser.error(f"--workdir {arguments.workdir} exists; name a new directory")
    return arguments


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging

    arguments = parse(argv)
    logging.disable_progress_bar()  # in every child too
    if arguments.threads is not None:
        import torch

        torch.set_num_threads(arguments.threads)  # inherited by every forked child
    device = arguments.device
    if device == "cuda" and not in_child(lambda: __import__("torch").cuda.is_available()):
        print("Error: --device cuda, but CUDA is not available", file=sys.stderr)
        return 1
    dtype = arguments.dtype or ("float32" if device == "cpu" else "bfloat16")
    names = arguments.sizes or (bench_sizes.CPU_DEFAULT if device == "cpu" else bench_sizes.GPU_DEFAULT)
    wanted = arguments.rows.split(",")
    by_name = {row.name: row for row in bench_rows.ROWS}
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(device), "dtype": dtype, "repeat": arguments.repeat, "rows": []}
    with contextlib.ExitStack() as stack:
        if arguments.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvw-bench-")))
        else:
            workdir = arguments.workdir
            workdir.mkdir(parents=True)
        for name in names:
            size = bench_sizes.SIZES[name]
            root = workdir / name
            print(f"{name} ({size.describe()}): preparing", file=sys.stderr)
            context = context_for(size, root, device, dtype)
            in_child(functools.partial(prepare, context))
            for row_id in wanted:
                row = by_name[ROW_IDS[row_id]]
                cache = root / f"cache-{row_id}"
                measured = in_child(functools.partial(measure_row, row, context, cache, arguments.repeat))
                result = {"size": name, "stage": row.stage, "id": row_id, "name": row.name, "kvwctl": row.kvwctl,
                          "unit": row.unit, **measured, "throughput": measured["work"] / measured["seconds"]}  # fmt: skip
                report["rows"].append(result)
                print(f"  {row.stage:<11} {row.name:<50} {measured['seconds']:8.2f} s", file=sys.stderr)
    ratios(report["rows"])
    report["targets"] = targets(report["rows"])
    report["machine"]["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    report["seconds"] = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_seconds"] = children.ru_utime + children.ru_stime  # every row and preparation, all cores
    table = markdown(report)
    print(table, end="")
    if arguments.out is not None:
        text = json.dumps(report, indent=2) + "\n" if arguments.out.suffix == ".json" else table
        write_text_atomically(arguments.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
