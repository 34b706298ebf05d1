"""Tune's screen without the layers no trial edits: the input of the first edited layer, cached.

A trial weakens the down projections of its layers only; every trial of a tune edits layers
``first`` and above (``first`` is the lowest layer any trial edits). The hidden state that enters
decoder layer ``first`` is therefore the same for every trial, the baseline's pass included, as
long as the batch is the same: it depends only on the inputs and on layers ``0..first-1``, which
nothing edits. ``LayerInputCache`` keeps that hidden state per batch the first time a batch is run
and, on every later pass over the same batch, replaces layers ``0..first-1`` with a module that
passes its input through and feeds layer ``first`` the cached state, so only layers
``first..L-1`` (and the head) run. The layers that do run see bit for bit the input they would
see in a full pass, so the logits are the full pass's exactly (tested).

A batch is recognised by the sha256 of every tensor the model is called with (token ids,
attention mask, pixel values, ...), not by its position in a loop. The cache stays in host
memory up to ``budget_bytes`` (default 2 GiB); a batch that does not fit is run in full, which
gives the same result, only slower.

    cache = LayerInputCache(loaded, first=14)
    with cache.around(inputs):        # captures, or replays what an earlier pass captured
        logits = loaded.model(**inputs).logits
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvwctl.errors import ModelError

if TYPE_CHECKING:
    import torch

    from kvwctl.modeling import LoadedModel

DEFAULT_BUDGET_BYTES = 2 * 1024**3


def decoder_layers(loaded: LoadedModel) -> Any:
    """The language model's decoder layers (an ``nn.ModuleList``), by the registry's module path."""
    layers = loaded.model
    for attribute in loaded.checkpoint.architecture.decoder_layers.split("."):
        layers = getattr(layers, attribute)
    return layers


def inputs_key(inputs: dict[str, Any]) -> str:
    """The sha256 of a forward pass's tensor inputs: names, dtypes, shapes and bytes."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(inputs):
        value = inputs[name]
        if not hasattr(value, "detach"):
            digest.update(f"{name}={value!r};".encode())
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def _pass_through_class() -> Any:
    import torch

    class PassThrough(torch.nn.Module):
        """Stands in for a skipped decoder layer: returns the hidden state it is given, untouched."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

    return PassThrough


class LayerInputCache:
    """Per batch, the hidden state entering decoder layer ``first`` of ``loaded`` (see the module docstring).

    Valid only while layers ``0..first-1`` keep their weights: the caller edits ``first`` and above.
    """

    def __init__(self, loaded: LoadedModel, first: int, *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.loaded = loaded
        self.layers = decoder_layers(loaded)
        if not 0 <= first < len(self.layers):
            raise ValueError(f"first layer {first} is not one of the {len(self.layers)} decoder layers")
        self.first = first
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.states: dict[str, torch.Tensor] = {}  # inputs_key -> (batch, sequence, hidden) on the host
        self.replayed = 0  # passes that skipped layers 0..first-1
        self.captured = 0

    @contextmanager
    def around(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Around one forward pass of ``loaded.model(**inputs)``: replay the cached state or capture it."""
        if self.first == 0:
            yield  # nothing to skip
            return
        key = inputs_key(inputs)
        state = self.states.get(key)
        if state is None:
            with self._capturing(key):
                yield
        else:
            with self._replaying(state):
                yield
            self.replayed += 1

    @contextmanager
    def _capturing(self, key: str) -> Iterator[None]:
        captured: list[torch.Tensor] = []

        def capture(module: Any, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach().to("cpu", copy=True))

        handle = self.layers[self.first].register_forward_pre_hook(capture)
        try:
            yield
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ModelError(f"decoder layer {self.first} ran {len(captured)} times in one forward pass; expected once")
        (state,) = captured
        size = state.numel() * state.element_size()
        if self.used_bytes + size <= self.budget_bytes:
            self.states[key] = state
            self.used_bytes += size
            self.captured += 1

    @contextmanager
    def _replaying(self, state: torch.Tensor) -> Iterator[None]:
        def replace(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            arriving = args[0]  # the embeddings, passed through the skipped layers
            if tuple(arriving.shape) != tuple(state.shape):
                raise ModelError(
                    f"decoder layer {self.first}: the cached input has shape {tuple(state.shape)}, this pass "
                    f"{tuple(arriving.shape)}"
                )
            return (state.to(arriving.device, arriving.dtype), *args[1:])

        skipped = [self.layers[index] for index in range(self.first)]
        handle = self.layers[self.first].register_forward_pre_hook(replace)
        try:
            pass_through = _pass_through_class()
            for index in range(self.first):
                self.layers[index] = pass_through()
            yield
        finally:
            for index, layer in enumerate(skipped):
                self.layers[index] = layer
            handle.remove()
