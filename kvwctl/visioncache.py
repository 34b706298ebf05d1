"""The vision-feature cache: the vision tower is never edited, so its output is computed once.

    kvwctl profile --split retain --vision-cache kvw-run/vision-cache   # the default with a kvw.toml
    kvwctl eval --vision-cache off                                      # always recompute

KVW edits only the language model's down projections. The **projected image features** — what
``get_image_features`` returns (vision tower, then projector / patch merger) and the language
model receives in place of its image tokens — are therefore the same for the original model, every
progressive step, every tune trial and every unlearned checkpoint. They are stored once per image
and reused by the retain and forget profiles, progressive apply, tune and eval.

An entry is keyed by SHA-256 over

* the **image file's bytes** (its SHA-256);
* the **vision weights**: canonical name, dtype, shape and byte digest of every stored tensor of the
  vision tower and projector (``vision_tower.*``, ``multi_modal_projector.*``, ``visual.*``, in the
  Hub or transformers 5 layout, from ``Checkpoint.tensor_digests``), and ``config.json`` without
  its ``text_config`` — so a kvwctl-edited checkpoint, whose vision tensors are byte-identical,
  hits the original's entries, and any change to a vision weight misses;
* the **image processor's settings** (``image_processor.to_dict()``: size, resampling,
  normalisation, patch and merge sizes… whatever changes ``pixel_values``);
* the dtype and device type the features are computed in, and the torch and transformers versions.

Entries are safetensors files ``<dir>/<key[:2]>/<key>.safetensors`` written atomically; their
metadata repeats the key and the SHA-256 of the feature bytes. An entry that cannot be read, whose
key, digest or shape does not fit, is **recomputed and rewritten, never trusted**.

Features enter the model as transformers 5 takes precomputed encoder outputs: ``pixel_values`` is
replaced by ``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(...))}``, one
tensor per image in the processor's order, which ``forward`` (LLaVA, Qwen2-VL, Qwen2.5-VL) scatters
into the image tokens and ``generate`` passes to the prefill. ``image_grid_thw`` stays, for
Qwen2-VL's 3-D positions. Only the missing images of a batch go through the vision tower, in one
call, in their order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.checkpoint import Checkpoint
from kvwctl.errors import KvwError, ModelError
from kvwctl.files import file_sha256, output_errors, save_safetensors_atomically

if TYPE_CHECKING:
    import torch

FORMAT = "kvwctl.vision-features/1"
OFF = "off"
_VISION_TENSOR = re.compile(r"(?:^|\.)(?P<module>vision_tower|multi_modal_projector|visual)\.")


def cache_directory(options: Any) -> Path | None:
    """The cache folder a stage's options name (``vision_cache``), or None when off or unset."""
    value = getattr(options, "vision_cache", None)
    if value is None or value == OFF:
        return None
    return Path(value)


def vision_weights_records(checkpoint: Checkpoint) -> list[str]:
    """``name|dtype|shape|sha256`` of every vision-tower and projector tensor, layout-independent."""
    digests = checkpoint.tensor_digests()
    records = []
    for tensor in checkpoint.tensors:
        match = _VISION_TENSOR.search(tensor.name)
        if match is not None:
            name = tensor.name[match.start("module") :]
            records.append(f"{name}|{tensor.dtype}|{list(tensor.shape)}|{digests[tensor.name]}")
    if not records:
        raise ModelError(
            f"{checkpoint.path}: no vision-tower or projector tensor found for the vision-feature cache",
            hint="pass --vision-cache off",
        )
    return sorted(records)


def _tensor_sha256(tensor: torch.Tensor) -> str:
    import torch

    return hashlib.sha256(tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class VisionCache:
    """Projected image features on disk, for one model's vision weights and processor settings."""

    directory: Path
    model_key: str  # SHA-256 of everything but the image (see the module docstring)
    device: torch.device
    dtype: torch.dtype
    image_token_id: int | None
    merge_size: int | None  # Qwen2-VL's spatial merge: features per image = t*h*w / merge**2
    hits: int = 0
    misses: int = 0
    _image_digests: dict[tuple[str, int, int], str] = field(default_factory=dict, repr=False)

    @staticmethod
    def open(
        directory: Path, checkpoint: Checkpoint, processor: Any, *, device: torch.device, dtype: torch.dtype
    ) -> VisionCache:
        import torch
        import transformers

        if directory.exists() and not directory.is_dir():
            raise KvwError(
                f"--vision-cache {directory} is not a folder", hint="name a folder, or pass --vision-cache off"
            )
        resolved, model_dir = directory.resolve(), checkpoint.path.resolve()
        if resolved == model_dir or model_dir in resolved.parents:
            raise KvwError(
                f"--vision-cache {directory} is inside the checkpoint {checkpoint.path}",
                hint="choose a folder outside the model directory",
            )
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise ModelError(f"{checkpoint.path}: the processor has no image processor for the vision-feature cache")
        config = {key: value for key, value in checkpoint.config.items() if key != "text_config"}
        parts = {
            "format": FORMAT,
            "vision_weights": vision_weights_records(checkpoint),
            "config": config,
            "image_processor": image_processor.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        model_key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
        vision_config = checkpoint.config.get("vision_config") or {}
        image_token = checkpoint.config.get("image_token_id", checkpoint.config.get("image_token_index"))
        return VisionCache(
            directory=directory,
            model_key=model_key,
            device=device,
            dtype=dtype,
            image_token_id=image_token if isinstance(image_token, int) else None,
            merge_size=vision_config.get("spatial_merge_size"),
        )

    def entry_key(self, image: Path) -> str:
        """The entry of one image file: its bytes' SHA-256 (memoised by size and mtime) with the model key."""
        stat = image.stat()
        memo = (str(image.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in self._image_digests:
            self._image_digests[memo] = file_sha256(image)
        return hashlib.sha256(f"{self.model_key}|{self._image_digests[memo]}".encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _load(self, key: str, rows: int | None) -> torch.Tensor | None:
        """An entry's features, or None when it is missing or does not check out (then recomputed)."""
        from safetensors import SafetensorError, safe_open

        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stream:
                metadata = stream.metadata() or {}
                if set(stream.keys()) != {"features"}:
                    return None
                features: torch.Tensor = stream.get_tensor("features")
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        if metadata.get("format") != FORMAT or metadata.get("key") != key or features.dtype != self.dtype:
            return None
        if features.dim() != 2 or (rows is not None and features.shape[0] != rows):
            return None
        if metadata.get("sha256") != _tensor_sha256(features):
            return None
        return features

    def _store(self, key: str, features: torch.Tensor) -> None:
        stored = features.detach().to("cpu").contiguous()
        metadata = {"format": FORMAT, "key": key, "model_key": self.model_key, "sha256": _tensor_sha256(stored)}
        path = self.entry_path(key)
        with output_errors(self.directory):  # a full disk or a read-only folder: an error, no traceback
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomically({"features": stored}, path, metadata)

    def _rows(self, inputs: dict[str, Any], count: int) -> list[int | None]:
        """The feature rows each image must have: from Qwen2-VL's grid, else an equal share of the image tokens."""
        grid = inputs.get("image_grid_thw")
        if grid is not None and self.merge_size:
            return [int(size) // self.merge_size**2 for size in grid.prod(-1).tolist()]
        if self.image_token_id is not None and "input_ids" in inputs:
            tokens = int((inputs["input_ids"] == self.image_token_id).sum())
            if tokens % count == 0:
                return [tokens // count] * count
        return [None] * count

    def encoded(self, model: Any, inputs: dict[str, Any], images: list[Path]) -> dict[str, Any]:
        """``inputs`` (the processor's, on the CPU) with ``pixel_values`` replaced by the cached features.

        The features of images without a valid entry are computed in one ``get_image_features``
        call and stored. Returns the new inputs: ``mm_encoder_outputs`` on the model's device.
        """
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pixel_values = inputs["pixel_values"]
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            # (patches, channels * patch size...) rows, t*h*w of them per image
            chunks = list(torch.split(pixel_values, grid.prod(-1).tolist()))
        else:
            chunks = list(pixel_values.split(1))  # (1, channels, height, width) per image
        if len(chunks) != len(images):
            raise ModelError(f"the processor gave pixel values for {len(chunks)} images; the batch has {len(images)}")
        keys = [self.entry_key(image) for image in images]
        rows = self._rows(inputs, len(images))
        features: dict[str, torch.Tensor] = {}
        for index, key in enumerate(keys):
            if key not in features:
                found = self._load(key, rows[index])
                if found is not None:
                    features[key] = found
        missing = [index for index, key in enumerate(keys) if key not in features and keys.index(key) == index]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            arguments: dict[str, Any] = {
                "pixel_values": torch.cat([chunks[index] for index in missing]).to(self.device, self.dtype)
            }
            if grid is not None:
                arguments["image_grid_thw"] = grid[missing].to(self.device)
            with torch.inference_mode():
                output = model.base_model.get_image_features(**arguments, return_dict=True)
            computed = list(output.pooler_output)  # one (rows, hidden) tensor per image, in order
            if len(computed) != len(missing):
                raise ModelError(f"get_image_features gave {len(computed)} feature tensors for {len(missing)} images")
            for index, image_features in zip(missing, computed, strict=True):
                features[keys[index]] = image_features
                self._store(keys[index], image_features)
        encoded = {name: value for name, value in inputs.items() if name != "pixel_values"}
        pooled = tuple(features[key].to(self.device, self.dtype) for key in keys)
        # transformers 5 multimodal models take a tuple of per-image tensors as pooler_output here.
        encoded["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}  # type: ignore[arg-type]
        return encoded
