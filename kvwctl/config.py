"""``kvw.toml`` and the merging of its values with command-line flags.

Every command reads its defaults from ``kvw.toml`` in the working directory (or ``--config PATH``)
and every flag overrides the file. Paths in the file are relative to the file itself::

    model = "llava-hf/llava-1.5-7b-hf"   # Hub id or local directory
    revision = "main"
    workdir = "kvw-run"                  # where stage files go by default
    gamma = 0.02
    layers = "2:26"

    [splits]
    forget = "data/forget.jsonl"
    retain = "data/retain.jsonl"

Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvwctl.errors import KvwError, UsageError

CONFIG_FILE_NAME = "kvw.toml"
DEFAULT_WORKDIR = "kvw-run"

# key -> (accepted Python types, description used in error messages)
_SCALAR_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a Hub id or a local directory"),
    "revision": ((str,), "a branch, tag or commit"),
    "workdir": ((str,), "a directory path"),
    "gamma": ((int, float), "a number"),
    "layers": ((str,), 'a layer selection such as "2:26"'),
    "batch_size": ((int,), "a positive integer"),
    "forget_batch_size": ((int,), "a positive integer"),
    "device": ((str,), '"auto", "cpu", "cuda" or "cuda:N"'),
    "dtype": ((str,), '"auto", "float32", "bfloat16" or "float16"'),
    "positions": ((str,), '"answer", "answer-tokens" or "all"'),
    "max_new_tokens": ((int,), "a positive integer"),
}


@dataclass(frozen=True)
class ProjectConfig:
    """The values of a ``kvw.toml`` (all optional), with paths made absolute."""

    source: Path | None = None
    model: str | None = None
    revision: str | None = None
    workdir: Path = field(default_factory=lambda: Path(DEFAULT_WORKDIR))
    splits: dict[str, Path] = field(default_factory=dict)
    gamma: float | None = None
    layers: str | None = None
    batch_size: int | None = None
    forget_batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    positions: str | None = None
    max_new_tokens: int | None = None

    def split(self, name: str) -> Path | None:
        return self.splits.get(name)


def load_config(path: Path | None, *, cwd: Path | None = None) -> ProjectConfig:
    """Read ``path``, or ``kvw.toml`` in ``cwd`` if it exists; otherwise an empty config."""
    cwd = cwd or Path.cwd()
    if path is None:
        candidate = cwd / CONFIG_FILE_NAME
        if not candidate.is_file():
            return ProjectConfig(workdir=cwd / DEFAULT_WORKDIR)
        path = candidate
    elif not path.is_file():
        raise KvwError(f"config file {path} does not exist", hint="check the --config path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise KvwError(f"{path}: invalid TOML: {error}") from None
    return _parse(raw, path.resolve())


def _parse(raw: dict[str, Any], source: Path) -> ProjectConfig:
    base = source.parent
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "splits":
            values["splits"] = _parse_splits(value, source)
            continue
        if key not in _SCALAR_KEYS:
            allowed = ", ".join(sorted([*_SCALAR_KEYS, "splits"]))
            raise KvwError(f"{source}: unknown key {key!r}", hint=f"known keys: {allowed}")
        types, description = _SCALAR_KEYS[key]
        # bool is an int in Python; a boolean is never a valid value here.
        if isinstance(value, bool) or not isinstance(value, types):
            raise KvwError(f"{source}: {key} must be {description}, got {value!r}")
        values[key] = value
    for key in ("batch_size", "forget_batch_size", "max_new_tokens"):
        if key in values and values[key] < 1:
            raise KvwError(f"{source}: {key} must be a positive integer, got {values[key]}")
    if "gamma" in values:
        values["gamma"] = float(values["gamma"])
    model = values.get("model")
    if model is not None and (base / model).is_dir():
        # A local checkpoint named relative to the config file.
        values["model"] = str((base / model).resolve())
    values["workdir"] = base / values.get("workdir", DEFAULT_WORKDIR)
    return ProjectConfig(source=source, **values)


def _parse_splits(value: Any, source: Path) -> dict[str, Path]:
    if not isinstance(value, dict):
        raise KvwError(f"{source}: [splits] must be a table of name = path")
    splits = {}
    for name, path in value.items():
        if not isinstance(path, str):
            raise KvwError(f"{source}: splits.{name} must be a path string, got {path!r}")
        splits[name] = source.parent / path
    return splits


def require(value: Any, *, flag: str, key: str) -> Any:
    """A value that must come from a flag or from ``kvw.toml``; a usage error names both."""
    if value is None:
        raise UsageError(
            f"missing {flag}",
            hint=f"pass {flag} or set {key} in {CONFIG_FILE_NAME}",
        )
    return value
