"""examples/tiny_demo.sh end to end (slow: minutes; ``pytest -m slow tests/test_tiny_demo.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "tiny_demo.sh"


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_eval(tmp_path: Path) -> None:
    # kvwctl and python of this environment first on PATH, as after `pip install -e .`.
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    work = tmp_path / "demo"
    subprocess.run(["bash", str(SCRIPT), str(work)], check=True, env=environment, cwd=tmp_path)
    for model in ("llava", "qwen2_vl"):
        run = work / f"{model}-run" / "kvw-run"
        report = json.loads((run / "eval.json").read_text())
        assert report["format"] == "kvwctl.eval/2"
        assert report["models"]["model"]["reference"] == str(run / "unlearned")
        assert report["models"]["baseline"]["reference"] == str(work / f"{model}-run" / "model")
        assert set(report["results"]["model"]) == {"forget", "retain"}
        assert report["data"]["forget"]["samples"] == 4 and report["data"]["retain"]["samples"] == 12
        samples = (run / "eval.samples.jsonl").read_text().splitlines()
        assert len(samples) == 2 * (4 + 12)  # two models, both splits
        if importlib.util.find_spec("matplotlib") is not None:
            for picture in ("accessor.png", "eval.png"):
                assert (run / picture).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
