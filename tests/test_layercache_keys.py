"""The layer cache's batch key sees every tensor, nested ones included (kvwctl.layercache.inputs_key).

With the vision-feature cache, pixel values are replaced by ``mm_encoder_outputs``: a dict of
model outputs holding a tuple of per-image features. Two batches with the same prompt tokens and
different images must not share a cached hidden state.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from kvwctl.errors import ModelError
from kvwctl.layercache import inputs_key, supports


def features(value: float) -> dict[str, BaseModelOutputWithPooling]:
    image = torch.full((300, 8), value)  # larger than a tensor's repr shows
    return {"image": BaseModelOutputWithPooling(pooler_output=(image, image.clone()))}  # type: ignore[arg-type]


def test_nested_image_features_are_part_of_the_key() -> None:
    ids = torch.arange(12).reshape(2, 6)
    first = {"input_ids": ids, "mm_encoder_outputs": features(0.0)}
    same = {"input_ids": ids.clone(), "mm_encoder_outputs": features(0.0)}
    other = features(0.0)
    other["image"]["pooler_output"][1][150, 3] = 1.0  # one value of the second image, deep in the tensor
    assert inputs_key(first) == inputs_key(same)
    assert inputs_key(first) != inputs_key({"input_ids": ids, "mm_encoder_outputs": other})
    assert inputs_key({"input_ids": ids}) != inputs_key({"input_ids": ids.to(torch.int32)})


def test_an_input_it_cannot_key_is_refused() -> None:
    with pytest.raises(ModelError, match="cannot key a model input '.x' of type object"):
        inputs_key({"x": object()})


def test_only_the_tested_families_use_it() -> None:
    class Architecture:
        def __init__(self, model_type: str) -> None:
            self.model_type = model_type

    class Checkpoint:
        def __init__(self, model_type: str) -> None:
            self.architecture = Architecture(model_type)

    assert supports(Checkpoint("llava")) and supports(Checkpoint("qwen2"))  # type: ignore[arg-type]
    assert not supports(Checkpoint("gpt2")) and not supports(Checkpoint("mixtral"))  # type: ignore[arg-type]
