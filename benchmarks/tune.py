"""How fast ``kvwctl tune`` screens trials in memory, against the same trials run as apply + eval.

    python benchmarks/tune.py [--workdir DIR] [--baseline-trials 2]

On the bundled example (``examples/people``: the vanilla LLaVA with SmolLM2-135M, forget 28 and
retain 252 samples), a 24-trial grid — mean gates 0.995..0.9 (6) × layers 14:27, 8:27 × accessor
batch sizes 7, all — is screened by ``kvwctl tune`` (teacher-forced answer log-probability and
multiple choice, no generation: ``--generate-top 0`` and screen-only constraints). The profiles
are made first and are not timed (tune reuses them from its workdir); the baseline model's own
screen is timed apart. Then ``--baseline-trials`` of the same trials are run as a user would
without tune: ``kvwctl accessor`` + ``kvwctl apply`` + ``kvwctl eval`` (subprocesses, which also
generate), and their per-trial time is compared with tune's. The apply + eval time for 24 trials
is that per-trial time × 24 (said so in the table). Prints a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples" / "people"))

import build_model  # noqa: E402

from kvwctl.options import TuneOptions  # noqa: E402
from kvwctl.source import ModelSpec  # noqa: E402
from kvwctl.tune import TuneInputs, execute_tune, plan_tune  # noqa: E402

T = TypeVar("T")
SPACE = {"mean_gate": "0.995:0.9:6", "layers": "14:27,8:27", "forget_batch_size": "7,all"}
BATCH, MAX_NEW_TOKENS = 16, 12


class TimingTracker:
    """Records when each trial of tune's screen, and each scoring of the baseline, starts and ends."""

    def __init__(self) -> None:
        self.trial_seconds: list[float] = []
        self.loops: dict[str, float] = {}

    def track(self, items: Iterable[T], *, total: int, description: str, **_: Any) -> Iterator[T]:
        started = time.perf_counter()
        for item in items:
            begun = time.perf_counter()
            yield item
            if description == "tune: screen":
                self.trial_seconds.append(time.perf_counter() - begun)
        self.loops[description] = self.loops.get(description, 0.0) + time.perf_counter() - started

    @contextmanager
    def status(self, description: str) -> Iterator[None]:
        yield


def run(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kvwctl", *args, "--quiet", "--force"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-tune"))
    parser.add_argument("--baseline-trials", type=int, default=2)
    arguments = parser.parse_args()
    work = arguments.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = build_model.checkpoint("vanilla")
    data = {name: build_model.DATA / f"{name}.jsonl" for name in ("forget", "retain")}
    profiles = work / "tune-profiles"
    profiles.mkdir(exist_ok=True)
    started = time.perf_counter()
    for split in ("retain", "forget"):
        out = profiles / f"profile-{split}-answer.safetensors"
        run("profile", "--model", str(model), "--data", str(data[split]), "--split", split, "--out", str(out),
            "--batch-size", str(BATCH))  # fmt: skip
    profile_seconds = time.perf_counter() - started

    options = TuneOptions(
        **SPACE, generate_top=0, folds=2, group_by="person", batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS,
        require=("retain.answer_logprob >= 1.05*baseline",), minimize="forget.answer_logprob", force=True,
    )  # fmt: skip
    inputs = TuneInputs(
        model=ModelSpec(str(model)), retain_data=data["retain"], forget_data=data["forget"], splits=data,
        out=work / "tune.json", profiles_dir=profiles,
    )  # fmt: skip
    tracker = TimingTracker()
    started = time.perf_counter()
    result = execute_tune(plan_tune(inputs, options), tracker=tracker)
    tune_total = time.perf_counter() - started
    screen = sum(tracker.trial_seconds)
    baseline_screen = sum(seconds for name, seconds in tracker.loops.items() if name.startswith("baseline:"))
    trials = result.report["trials"]

    per_trial: list[float] = []
    for trial in trials[: arguments.baseline_trials]:
        started = time.perf_counter()
        accessor = work / f"accessor-{trial['trial']}.safetensors"
        batch = "28" if trial["forget_batch_size"] == "all" else str(trial["forget_batch_size"])
        run("accessor", "--forget", str(profiles / "profile-forget-answer.safetensors"),
            "--retain", str(profiles / "profile-retain-answer.safetensors"), "--batch-size", batch,
            "--out", str(accessor))  # fmt: skip
        run("apply", "--model", str(model), "--accessor", str(accessor), "--gamma", repr(trial["gamma_used"]),
            "--layers", trial["layers"], "--out", str(work / "applied"))  # fmt: skip
        run("eval", "--model", str(work / "applied"), "--data", f"forget={data['forget']}",
            "--data", f"retain={data['retain']}", "--batch-size", str(BATCH), "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--out", str(work / "eval.json"))  # fmt: skip
        per_trial.append(time.perf_counter() - started)
    apply_eval = sum(per_trial) / len(per_trial)
    tune_per_trial = screen / len(tracker.trial_seconds)

    cores = os.cpu_count()
    print(f"Machine: {platform.processor() or platform.machine()}, {cores} cores, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}; example model {model.name}")  # fmt: skip
    print()
    print("| | trials | seconds | per trial (s) |")
    print("|---|---:|---:|---:|")
    print(f"| profiles (retain 252 + forget 28, not in the screen) | | {profile_seconds:.1f} | |")
    print(f"| the baseline model scored once (screen and generation) | | {baseline_screen:.1f} | |")
    print(f"| **tune: screen in memory** | {len(tracker.trial_seconds)} | {screen:.1f} | {tune_per_trial:.2f} |")
    print(f"| tune, the whole command | {len(trials)} | {tune_total:.1f} | |")
    print(f"| accessor + apply + eval (measured on {len(per_trial)}) | {len(per_trial)} | {sum(per_trial):.1f} | "
          f"{apply_eval:.2f} |")  # fmt: skip
    print(f"| accessor + apply + eval for {len(trials)} (per trial × {len(trials)}) | {len(trials)} | "
          f"{apply_eval * len(trials):.1f} | |")  # fmt: skip
    print()
    print(f"Ratio (apply + eval per trial / tune screen per trial): {apply_eval / tune_per_trial:.2f}x; "
          f"target for the 24-trial screen: <= 300 s, measured {screen:.0f} s")  # fmt: skip
    (work / "bench.json").write_text(json.dumps({
        "profile_seconds": profile_seconds, "baseline_screen_seconds": baseline_screen,
        "screen_seconds": screen, "trial_seconds": tracker.trial_seconds, "tune_seconds": tune_total,
        "apply_eval_seconds": per_trial,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
