"""``kvw.toml``: the project file every command reads its defaults from.

Every command reads ``kvw.toml`` in the working directory (or ``--config PATH``); flags and
``KVW_*`` variables override it (``kvwctl.options`` has the precedence rule). Paths in the file
are relative to the file itself::

    model = "llava-hf/llava-1.5-7b-hf"   # Hub id or local directory
    revision = "main"
    workdir = "kvw-run"                  # where stage files go by default
    gamma = 0.02                         # any option key: gamma, layers, batch_size, ...
    layers = "2:26"

    [splits]
    forget = "data/forget.jsonl"
    retain = "data/retain.jsonl"

Unknown keys are an error (a typo must not silently fall back to a default), and so is a value of
the wrong type or out of range: the file is checked whole when it is read, whatever the command.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvwctl.errors import KvwError, UsageError

if TYPE_CHECKING:
    from kvwctl.source import ModelSpec

CONFIG_FILE_NAME = "kvw.toml"
DEFAULT_WORKDIR = "kvw-run"

# The project keys; every other key is an option's (kvwctl.options.config_keys).
_PROJECT_KEYS = {
    "model": "a Hub id or a local directory",
    "revision": "a branch, tag or commit",
    "workdir": "a directory path",
}


@dataclass(frozen=True)
class ProjectConfig:
    """The values of a ``kvw.toml`` (all optional), with paths made absolute.

    ``values`` holds the option keys that the file sets (``gamma``, ``batch_size``, ...), already
    checked against the options' types and ranges.
    """

    source: Path | None = None
    model: str | None = None
    revision: str | None = None
    workdir: Path = field(default_factory=lambda: Path(DEFAULT_WORKDIR))
    splits: dict[str, Path] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Path | None:
        return self.splits.get(name)

    def revision_for(self, reference: str, flag: str | None) -> str | None:
        """``--revision``, else kvw.toml's revision when the model is kvw.toml's model."""
        return flag or (self.revision if reference == self.model else None)

    def model_spec(self, flag: str | None, revision: str | None) -> ModelSpec:
        """``--model`` (else kvw.toml's model, else a usage error) with its revision."""
        from kvwctl.source import ModelSpec

        reference = require(flag or self.model, flag="--model", key="model")
        return ModelSpec(reference, self.revision_for(reference, revision))

    def eval_models(
        self, model: str | None, revision: str | None, *, baseline: str | None, reference: str | None
    ) -> dict[str, ModelSpec]:
        """The roles eval compares. With a kvw.toml and no ``--model``: apply's output
        ``<workdir>/unlearned`` as the model and kvw.toml's model as the baseline."""
        from kvwctl.source import ModelSpec

        if model is None and self.source is not None:
            model = str(self.workdir / "unlearned")
            if not Path(model).is_dir():
                raise UsageError(
                    "missing --model",
                    hint=f"pass --model, or run kvwctl apply first: eval's default model is its output {model}",
                )
            baseline = baseline or self.model
        if model is None:
            raise UsageError(
                "missing --model",
                hint="pass --model; with a kvw.toml, eval defaults to <workdir>/unlearned (from apply)",
            )
        models = {"model": ModelSpec(model, self.revision_for(model, revision))}
        for role, name in (("baseline", baseline), ("reference", reference)):
            if name is not None:
                models[role] = ModelSpec(name, self.revision_for(name, None))
        return models


def load_config(path: Path | None, *, cwd: Path | None = None) -> ProjectConfig:
    """Read ``path``, or ``kvw.toml`` in ``cwd`` if it exists; otherwise an empty config."""
    cwd = cwd or Path.cwd()
    if path is None:
        candidate = cwd / CONFIG_FILE_NAME
        if not candidate.is_file():
            return ProjectConfig(workdir=cwd / DEFAULT_WORKDIR)
        path = candidate
    elif not path.is_file():
        raise UsageError(f"config file {path} does not exist", hint="check the --config path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KvwError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise KvwError(f"{path}: invalid TOML: {error}") from None
    return _parse(raw, path.resolve())


def _parse(raw: dict[str, Any], source: Path) -> ProjectConfig:
    from kvwctl.options import check_config_value, config_keys

    base = source.parent
    option_keys = config_keys()
    project: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "splits":
            project["splits"] = _parse_splits(value, source)
        elif key in _PROJECT_KEYS:
            if not isinstance(value, str):
                raise KvwError(f"{source}: {key} must be {_PROJECT_KEYS[key]}, got {value!r}")
            project[key] = value
        elif key in option_keys:
            problem = check_config_value(key, value)
            if problem is not None:
                raise KvwError(f"{source}: {key} {problem}")
            values[key] = float(value) if option_keys[key][0] is float else value
        else:
            allowed = ", ".join(sorted([*_PROJECT_KEYS, *option_keys, "splits"]))
            raise KvwError(f"{source}: unknown key {key!r}", hint=f"known keys: {allowed}")
    model = project.get("model")
    if model is not None and (base / model).is_dir():
        # A local checkpoint named relative to the config file.
        project["model"] = str((base / model).resolve())
    project["workdir"] = base / project.get("workdir", DEFAULT_WORKDIR)
    return ProjectConfig(source=source, values=values, **project)


def _parse_splits(value: Any, source: Path) -> dict[str, Path]:
    if not isinstance(value, dict):
        raise KvwError(f"{source}: [splits] must be a table of name = path, got {value!r}")
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


def parse_named_paths(values: list[str], *, flag: str) -> dict[str, Path]:
    """``NAME=FILE`` values of a repeatable flag (``--data``) as an ordered name -> path mapping."""
    paths: dict[str, Path] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise UsageError(
                f"invalid {flag} {value!r}", hint=f"write {flag} NAME=FILE, e.g. {flag} forget=forget.jsonl"
            )
        if name.strip() in paths:
            raise UsageError(f"{flag} names the split {name.strip()!r} twice")
        paths[name.strip()] = Path(path.strip())
    return paths
