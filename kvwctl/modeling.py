"""Loading models with their real transformers classes, and reading knowledge coefficients.

The knowledge coefficients of layer ``l`` are the absolute values of the input ``a`` of its
down projection (``act(gate(h)) * up(h)`` for gated MLPs). ``CoefficientCollector`` puts a
forward pre-hook on every down projection of the language model and, for each batch, adds up
``|a|`` over the profiled positions of each sample, in float64 on the model's device.

``encode_batch`` tokenizes whole conversations (right padding) for profiling and teacher-forced
scoring; ``encode_prompts`` tokenizes prompts alone (left padding) for generation.

torch and transformers are imported inside functions so that ``kvwctl --help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvwctl.architectures import context_length
from kvwctl.checkpoint import Checkpoint
from kvwctl.conversation import ChatRenderer, RenderedPrompt, RenderedSample, profiled_positions
from kvwctl.data import Sample, load_image
from kvwctl.errors import KvwError, ModelError
from kvwctl.prefix_suffix import PrefixSuffixRenderer, check_suffix_segment

if TYPE_CHECKING:
    import torch


def select_device(name: str) -> torch.device:
    """The torch device for a ``--device`` value (its syntax is checked by ``kvwctl.options``)."""
    import torch

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
    down_projections: list[Any]  # the language model's down-projection modules, by layer
    device: torch.device
    dtype: torch.dtype


def load_model(checkpoint: Checkpoint, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    import transformers

    from kvwctl.console import capture_transformers

    capture_transformers()
    architecture = checkpoint.architecture
    model_class = getattr(transformers, architecture.auto_class)
    # ignore_mismatched_sizes: a weight whose shape disagrees with config.json is reported in the
    # loading info (and refused below, by name) instead of raising from inside transformers.
    model, loading_info = model_class.from_pretrained(
        checkpoint.path, dtype=dtype, trust_remote_code=False, output_loading_info=True, ignore_mismatched_sizes=True
    )
    check_loading_info(checkpoint, model, loading_info)
    model.to(device).eval()
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
    modules = down_projection_modules(model, checkpoint)
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
    )


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


def down_projection_modules(model: Any, checkpoint: Checkpoint) -> list[Any]:
    """The down-projection module of each decoder layer, found by the registry's module path."""
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
    modules = []
    for layer in layers:
        module = layer
        for attribute in architecture.down_proj.split("."):
            module = getattr(module, attribute)
        modules.append(module)
    return modules


@dataclass
class EncodedBatch:
    inputs: dict[str, Any]  # ready for model(**inputs), on the model's device
    position_mask: torch.Tensor  # (batch, sequence) bool: the profiled positions


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
    device_inputs = {name: _to_model(value, loaded) for name, value in inputs.items()}
    return EncodedBatch(inputs=device_inputs, position_mask=mask.to(loaded.device))


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
    return {name: _to_model(value, loaded) for name, value in inputs.items()}


def _to_model(value: Any, loaded: LoadedModel) -> Any:
    """A processor output on the model's device; pixel values in the model's dtype."""
    if not hasattr(value, "to"):
        return value
    if value.is_floating_point():
        return value.to(loaded.device, loaded.dtype)
    return value.to(loaded.device)


class CoefficientCollector:
    """Per-sample sums of ``|a|`` at the profiled positions, for every down projection.

    Use as a context manager around forward passes; ``run(batch)`` returns, for each layer, a
    float64 tensor of shape ``(batch, m)`` with the sums, and the number of profiled positions of
    each sample (the same for every layer).
    """

    def __init__(self, modules: list[Any]) -> None:
        self.modules = modules
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # (positions,): the sample of each profiled position
        self._sums: list[torch.Tensor | None] = [None] * len(modules)

    def __enter__(self) -> CoefficientCollector:
        for layer, module in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Any:
        import torch

        def hook(module: Any, args: tuple[Any, ...]) -> None:
            activations = args[0]  # (batch, sequence, m): the input of the down projection
            mask, rows = self._mask, self._rows
            assert mask is not None and rows is not None, "CoefficientCollector.run sets them first"
            if activations.shape[:2] != mask.shape:
                raise ModelError(
                    f"down projection of layer {layer} saw input of shape {tuple(activations.shape)}; "
                    f"expected (batch, sequence, m) = {tuple(mask.shape)} + (m,)"
                )
            selected = activations[mask].abs().to(torch.float64)  # (positions, m)
            sums = torch.zeros(mask.shape[0], activations.shape[-1], dtype=torch.float64, device=activations.device)
            self._sums[layer] = sums.index_add_(0, rows, selected)  # (batch, m)

        return hook

    def run(self, loaded: LoadedModel, batch: EncodedBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        import torch

        self._mask = batch.position_mask
        self._rows = batch.position_mask.nonzero()[:, 0]
        self._sums = [None] * len(self.modules)
        with torch.inference_mode():
            loaded.model(**batch.inputs, use_cache=False, logits_to_keep=1)
        skipped = [layer for layer, layer_sums in enumerate(self._sums) if layer_sums is None]
        if skipped:
            raise ModelError(
                f"the forward pass did not run the down projection of decoder layers {skipped}",
                hint="the model skips these layers for this input (Mllama: cross-attention layers without an image)",
            )
        sums = [layer_sums for layer_sums in self._sums if layer_sums is not None]
        counts = batch.position_mask.sum(dim=1).to(torch.int64)  # (batch,)
        return sums, counts


def render_all(renderer: ChatRenderer, samples: list[Sample]) -> list[RenderedSample]:
    """Render every sample before any forward pass, so that data errors come first."""
    return [renderer.render(sample) for sample in samples]
