"""One-shot apply holds at most the largest shard (+10%) in host memory, whatever the model's size.

A checkpoint of about 200 MB in six shards of at most 48 MB is applied in a subprocess. The
subprocess first applies a tiny checkpoint, so that everything the big run imports and sets up
(torch, safetensors, the stage, its threads, the allocator's arenas) is in place, then resets its
peak resident set to the current one (``/proc/self/clear_refs``, Linux) and applies the big
checkpoint. The peak above the reset (``VmHWM`` − ``VmRSS``, memory-mapped file pages included)
must stay within 1.1 × the largest shard, far below the checkpoint's size. The same measurement of
a process that holds every tensor in memory (as ``from_pretrained`` → scale → ``save_pretrained``
must) exceeds that limit, so the test can fail. ``RLIMIT_AS`` and ``ru_maxrss`` alone cannot show it:
torch reserves gigabytes of address space it never touches, and importing it peaks higher than
applying a few hundred megabytes does.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvwctl.sized import write_random_accessor, write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
SHARD_BYTES = 48 * MB

CHILD = """
import json, sys
from pathlib import Path
from kvwctl.apply import run_apply
from kvwctl.options import ApplyOptions
from kvwctl.source import ModelSpec
def status(key):
    return 1024 * int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))
def measured(work):
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak resident set is now the current one
    start = status("VmRSS")
    work()
    return status("VmHWM") - start
def apply(checkpoint, accessor, out):
    run_apply(ModelSpec(checkpoint), Path(accessor), Path(out), ApplyOptions(gamma=0.5, layers=":"))
def load_everything(checkpoint):  # every tensor in memory, as from_pretrained's model holds them
    from safetensors.torch import load_file  # (load_file alone maps the file lazily)
    return [t.clone() for path in sorted(Path(checkpoint).glob("*.safetensors")) for t in load_file(path).values()]
tiny, tiny_accessor, tiny_out, big, big_accessor, big_out = sys.argv[1:7]
apply(tiny, tiny_accessor, tiny_out)  # every import and set-up done; nothing of the big model held
used = {"apply": measured(lambda: apply(big, big_accessor, big_out)), "load": measured(lambda: load_everything(big))}
print(json.dumps(used))
"""


def peaks_above_start(models: dict[str, Path], out: Path) -> dict[str, int]:
    """How far, in bytes, a :data:`CHILD`'s resident set rose above its start in each of its stages."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    arguments = [models["tiny"], models["tiny-accessor"], out / "tiny-out"]
    arguments += [models["big"], models["big-accessor"], out / "big-out"]
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, arguments)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return {key: int(value) for key, value in json.loads(completed.stdout.splitlines()[-1]).items()}


def digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.glob("*.safetensors"))
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sized")
    big = write_random_checkpoint(
        root / "big", hidden_size=512, intermediate_size=8192, num_layers=4, shard_bytes=SHARD_BYTES
    )
    tiny = write_random_checkpoint(root / "tiny", hidden_size=32, intermediate_size=64, num_layers=4, shard_bytes=MB)
    return {
        "big": big,
        "big-accessor": write_random_accessor(big, root / "big-accessor.safetensors"),
        "tiny": tiny,
        "tiny-accessor": write_random_accessor(tiny, root / "tiny-accessor.safetensors"),
    }


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_apply_holds_at_most_the_largest_shard(models: dict[str, Path], tmp_path: Path) -> None:
    shards = sorted(models["big"].glob("*.safetensors"))
    largest, total = max(path.stat().st_size for path in shards), sum(path.stat().st_size for path in shards)
    assert len(shards) >= 4 and total > 4 * largest  # the model is several times its largest shard
    limit = 1.1 * largest
    used = peaks_above_start(models, tmp_path)
    assert used["apply"] <= limit, (
        f"apply held {used['apply'] / MB:.1f} MB at its peak; the limit is {limit / MB:.1f} MB"
    )
    assert digests(tmp_path / "big-out").keys() == digests(models["big"]).keys()
    assert digests(tmp_path / "big-out") != digests(models["big"])  # the weights were edited
    # The same measurement catches a process that holds the whole model.
    assert used["load"] > limit and used["load"] >= 0.9 * total, f"loading held only {used['load'] / MB:.1f} MB"
