"""Stage options: one declaration per default, one precedence rule, one check per value."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from kvwctl.config import ProjectConfig, load_config
from kvwctl.errors import KvwError, UsageError
from kvwctl.options import (
    STAGE_OPTIONS,
    AccessorOptions,
    ApplyOptions,
    EvalOptions,
    ProfileOptions,
    config_keys,
    fill,
    help_text,
)


def project_with(tmp_path: Path, text: str) -> ProjectConfig:
    path = tmp_path / "kvw.toml"
    path.write_text(text)
    return load_config(path)


def test_defaults_are_declared_once_on_the_options() -> None:
    assert ProfileOptions(split="retain").batch_size == 8
    assert AccessorOptions().batch_size == 1
    assert ApplyOptions().gamma == 0.02 and ApplyOptions().layers == ":"
    assert EvalOptions().max_new_tokens == 32 and EvalOptions().require == ()
    for cls in STAGE_OPTIONS:
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_precedence_flag_then_environment_then_kvw_toml_then_default(tmp_path: Path) -> None:
    project = project_with(tmp_path, "gamma = 0.5\nforget_batch_size = 3\n")
    environment = {"KVW_GAMMA": "0.25"}
    assert fill(ApplyOptions, {}, None, environment={}).gamma == 0.02  # default
    assert fill(ApplyOptions, {}, project, environment={}).gamma == 0.5  # kvw.toml
    assert fill(ApplyOptions, {}, project, environment=environment).gamma == 0.25  # environment
    assert fill(ApplyOptions, {"gamma": 1.5}, project, environment=environment).gamma == 1.5  # flag
    # None means "flag not given"; a key shared by two stages fills both.
    assert fill(ApplyOptions, {"gamma": None}, project, environment={}).gamma == 0.5
    assert fill(AccessorOptions, {}, project, environment={}).batch_size == 3
    assert fill(ApplyOptions, {}, project, environment={}).batch_size == 3


def test_environment_values_are_converted_to_the_field_type() -> None:
    options = fill(EvalOptions, {}, None, environment={"KVW_BATCH_SIZE": "4", "KVW_DEVICE": "cpu"})
    assert options.batch_size == 4 and options.device == "cpu"


@pytest.mark.parametrize(
    ("cls", "flags", "message"),
    [
        (ProfileOptions, {"split": "forgett"}, "--split must be one of retain, forget, got 'forgett'"),
        (ProfileOptions, {"split": "retain", "batch_size": 0}, "--batch-size must be at least 1, got 0"),
        (ProfileOptions, {"split": "retain", "positions": "every"}, "--positions must be one of answer"),
        (ProfileOptions, {"split": "retain", "device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N"),
        (ApplyOptions, {"gamma": -1.0}, "--gamma must be at least 0, got -1.0"),
        (ApplyOptions, {"gamma": float("inf")}, "--gamma must be a finite number"),
        (ApplyOptions, {"gamma": float("nan")}, "--gamma must be a finite number"),
        (ApplyOptions, {"layers": "3:1"}, "--layers invalid layer range '3:1': start 3 is after end 1"),
        (ApplyOptions, {"layers": "a:b"}, "--layers invalid layer selection 'a:b'"),
        (EvalOptions, {"require": ("forget.keyword_acc <=",)}, "invalid --require"),
        (ProfileOptions, {}, "missing --split"),
    ],
)
def test_bad_flag_values_are_usage_errors(cls: type, flags: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        fill(cls, flags, None, environment={})
    assert message in raised.value.message
    assert raised.value.exit_code == 2


def test_bad_environment_value_is_a_usage_error_naming_the_variable() -> None:
    with pytest.raises(UsageError, match="KVW_BATCH_SIZE must be an integer, got 'many'"):
        fill(EvalOptions, {}, None, environment={"KVW_BATCH_SIZE": "many"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_size = 0\n", "batch_size must be at least 1, got 0"),
        ('gamma = "x"\n', "gamma must be a number, got 'x'"),
        ("gamma = inf\n", "gamma must be a finite number, got inf"),
        ("batch_size = true\n", "batch_size must be an integer, got True"),
        ('positions = "every"\n', "positions must be one of answer, answer-tokens, all, got 'every'"),
        ('layers = "3:1"\n', "layers invalid layer range '3:1': start 3 is after end 1"),
        ('splits = "x"\n', "[splits] must be a table of name = path, got 'x'"),
    ],
)
def test_bad_kvw_toml_values_are_input_errors_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KvwError) as raised:
        project_with(tmp_path, text)
    assert not isinstance(raised.value, UsageError) and raised.value.exit_code == 1
    assert raised.value.message == f"{(tmp_path / 'kvw.toml').resolve()}: {message}"


def test_every_kvw_toml_key_has_one_type() -> None:
    keys = config_keys()
    assert set(keys) == {"positions", "batch_size", "device", "dtype", "forget_batch_size", "gamma", "layers"} | {
        "max_new_tokens",
        "redact",
    } | {"folds", "group_by"} | {"device_map", "max_memory", "offload_folder", "vision_cache"} | {
        f"tune_{name}"
        for name in ("gamma", "mean_gate", "layers", "forget_batch_size", "positions", "trials", "generate_top")
    }
    for key, (kind, _) in keys.items():  # a key read by several stages has the same type in each
        for cls in STAGE_OPTIONS:
            for item in dataclasses.fields(cls):
                if item.metadata.get("key") == key:
                    assert typing.get_type_hints(cls)[item.name] == kind, (key, cls.__name__)


def test_help_texts_show_the_declared_defaults() -> None:
    assert help_text(ProfileOptions, "batch_size") == "Samples per forward pass [default: 8; kvw.toml: batch_size]"
    assert help_text(ApplyOptions, "gamma") == "Weakening strength [default: 0.02; kvw.toml: gamma]"
    assert help_text(AccessorOptions, "batch_size").endswith("[default: 1, as the paper; kvw.toml: forget_batch_size]")
    assert help_text(AccessorOptions, "save_batches") == "Also store every batch's A_b."
