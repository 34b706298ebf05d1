"""Loading models with their real transformers classes, and reading knowledge coefficients.

The knowledge coefficients of layer ``l`` are the absolute values of the input ``a`` of its
down projection (``act(gate(h)) * up(h)`` for gated MLPs). ``CoefficientCollector`` puts a
forward pre-hook on every down projection of the language model and, for each batch, adds up
``|a|`` over the profiled positions of each sample, in float64 on the model's device. In a
mixture-of-experts layer it also sums every routed expert's ``|a_e|`` over the profiled positions
routed to it, with a count per expert (``kvwctl.experts``). It runs the base model
(``model.base_model``: the decoder, and the vision tower of a multimodal model) without the
language-model head, and its dense hooks never wait for the device: the positions to profile are
indexed on the host when the batch is encoded, so no ``.nonzero()``, ``.item()`` or
``int(tensor)`` reads a device tensor back per batch or per layer.

``encode_batch`` tokenizes whole conversations (right padding) for profiling and teacher-forced
scoring; ``encode_prompts`` tokenizes prompts alone (left padding) for generation. With a vision
cache (``kvwctl.visioncache``) both pass cached image features instead of pixel values.

``load_model`` with a ``Placement`` (``kvwctl.placement``: ``--device-map``, ``--max-memory``)
lets accelerate dispatch the model over several devices or offload part of it; the hooks then
keep each layer's sums on that layer's device.

torch and transformers are imported inside functions so that ``kvwctl --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvwctl.architectures import context_length
from kvwctl.checkpoint import Checkpoint
from kvwctl.conversation import ChatRenderer, RenderedPrompt, RenderedSample, profiled_positions
from kvwctl.data import Sample, load_image
from kvwctl.errors import KvwError, ModelError
from kvwctl.prefix_suffix import PrefixSuffixRenderer, check_suffix_segment

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from kvwctl.placement import Placement
    from kvwctl.visioncache import VisionCache


def select_device(name: str, *, placement: Placement | None = None) -> torch.device:
    """The torch device for a ``--device`` value (its syntax is checked by ``kvwctl.options``).

    With a ``placement`` (``--device-map``) the device is the map's first, where inputs go.
    """
    import torch

    if placement is not None:
        return placement.primary_device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KvwError(f"--device {name} was asked for but CUDA is not available", hint="use --device cpu")
    return device


def select_dtype(name: str, device: torch.device, config: dict[str, Any]) -> torch.dtype:
    """``auto``: the checkpoint's dtype on a GPU; float32 on the CPU (half precision is slow there).

    The name is one of ``kvwctl.options.DTYPES`` (checked there).
    """
    import torch

    if name != "auto":
        chosen: torch.dtype = getattr(torch, name)
        return chosen
    if device.type == "cpu":
        return torch.float32
    stored = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if stored in ("float32", "bfloat16", "float16"):
        stored_dtype: torch.dtype = getattr(torch, stored)
        return stored_dtype
    return torch.bfloat16


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    model: Any
    renderer: ChatRenderer
    down_projections: list[Any]  # the language model's dense down projections, by layer (None: experts only)
    device: torch.device  # where inputs go: the model's device, or its input embeddings' when dispatched
    dtype: torch.dtype
    placement: Placement | None = None  # the device map it was dispatched with (kvwctl.placement)
    vision_cache: VisionCache | None = None  # projected image features, reused (kvwctl.visioncache)
    experts: list[Any | None] = field(default_factory=list)  # per layer, the experts module (mixture of experts)


def load_model(
    checkpoint: Checkpoint,
    *,
    device: torch.device,
    dtype: torch.dtype,
    placement: Placement | None = None,
    vision_cache: Path | None = None,
) -> LoadedModel:
    """The checkpoint's model on ``device``, or dispatched by accelerate with a ``placement``.

    A dispatched model is never moved; ``device`` becomes its input embeddings' execution device.
    ``vision_cache`` (a directory) turns on the cache of projected image features of a
    multimodal model.
    """
    import transformers

    from kvwctl.console import capture_transformers
    from kvwctl.placement import input_device

    capture_transformers()
    architecture = checkpoint.architecture
    model_class = getattr(transformers, architecture.auto_class)
    placed = placement.from_pretrained_kwargs() if placement is not None else {}
    # ignore_mismatched_sizes: a weight whose shape disagrees with config.json is reported in the
    # loading info (and refused below, by name) instead of raising from inside transformers.
    model, loading_info = model_class.from_pretrained(
        checkpoint.path,
        dtype=dtype,
        trust_remote_code=False,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        **placed,
    )
    check_loading_info(checkpoint, model, loading_info)
    if placement is None:
        model.to(device)
    else:
        device = input_device(model)
    model.eval()
    if architecture.multimodal:
        try:
            processor = transformers.AutoProcessor.from_pretrained(checkpoint.path)
        except ImportError as error:  # e.g. SmolVLM's processor needs the num2words package
            raise ModelError(
                f"{checkpoint.path}: transformers cannot load the {architecture.model_type} processor: {error}",
                hint="install the package it names into kvwctl's environment",
            ) from error
    else:
        processor = transformers.AutoTokenizer.from_pretrained(checkpoint.path)
    modules, experts = down_projection_modules(model, checkpoint)
    renderer: ChatRenderer
    if architecture.rendering == "prefix-suffix":  # PaliGemma: no chat template, the answer as suffix=
        renderer = PrefixSuffixRenderer(
            processor, max_tokens=context_length(checkpoint.config), image_required=architecture.image_required
        )
    else:
        renderer = ChatRenderer(
            processor,
            multimodal=architecture.multimodal,
            max_tokens=context_length(checkpoint.config),
            image_required=architecture.image_required,
        )
    return LoadedModel(
        checkpoint=checkpoint,
        model=model,
        renderer=renderer,
        down_projections=modules,
        device=device,
        dtype=dtype,
        placement=placement,
        vision_cache=_vision_cache(checkpoint, processor, vision_cache, device=device, dtype=dtype),
        experts=experts,
    )


def _vision_cache(
    checkpoint: Checkpoint, processor: Any, directory: Path | None, *, device: torch.device, dtype: torch.dtype
) -> VisionCache | None:
    if directory is None or not checkpoint.architecture.multimodal:
        return None
    from kvwctl.visioncache import VisionCache

    return VisionCache.open(directory, checkpoint, processor, device=device, dtype=dtype)


def check_loading_info(checkpoint: Checkpoint, model: Any, loading_info: dict[str, Any]) -> None:
    """Refuse a model whose weights are not exactly the checkpoint's, naming the tensors.

    transformers initialises a missing weight at random and keeps going; kvwctl would then profile,
    edit or evaluate a model that is not the one it fingerprinted. Tied weights (``lm_head`` with
    ``tie_word_embeddings``) are filled from their source and are not missing.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = sorted(
        key
        for key in loading_info.get("missing_keys", ())
        if key not in tied or tied[key] in loading_info["missing_keys"]
    )
    problems = [f"missing from the checkpoint (transformers would initialise it at random): {key}" for key in missing]
    problems += [
        f"not a weight of {type(model).__name__}: {key}" for key in sorted(loading_info.get("unexpected_keys", ()))
    ]
    for key, stored, expected in sorted(loading_info.get("mismatched_keys", ()), key=lambda item: item[0]):
        problems.append(f"shape {list(stored)} on disk, but config.json makes it {list(expected)}: {key}")
    problems += [str(message) for message in loading_info.get("error_msgs", ())]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ModelError(
            f"{checkpoint.path}: the weights do not fit the model that config.json describes:\n  " + "\n  ".join(shown),
            hint="the checkpoint is incomplete, altered or saved for another architecture; re-save it with save_pretrained",
        )


def down_projection_modules(model: Any, checkpoint: Checkpoint) -> tuple[list[Any | None], list[Any | None]]:
    """Per decoder layer its dense down-projection module and its experts module, by the registry's paths.

    A dense model has a down projection in every layer and no experts (an empty list). In a
    mixture-of-experts model each layer has what the checkpoint has on disk: experts, a dense (or
    shared-expert) down projection, or both.
    """
    architecture = checkpoint.architecture
    layers = model
    for attribute in architecture.decoder_layers.split("."):
        if not hasattr(layers, attribute):
            raise ModelError(
                f"{type(model).__name__} has no module {architecture.decoder_layers!r}; the registry "
                f"entry for {architecture.model_type!r} does not fit this transformers version",
            )
        layers = getattr(layers, attribute)
    if len(layers) != checkpoint.num_layers:
        raise ModelError(
            f"{architecture.decoder_layers} has {len(layers)} layers; the checkpoint has "
            f"{checkpoint.num_layers} down-projection weights"
        )
    if architecture.experts is not None:
        return _moe_modules(layers, checkpoint)
    modules: list[Any | None] = []
    for layer in layers:
        module = layer
        for attribute in architecture.down_proj.split("."):
            module = getattr(module, attribute)
        modules.append(module)
    return modules, []


def _moe_modules(layers: Any, checkpoint: Checkpoint) -> tuple[list[Any | None], list[Any | None]]:
    """The modules of a mixture-of-experts model, each matched with what the checkpoint stores."""
    from kvwctl.experts import experts_module

    architecture = checkpoint.architecture
    assert architecture.experts is not None
    paths = [
        architecture.down_proj,
        *([architecture.experts.shared_down_proj] if architecture.experts.shared_down_proj else []),
    ]
    dense: list[Any | None] = []
    experts: list[Any | None] = []
    for index, layer in enumerate(layers):
        found = [_module_at(layer, path) for path in paths]
        module = next((candidate for candidate in found if candidate is not None), None)
        expert_module = experts_module(layer, architecture)
        stored_experts = checkpoint.experts(index)
        if (module is None) != (checkpoint.dense(index) is None) or (expert_module is None) != (stored_experts is None):
            raise ModelError(
                f"layer {index}: the model built from config.json and the checkpoint's weights disagree on "
                "which down projections and experts it has",
                hint="the checkpoint's config.json does not fit its weights",
            )
        if expert_module is not None and stored_experts is not None:
            shape = tuple(expert_module.down_proj.shape)  # (E, d_model, m) or, gpt-oss, (E, m, d_model)
            if (
                shape[0] != stored_experts.num_experts
                or shape[architecture.experts.memory_axis] != stored_experts.num_vectors
            ):
                raise ModelError(
                    f"layer {index}: the loaded experts' down_proj has shape {shape}; the checkpoint stores "
                    f"{stored_experts.num_experts} experts of {stored_experts.num_vectors} vectors"
                )
        dense.append(module)
        experts.append(expert_module)
    return dense, experts


def _module_at(root: Any, path: str) -> Any | None:
    module = root
    for attribute in path.split("."):
        if not hasattr(module, attribute):
            return None
        module = getattr(module, attribute)
    return module


@dataclass
class EncodedBatch:
    inputs: dict[str, Any]  # ready for model(**inputs), on the model's device
    position_mask: torch.Tensor  # (batch, sequence) bool: the profiled positions
    # The same positions, indexed on the host before the copy to the device (so reading them needs
    # no synchronisation): each one's index into the flattened (batch * sequence) positions, and its row.
    position_index: torch.Tensor  # (positions,) int64
    position_rows: torch.Tensor  # (positions,) int64

    @classmethod
    def of(cls, inputs: dict[str, Any], mask: torch.Tensor, device: torch.device) -> EncodedBatch:
        """A batch whose profiled positions are ``mask`` (on the host), indexed before the copy to ``device``."""
        flat = mask.reshape(-1).nonzero()[:, 0]  # (positions,): on the host, in row-major order
        return cls(
            inputs=inputs,
            position_mask=mask.to(device),
            position_index=flat.to(device),
            position_rows=(flat // mask.shape[1]).to(device),
        )


def _process(
    renderer: ChatRenderer, items: Sequence[RenderedSample | RenderedPrompt], *, padding_side: str
) -> dict[str, Any]:
    """One processor call for a batch of rendered texts (and their images), padded on one side."""
    flags = {item.add_special_tokens for item in items}
    if len(flags) != 1:
        raise ModelError("samples of one batch disagree on whether the template writes BOS")
    kwargs: dict[str, Any] = dict(
        text=[item.text for item in items],
        return_tensors="pt",
        padding=True,
        padding_side=padding_side,
        add_special_tokens=flags.pop(),
    )
    # One list of images per sample (empty for a text-only one): processors that count image
    # placeholders per prompt (Gemma 3, Idefics3, Mllama) need the nesting; the others flatten it.
    images = [[load_image(path) for path in item.sample.images] for item in items]
    if any(images):
        kwargs["images"] = images
    suffixes = [item.suffix for item in items if isinstance(item, RenderedSample) and item.suffix is not None]
    if suffixes:  # PaliGemma: the answers, which its processor appends after the prompt as a causal suffix
        if len(suffixes) != len(items):
            raise ModelError("samples of one batch disagree on whether the answer is a processor suffix")
        kwargs["suffix"] = suffixes
    inputs = dict(renderer.processor(**kwargs))
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels; kvwctl never trains
    return inputs


def encode_batch(loaded: LoadedModel, rendered: list[RenderedSample], *, positions: str) -> EncodedBatch:
    """Tokenize a batch through the processor (right padding) and mark the profiled positions."""
    import torch

    renderer = loaded.renderer
    inputs = _process(renderer, rendered, padding_side="right")
    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, item in enumerate(rendered):
        length = int(attention_mask[row].sum())
        answer_start = length - item.suffix_length
        # Everything from the last prompt token on must be exactly what the tokenizer gave alone;
        # image expansion happens before it.
        expected = list(item.token_ids[item.answer_start - 1 :])
        if answer_start < 1 or input_ids[row, answer_start - 1 : length].tolist() != expected:
            raise ModelError(
                f"{item.sample.source}: cannot locate the answer of sample {item.sample.id!r} in the "
                "processor's token sequence"
            )
        if item.suffix is not None:  # PaliGemma: the processor must mark exactly the answer and <eos>
            check_suffix_segment(inputs.get("token_type_ids"), row, answer_start=answer_start, length=length, item=item)
        renderer.check_bos(input_ids[row, :2].tolist(), item.sample)
        selected = profiled_positions(
            positions, length=length, answer_start=answer_start, answer_length=item.answer_length
        )
        mask[row, selected.start : selected.stop] = True
    return EncodedBatch.of(_model_inputs(loaded, inputs, rendered), mask, loaded.device)


def encode_prompts(loaded: LoadedModel, prompts: list[RenderedPrompt]) -> dict[str, Any]:
    """Tokenize a batch of prompts for generation, with LEFT padding.

    Every row then ends at the last column, so the tokens ``generate`` appends follow each prompt
    directly; the attention mask hides the padding (and the model derives positions from it).
    """
    renderer = loaded.renderer
    inputs = _process(renderer, prompts, padding_side="left")
    input_ids = inputs["input_ids"]  # (batch, sequence)
    attention_mask = inputs["attention_mask"]  # (batch, sequence)
    if not bool(attention_mask[:, -1].all()):
        raise ModelError("the processor did not pad the prompts on the left")
    for row, prompt in enumerate(prompts):
        start = input_ids.shape[1] - int(attention_mask[row].sum())  # the first non-pad token
        renderer.check_bos(input_ids[row, start : start + 2].tolist(), prompt.sample)
    return _model_inputs(loaded, inputs, prompts)


def _model_inputs(
    loaded: LoadedModel, inputs: dict[str, Any], items: Sequence[RenderedSample | RenderedPrompt]
) -> dict[str, Any]:
    """The processor's outputs ready for the model: pixel values replaced by cached image features
    when the vision cache is on (``kvwctl.visioncache``), everything on the model's device."""
    if loaded.vision_cache is not None and "pixel_values" in inputs:
        images = [path for item in items for path in item.sample.images]
        inputs = loaded.vision_cache.encoded(loaded.model, inputs, images)
    return {name: value if name == "mm_encoder_outputs" else _to_model(value, loaded) for name, value in inputs.items()}


def _to_model(value: Any, loaded: LoadedModel) -> Any:
    """A processor output on the model's device; pixel values in the model's dtype."""
    if not hasattr(value, "to"):
        return value
    if value.is_floating_point():
        return value.to(loaded.device, loaded.dtype)
    return value.to(loaded.device)


class CoefficientCollector:
    """Per-sample sums of ``|a|`` at the profiled positions, for every down projection and expert.

    Use as a context manager around forward passes; ``run(batch)`` returns, per part of the model
    (``kvwctl.method.dense_part``/``experts_part`` of a layer), the float64 sums and the counts:
    a dense down projection ``(batch, m)`` and the number of profiled positions of each sample
    ``(batch,)`` (the same for every layer); a layer's routed experts ``(batch, E, m)`` and the
    profiled positions routed to each expert ``(batch, E)``; and the positions of each sample.
    Everything stays on the device: the forward pass goes through the base model only (no
    language-model head, no logits), and the dense hooks select the profiled positions with the
    host-made indices of ``EncodedBatch``.
    """

    def __init__(self, modules: Sequence[Any | None], experts: Sequence[Any | None] | None = None) -> None:
        from kvwctl.experts import ExpertCoefficients

        self.modules = modules
        self._experts = ExpertCoefficients(list(experts or []))
        self._handles: list[Any] = []
        self._batch: EncodedBatch | None = None
        self._sums: list[torch.Tensor | None] = [None] * len(modules)
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # on other devices

    def __enter__(self) -> CoefficientCollector:
        for layer, module in enumerate(self.modules):
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(self._hook(layer)))
        self._experts.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._experts.__exit__(*exc_info)

    def _hook(self, layer: int) -> Any:
        import torch

        def hook(module: Any, args: tuple[Any, ...]) -> None:
            activations = args[0]  # (batch, sequence, m): the input of the down projection
            mask, index, rows = self._placed(activations.device)
            if activations.dim() == 2 and activations.shape[0] == mask.numel():
                # A shared expert (Qwen2-MoE) sees the tokens flattened as (batch * sequence, m).
                activations = activations.reshape(*mask.shape, activations.shape[-1])
            if activations.shape[:2] != mask.shape:
                raise ModelError(
                    f"down projection of layer {layer} saw input of shape {tuple(activations.shape)}; "
                    f"expected (batch, sequence, m) = {tuple(mask.shape)} + (m,)"
                )
            width = activations.shape[-1]
            # The same elements, in the same order, as activations[mask], without its .nonzero().
            flat = activations.reshape(-1, width)  # (batch * sequence, m)
            selected = flat.index_select(0, index).abs().to(torch.float64)  # (positions, m)
            sums = torch.zeros(mask.shape[0], width, dtype=torch.float64, device=activations.device)
            self._sums[layer] = sums.index_add_(0, rows, selected)  # (batch, m)

        return hook

    def _placed(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's mask, position indices and rows on ``device``: a dispatched model's layers may
        sit on several devices, and each layer's sums stay on its own device until gathered."""
        batch = self._batch
        assert batch is not None, "CoefficientCollector.run sets it first"
        placed = (batch.position_mask, batch.position_index, batch.position_rows)
        if batch.position_mask.device != device:
            if device not in self._copies:
                self._copies[device] = tuple(tensor.to(device, non_blocking=True) for tensor in placed)  # type: ignore[assignment]
            return self._copies[device]
        return placed

    def run(
        self, loaded: LoadedModel, batch: EncodedBatch
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        import torch

        from kvwctl.method import dense_part, experts_part

        self._batch = batch
        self._copies = {}
        self._sums = [None] * len(self.modules)
        self._experts.start(batch.position_mask)
        with torch.inference_mode():
            # The base model (decoder and vision tower) holds every hooked layer; the head is not run.
            loaded.model.base_model(**batch.inputs, use_cache=False)
        skipped = [
            layer for layer, module in enumerate(self.modules) if module is not None and self._sums[layer] is None
        ]
        if skipped:
            raise ModelError(
                f"the forward pass did not run the down projection of decoder layers {skipped}",
                hint="the model skips these layers for this input (Mllama: cross-attention layers without an image)",
            )
        counts = batch.position_mask.sum(dim=1).to(torch.int64)  # (batch,)
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        expert_results = self._experts.results()
        for layer in range(len(self.modules)):
            layer_sums = self._sums[layer]
            if layer_sums is not None:
                parts[dense_part(layer)] = (layer_sums, counts)  # (batch, m), (batch,)
            if layer in expert_results:
                parts[experts_part(layer)] = expert_results[layer]  # (batch, E, m), (batch, E)
        return parts, counts


def length_order(rendered: Sequence[RenderedSample]) -> list[int]:
    """The samples' indices from shortest to longest, for batches with little padding.

    By image count, then tokens before image expansion; ties by text and image paths, a total
    order on distinct samples, so any order of the same samples batches them the same way.
    """
    return sorted(
        range(len(rendered)),
        key=lambda index: (
            len(rendered[index].sample.images),
            len(rendered[index].token_ids),
            rendered[index].text,
            [str(path) for path in rendered[index].sample.images],
        ),
    )


def render_all(renderer: ChatRenderer, samples: list[Sample]) -> list[RenderedSample]:
    """Render every sample before any forward pass, so that data errors come first."""
    return [renderer.render(sample) for sample in samples]
