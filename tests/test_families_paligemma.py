"""PaliGemma (no chat template; the answer goes to its processor as ``suffix=``): profile -> accessor -> apply (both modes) -> load -> generate (``family_pipeline``)."""

from __future__ import annotations

from pathlib import Path

from family_pipeline import check_family


def test_family_end_to_end(tmp_path: Path) -> None:
    check_family("paligemma", tmp_path)
