"""Benchmark adapters: a local copy of a published benchmark split → kvwctl's JSON Lines.

    kvwctl data convert mllmu --from MLLMU-Bench --split forget_5 --out data/forget_5.jsonl
    kvwctl data convert clear --from CLEAR --split forget05_perturbed --out data/forget05.jsonl
    kvwctl data convert tofu  --from TOFU --split forget10_perturbed --out data/tofu-forget10.jsonl

One module per benchmark (``mllmu``, ``clear``, ``tofu``) turns a split's rows (``reading``) into
samples (``samples``); ``convert.run_convert`` writes them, images as files in
``<out stem>.images/`` next to the JSON Lines file, both renamed into place together. Nothing is
downloaded: ``--from`` is a directory holding the benchmark as published.
"""

from __future__ import annotations

from kvwctl.benchmarks import clear, mllmu, tofu
from kvwctl.benchmarks.samples import Adapter

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (mllmu.ADAPTER, clear.ADAPTER, tofu.ADAPTER)}

__all__ = ["ADAPTERS", "Adapter"]
