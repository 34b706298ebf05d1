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
attention mask, pixel values, ...) and the model's ``prefix_digest``, not by its position in a loop. The cache stays in host
memory up to ``budget_bytes`` (default 2 GiB); a batch that does not fit is run in full, which
gives the same result, only slower.

Two models share the cached states when everything that runs before layer ``first`` is the
same: ``prefix_digest`` hashes the config, the dtype, the device type and every stored tensor
except those of decoder layers ``first`` and above (the digests ``kvwctl.checkpoint`` caches). A
checkpoint written by ``kvwctl apply`` from layers ``first`` and above has its original's digest,
and so has a model fine-tuned only in those layers (the example's vanilla and oracle); eval's
three models and tune's reference and baseline then run layers ``0..first-1`` once per batch.

    cache = LayerInputCache(first=14)
    with cache.around(loaded, inputs):   # captures, or replays what an earlier pass captured
        logits = loaded.model(**inputs).logits
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kvwctl.errors import ModelError

if TYPE_CHECKING:
    import torch

    from kvwctl.checkpoint import Checkpoint
    from kvwctl.modeling import LoadedModel

DEFAULT_BUDGET_BYTES = 2 * 1024**3
# The families whose decoder layers take and return the hidden state as the pass-through does, and
# whose replay is tested bit for bit (tests/test_layercache.py: llava, qwen2_vl, qwen2; llama,
# mistral and qwen2_5_vl share their decoder code). Others run every layer: same result, slower.
FAMILIES = frozenset({"llava", "qwen2_vl", "qwen2_5_vl", "llama", "qwen2", "mistral"})


def supports(checkpoint: Checkpoint) -> bool:
    """Whether the layer cache may stand in for this model's first layers."""
    return checkpoint.architecture.model_type in FAMILIES


def decoder_layers(loaded: LoadedModel) -> Any:
    """The language model's decoder layers (an ``nn.ModuleList``), by the registry's module path."""
    layers = loaded.model
    for attribute in loaded.checkpoint.architecture.decoder_layers.split("."):
        layers = getattr(layers, attribute)
    return layers


def stored_layer(checkpoint: Checkpoint, name: str) -> int | None:
    """The decoder layer a stored tensor belongs to (None: not a decoder layer's), by the registry's
    on-disk patterns with the down projection's name widened to any tensor of the layer."""
    down = checkpoint.architecture.down_proj.replace(".", r"\.") + r"\.weight"
    for pattern in checkpoint.architecture.disk_patterns:
        match = re.fullmatch(pattern.replace(down, ".+"), name)
        if match:
            return int(match.group("layer"))
    return None


def first_difference(checkpoint: Checkpoint, other: Checkpoint) -> int | None:
    """The lowest decoder layer in which two checkpoints' stored tensors differ; None when they differ
    anywhere else (or not at all, or in their configs): nothing to share, or everything."""
    if checkpoint.config != other.config:
        return None
    ours, theirs = checkpoint.tensor_digests(), other.tensor_digests()
    layers = []
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            layer = stored_layer(checkpoint, name)
            if layer is None:
                return None
            layers.append(layer)
    return min(layers) if layers else None


def prefix_digest(checkpoint: Checkpoint, first: int, dtype: torch.dtype, device: torch.device) -> str:
    """SHA-256 of what a model runs before decoder layer ``first``: config, dtype, device type and every
    stored tensor except those of layers ``first`` and above."""
    digest = hashlib.sha256()
    digest.update(json.dumps(checkpoint.config, sort_keys=True).encode())
    digest.update(f"\n{dtype}|{device.type}|{first}".encode())
    digests = checkpoint.tensor_digests()
    for tensor in sorted(checkpoint.tensors, key=lambda entry: entry.name):
        layer = stored_layer(checkpoint, tensor.name)
        if layer is None or layer < first:
            digest.update(f"\n{tensor.name}|{tensor.dtype}|{list(tensor.shape)}|{digests[tensor.name]}".encode())
    return digest.hexdigest()


def inputs_key(inputs: dict[str, Any]) -> str:
    """The sha256 of a forward pass's inputs: names, and every tensor's dtype, shape and bytes.

    Nested inputs are walked: the vision-feature cache passes ``mm_encoder_outputs``, a dict of
    model outputs holding a tuple of per-image tensors, whose ``repr`` would elide their values.
    """
    digest = hashlib.sha256()
    _digest_value(digest, "", inputs)
    return digest.hexdigest()


def _digest_value(digest: Any, name: str, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):  # transformers' ModelOutput is a dict too
        digest.update(f"{name}:dict{len(value)};".encode())
        for key in sorted(value, key=str):
            _digest_value(digest, f"{name}.{key}", value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{name}:seq{len(value)};".encode())
        for index, item in enumerate(value):
            _digest_value(digest, f"{name}[{index}]", item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{name}={value!r};".encode())
    else:
        raise ModelError(f"the layer cache cannot key a model input {name!r} of type {type(value).__name__}")


@functools.cache
def _pass_through_class() -> Any:
    import torch

    class PassThrough(torch.nn.Module):
        """Stands in for a skipped decoder layer: returns the hidden state it is given, untouched."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

    return PassThrough


class LayerInputCache:
    """Per model prefix and batch, the hidden state entering decoder layer ``first`` (see the module docstring).

    Valid only while a model's layers ``0..first-1`` keep their stored weights: its callers edit
    ``first`` and above.
    """

    def __init__(self, first: int, *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if first < 0:
            raise ValueError(f"first layer {first} is negative")
        self.first = first
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.states: dict[tuple[str, str], torch.Tensor] = {}  # (prefix, inputs) -> (batch, sequence, hidden), host
        self._prefixes: list[tuple[weakref.ref[Any], str]] = []  # loaded models seen, by weak reference
        self.replayed = 0  # passes that skipped layers 0..first-1
        self.captured = 0

    def prefix(self, loaded: LoadedModel) -> str:
        """``prefix_digest`` of a loaded model, computed once per model object."""
        self._prefixes = [(ref, digest) for ref, digest in self._prefixes if ref() is not None]
        for ref, digest in self._prefixes:
            if ref() is loaded.model:
                return digest
        digest = prefix_digest(loaded.checkpoint, self.first, loaded.dtype, loaded.device)
        self._prefixes.append((weakref.ref(loaded.model), digest))
        return digest

    @contextmanager
    def around(self, loaded: LoadedModel, inputs: dict[str, Any]) -> Iterator[None]:
        """Around one forward pass of ``loaded.model(**inputs)``: replay the cached state or capture it."""
        layers = decoder_layers(loaded)
        if self.first == 0 or self.first >= len(layers):
            yield  # nothing to skip, or no such layer
            return
        key = (self.prefix(loaded), inputs_key(inputs))
        state = self.states.get(key)
        if state is None:
            with self._capturing(layers, key):
                yield
        else:
            with self._replaying(layers, state):
                yield
            self.replayed += 1

    @contextmanager
    def _capturing(self, layers: Any, key: tuple[str, str]) -> Iterator[None]:
        captured: list[torch.Tensor] = []

        def capture(module: Any, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach().to("cpu", copy=True))

        handle = layers[self.first].register_forward_pre_hook(capture)
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
    def _replaying(self, layers: Any, state: torch.Tensor) -> Iterator[None]:
        def replace(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            arriving = args[0]  # the embeddings, passed through the skipped layers
            if tuple(arriving.shape) != tuple(state.shape):
                raise ModelError(
                    f"decoder layer {self.first}: the cached input has shape {tuple(state.shape)}, this pass "
                    f"{tuple(arriving.shape)}"
                )
            return (state.to(arriving.device, arriving.dtype), *args[1:])

        skipped = [layers[index] for index in range(self.first)]
        handle = layers[self.first].register_forward_pre_hook(replace)
        try:
            pass_through = _pass_through_class()
            for index in range(self.first):
                layers[index] = pass_through()
            yield
        finally:
            for index, layer in enumerate(skipped):
                layers[index] = layer
            handle.remove()
