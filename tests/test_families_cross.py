"""Mllama (a cross-attention decoder layer) and Mistral 3 (Pixtral vision): profile -> accessor -> apply (both modes) -> load -> generate (``family_pipeline``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_pipeline import check_family


@pytest.mark.parametrize("model_type", ["mllama", "mistral3"])
def test_family_end_to_end(model_type: str, tmp_path: Path) -> None:
    check_family(model_type, tmp_path)
