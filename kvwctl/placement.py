"""Models larger than one GPU: accelerate's device maps, memory limits and offloaded weights.

    kvwctl profile --split retain --device-map auto --max-memory 0=20GiB,1=20GiB,cpu=60GiB
    kvwctl eval --device-map placement.json --offload-folder /scratch/offload

``--device-map`` is what ``from_pretrained(device_map=...)`` takes: one of accelerate's strategies
(``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or a JSON file mapping module names to
a device (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``), e.g. ``{"model.vision_tower": 0,
"model.language_model.layers.0": 0, ..., "lm_head": "disk"}``. ``--max-memory`` is accelerate's
``max_memory`` written as ``KEY=SIZE`` pairs (``0=20GiB,cpu=60GiB``; keys are GPU indices, ``cpu``
or ``mps``; sizes take B, KB, MB, GB, TB and KiB, MiB, GiB, TiB, decimal and binary as accelerate
reads them). Modules mapped to ``disk`` (or to ``cpu`` beside GPUs) are **offloaded**: their
parameters stay on the ``meta`` device and accelerate's hooks bring them to the execution device
for every forward pass, from ``--offload-folder`` (a temporary directory removed with the model
unless one is given).

A dispatched model is never moved with ``.to(device)``; inputs go to the device of the input
embeddings (:func:`input_device`), and each layer's outputs follow its hooks. Progressive apply
and tune edit down projections in place: :func:`read_weight` and :func:`write_weight` reach an
offloaded weight through its hook's weights map (the edited tensor is kept in host memory,
``OffloadedWeightsLoader.state_dict``, which accelerate reads before the offload folder).

torch and accelerate are imported inside functions, so ``kvwctl --help`` stays instant.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.errors import KvwError, ModelError, UsageError

if TYPE_CHECKING:
    import torch

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DEVICE_VALUE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?)$")


def device_map_problem(value: str) -> str | None:
    """What is wrong with a ``--device-map`` value (its syntax only; the file is read at load)."""
    if value in STRATEGIES or value.endswith(".json"):
        return None
    return f"must be {', '.join(STRATEGIES)} or a JSON file (module name -> device), got {value!r}"


def max_memory_problem(value: str) -> str | None:
    try:
        parse_max_memory(value)
    except UsageError as error:
        return error.message
    return None


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``0=20GiB,cpu=60GiB`` -> ``{0: 21474836480, "cpu": 60000000000 * ...}`` (bytes per device)."""
    limits: dict[int | str, int] = {}
    for item in text.split(","):
        key, separator, size = item.strip().partition("=")
        key, size = key.strip(), size.strip()
        if not separator or not key or not size:
            raise UsageError(f"must be KEY=SIZE pairs such as 0=20GiB,cpu=60GiB, got {text!r}")
        device: int | str
        if key.isdigit():
            device = int(key)
        elif key in ("cpu", "mps"):
            device = key
        else:
            raise UsageError(f"has an unknown device {key!r} (GPU index, cpu or mps) in {text!r}")
        match = _SIZE.match(size)
        if match is None:
            raise UsageError(f"has an unreadable size {size!r} for {key} (e.g. 20GiB, 500MB, 1000000)")
        unit = (match.group("unit") or "B").upper()
        if device in limits:
            raise UsageError(f"names {key} twice in {text!r}")
        limits[device] = int(float(match.group("number")) * _UNITS[unit])
    return limits


def _read_device_map(path: Path) -> dict[str, int | str]:
    """A device map from a JSON file, every entry checked."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KvwError(f"--device-map {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KvwError(f"--device-map {path}: cannot read it as JSON: {error}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise KvwError(f"--device-map {path}: must be a JSON object mapping module names to devices")
    device_map: dict[str, int | str] = {}
    for module, device in loaded.items():
        valid = (isinstance(device, int) and not isinstance(device, bool) and device >= 0) or (
            isinstance(device, str) and _DEVICE_VALUE.match(device) is not None
        )
        if not valid:
            raise KvwError(
                f"--device-map {path}: module {module!r} has device {device!r}",
                hint="a device is a GPU index, 'cuda:N', 'cpu', 'mps' or 'disk'",
            )
        device_map[str(module)] = device
    return device_map


@dataclass
class Placement:
    """Where a model's modules go: a device map, memory limits and an offload folder.

    ``Placement.from_options(options)`` reads the ``device_map``, ``max_memory`` and
    ``offload_folder`` fields a stage's options have; ``None`` there means one device
    (``--device``), the default.
    """

    device_map: str
    max_memory: str | None = None
    offload_folder: Path | None = None
    _temporaries: list[Any] = field(default_factory=list, repr=False)  # TemporaryDirectory objects, kept alive

    @staticmethod
    def from_options(options: Any) -> Placement | None:
        device_map = getattr(options, "device_map", None)
        if device_map is None:
            return None
        folder = getattr(options, "offload_folder", None)
        return Placement(
            device_map=device_map,
            max_memory=getattr(options, "max_memory", None),
            offload_folder=Path(folder) if folder is not None else None,
        )

    def resolved_map(self) -> str | dict[str, int | str]:
        return self.device_map if self.device_map in STRATEGIES else _read_device_map(Path(self.device_map))

    def primary_device(self) -> torch.device:
        """The device the inputs will most likely go to, before loading (for ``--dtype auto``)."""
        import torch

        resolved = self.resolved_map()
        if isinstance(resolved, str):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for device in resolved.values():
            if device != "disk":
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        return torch.device("cpu")

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """``device_map``, ``max_memory`` and ``offload_folder`` for ``from_pretrained``."""
        kwargs: dict[str, Any] = {"device_map": self.resolved_map()}
        if self.max_memory is not None:
            kwargs["max_memory"] = parse_max_memory(self.max_memory)
        if self.offload_folder is not None:
            self.offload_folder.mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(self.offload_folder)
        else:  # removed when this placement (held by the loaded model) is garbage-collected
            self._temporaries.append(tempfile.TemporaryDirectory(prefix="kvw-offload-"))
            kwargs["offload_folder"] = self._temporaries[-1].name
        return kwargs

    def describe(self, model: Any) -> dict[str, str]:
        """The device of every placed module, as accelerate resolved it (for outputs and messages)."""
        return {name: str(device) for name, device in (getattr(model, "hf_device_map", None) or {}).items()}


def execution_device(module: Any) -> torch.device:
    """The device a module computes on: its hook's execution device when dispatched, else its weight's."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    weight: torch.Tensor = next(module.parameters())
    return weight.device


def input_device(model: Any) -> torch.device:
    """Where a dispatched model's inputs go: the execution device of its input embeddings."""
    return execution_device(model.get_input_embeddings())


def _offloaded_weights(module: Any, name: str) -> tuple[Any, str]:
    """The mapping an offloaded module's hook reads its parameter ``name`` from, and its key there."""
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if hook is None or not getattr(hook, "offload", False) or weights_map is None:
        raise ModelError(f"{type(module).__name__} has its weight on the meta device but no offload hook to read it")
    return weights_map, name


def read_weight(module: Any, name: str = "weight") -> torch.Tensor:
    """A module's weight (a detached tensor): from memory, or from the offload map when offloaded.

    ``name`` is the parameter: ``weight``, or ``down_proj`` for a layer's fused experts."""
    weight: torch.Tensor = getattr(module, name)
    if weight.device.type != "meta":
        return weight.detach()
    weights_map, key = _offloaded_weights(module, name)
    stored: torch.Tensor = weights_map[key]
    return stored


def write_weight(module: Any, value: torch.Tensor, name: str = "weight") -> None:
    """Set a module's weight in place (same dtype), also when accelerate offloads it.

    An offloaded weight is written into the host-memory state dict of its hook's weights map
    (``OffloadedWeightsLoader.state_dict``, read before the offload folder; a plain dict for CPU
    offload), so the next forward pass brings the edited tensor to the execution device.
    """
    import torch
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    weight: torch.Tensor = getattr(module, name)
    if weight.device.type != "meta":
        with torch.no_grad():
            weight.copy_(value)
        return
    weights_map, key = _offloaded_weights(module, name)
    stored = value.detach().to("cpu", weight.dtype).contiguous()
    if isinstance(weights_map, PrefixedDataset):
        dataset, full_key = weights_map.dataset, weights_map.prefix + key
    else:
        dataset, full_key = weights_map, key
    if isinstance(dataset, OffloadedWeightsLoader):
        dataset.state_dict[full_key] = stored
    elif isinstance(dataset, dict):
        dataset[full_key] = stored
    else:
        raise ModelError(f"cannot edit an offloaded weight held in {type(dataset).__name__}")
