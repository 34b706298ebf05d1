"""Qwen3-VL, Gemma 3, Idefics3 and SmolVLM: profile -> accessor -> apply (both modes) -> load -> generate (``family_pipeline``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_pipeline import check_family


@pytest.mark.parametrize("model_type", ["qwen3_vl", "gemma3", "idefics3", "smolvlm"])
def test_family_end_to_end(model_type: str, tmp_path: Path) -> None:
    if model_type == "smolvlm":
        pytest.importorskip("num2words", reason="transformers' SmolVLMProcessor needs the num2words package")
    check_family(model_type, tmp_path)
