"""Text-only families with Llama-style MLPs (Phi-3: fused gate_up_proj): profile -> accessor -> apply (both modes) -> load -> generate (``family_pipeline``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_pipeline import check_family


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_family_end_to_end(model_type: str, tmp_path: Path) -> None:
    check_family(model_type, tmp_path)
