"""LLaVA-NeXT, LLaVA-OneVision and InternVL-hf (LLaVA-style Hub layouts): profile -> accessor -> apply (both modes) -> load -> generate (``family_pipeline``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_pipeline import check_family


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "internvl"])
def test_family_end_to_end(model_type: str, tmp_path: Path) -> None:
    check_family(model_type, tmp_path)
