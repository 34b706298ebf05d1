"""kvwctl verify: a fresh apply verifies; every tampering exits 1 naming what was tampered with."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import split_for
from typer.testing import CliRunner, Result

import kvwctl.checkpoint
from kvwctl.accessor import run_accessor
from kvwctl.apply import recorded_path, run_apply
from kvwctl.checkpoint import MANIFEST_FILE, copy_patched_shard, open_checkpoint
from kvwctl.cli import app
from kvwctl.files import file_sha256
from kvwctl.headers import read_safetensors_header
from kvwctl.options import AccessorOptions, ApplyOptions, ProfileOptions
from kvwctl.profile import run_profile
from kvwctl.progressive import run_progressive
from kvwctl.source import ModelSource, ModelSpec

runner = CliRunner()
MODEL = "llava"
GAMMA, LAYERS = 0.8, "1:2"


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, ["verify", *(str(arg) for arg in args)])


def accessor_for(model: Path, data: dict[str, Path], root: Path, *, batch_size: int = 1) -> dict[str, Path]:
    retain = run_profile(
        ModelSpec(str(model)), split_for(MODEL, data, "retain"), root / "r.safetensors", ProfileOptions(split="retain")
    ).path
    forget = run_profile(
        ModelSpec(str(model)), split_for(MODEL, data, "forget"), root / "f.safetensors", ProfileOptions(split="forget")
    ).path
    accessor = run_accessor(forget, retain, root / "a.safetensors", AccessorOptions(batch_size=batch_size)).path
    return {"retain": retain, "forget": forget, "accessor": accessor}


@pytest.fixture(scope="module")
def runs(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A one-shot and a progressive output of the tiny LLaVA, with what made them."""
    root = tmp_path_factory.mktemp("verify")
    base = checkpoints[MODEL]
    files = accessor_for(base, data, root)
    other = run_accessor(files["forget"], files["retain"], root / "a2.safetensors", AccessorOptions(batch_size=2))
    options = ApplyOptions(gamma=GAMMA, layers=LAYERS)
    one_shot = run_apply(ModelSpec(str(base)), files["accessor"], root / "one-shot", options).path
    progressive = run_progressive(
        ModelSpec(str(base)), split_for(MODEL, data, "forget"), files["retain"], root / "progressive", options
    ).path
    return {
        **files,
        "base": base,
        "other_accessor": other.path,
        "one_shot": one_shot,
        "progressive": progressive,
        "exposure": root / "progressive.exposure.safetensors",
    }


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def manifest_of(checkpoint: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((checkpoint / MANIFEST_FILE).read_text())
    return manifest


def write_manifest(checkpoint: Path, manifest: dict[str, Any]) -> None:
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def forge_manifest(checkpoint: Path) -> None:
    """Rewrite the manifest's hashes to fit the files, as someone covering their tracks would."""
    manifest = manifest_of(checkpoint)
    manifest["shards"] = {shard: file_sha256(checkpoint / shard) for shard in manifest["shards"]}
    manifest["output_fingerprint"] = open_checkpoint(ModelSource(checkpoint, str(checkpoint), None)).fingerprint()
    write_manifest(checkpoint, manifest)


def flip_byte(checkpoint: Path, tensor: str) -> str:
    """Flip one byte in the middle of ``tensor``; returns its shard."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = str(index["weight_map"][tensor])
    data_start, header = read_safetensors_header(checkpoint / shard)
    begin, end = header[tensor]["data_offsets"]
    with (checkpoint / shard).open("r+b") as stream:
        stream.seek(data_start + (begin + end) // 2)
        value = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([value[0] ^ 0x10]))
    return shard


def down_projection(checkpoint: Path, layer: int) -> str:
    return open_checkpoint(ModelSource(checkpoint, str(checkpoint), None)).down_projections[layer].name


def assert_fails(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    before, found, _ = result.stderr.partition("Error: ")
    assert found and all(" shards (" in line for line in before.splitlines()), result.stderr  # progress lines only
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# --- what the manifest records -------------------------------------------------------------------


def test_manifest_records_what_verification_needs(runs: dict[str, Path]) -> None:
    manifest = manifest_of(runs["one_shot"])
    assert manifest["format"] == "kvwctl.manifest/1"
    assert manifest["input_shards"] == {shard: file_sha256(runs["base"] / shard) for shard in manifest["shards"]}
    assert manifest["shards"] == {shard: file_sha256(runs["one_shot"] / shard) for shard in manifest["shards"]}
    assert set(manifest["versions"]) == {"kvwctl", "torch", "transformers", "safetensors"}
    assert manifest["device"] == "cpu"
    progressive = manifest_of(runs["progressive"])["progressive"]
    assert progressive["exposure_sha256"] == file_sha256(runs["exposure"])


def test_recorded_paths_are_relative_to_the_manifest_when_under_it(tmp_path: Path) -> None:
    out = tmp_path / "unlearned"
    assert recorded_path(out / "sub" / "exposure.safetensors", out) == "sub/exposure.safetensors"
    assert recorded_path(Path("elsewhere/accessor.safetensors"), out) == "elsewhere/accessor.safetensors"


def test_patched_copy_hashes_both_sides_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvwctl.checkpoint, "COPY_BLOCK_SIZE", 7)  # patches straddle block boundaries
    source, target = tmp_path / "in", tmp_path / "out"
    source.write_bytes(bytes(range(50)))
    copied = copy_patched_shard(source, target, {(5, 16): b"A" * 11, (30, 31): b"B"})
    expected = bytes(range(5)) + b"A" * 11 + bytes(range(16, 30)) + b"B" + bytes(range(31, 50))
    assert target.read_bytes() == expected
    assert copied.input_sha256 == hashlib.sha256(bytes(range(50))).hexdigest()
    assert copied.output_sha256 == hashlib.sha256(expected).hexdigest()


# --- fresh outputs verify ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["one_shot", "progressive"])
def test_a_fresh_apply_verifies(mode: str, runs: dict[str, Path]) -> None:
    checkpoint = runs[mode]
    plain = invoke(checkpoint)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip() == str(checkpoint)
    accessor = runs["accessor"] if mode == "one_shot" else runs["exposure"]
    full = invoke(checkpoint, "--base", runs["base"], "--accessor", accessor, "--json")
    assert full.exit_code == 0, full.output
    summary = json.loads(full.stdout)
    tensors = len(json.loads((runs["base"] / "model.safetensors.index.json").read_text())["weight_map"])
    assert summary["verified"] is True and summary["mode"] == mode.replace("_", "-")
    assert summary["tensors_compared"] == tensors and summary["tensors_edited"] == 2
    assert summary["files_compared"] > 0 and summary["previous_manifests"] == 0


def test_a_chain_of_two_applies_verifies_and_a_broken_link_is_named(
    runs: dict[str, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    first = runs["one_shot"]
    files = accessor_for(first, data, tmp_path)
    second = run_apply(ModelSpec(str(first)), files["accessor"], tmp_path / "second", ApplyOptions(gamma=0.5)).path
    result = invoke(second, "--base", first, "--accessor", files["accessor"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["previous_manifests"] == 1

    manifest = manifest_of(second)
    shard = next(iter(manifest["previous_manifest"]["shards"]))
    manifest["previous_manifest"]["shards"][shard] = "0" * 64
    write_manifest(second, manifest)
    assert_fails(invoke(second), "previous_manifest (1 back)", "input of the run after it")
    del manifest["previous_manifest"]["output_fingerprint"]
    write_manifest(second, manifest)
    assert_fails(invoke(second), "previous_manifest (1 back): output_fingerprint is missing")


# --- tampering is found --------------------------------------------------------------------------


def test_a_flipped_byte_in_an_untouched_tensor(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    tensor = down_projection(checkpoint, 0)  # layer 0 is not edited (layers 1:2)
    shard = flip_byte(checkpoint, tensor)
    assert_fails(invoke(checkpoint), f"shard {shard}: sha256", f"{MANIFEST_FILE} says")
    forge_manifest(checkpoint)
    assert invoke(checkpoint).exit_code == 0  # without a base, a forged manifest cannot be told
    result = invoke(checkpoint, "--base", runs["base"], "--accessor", runs["accessor"])
    assert_fails(result, f"tensor {tensor} in {shard}: untouched: not the base's; element")


def test_a_flipped_byte_in_an_untouched_vision_tensor(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    tensor = next(name for name in index["weight_map"] if "vision" in name and name.endswith("weight"))
    flip_byte(checkpoint, tensor)
    forge_manifest(checkpoint)
    result = invoke(checkpoint, "--base", runs["base"], "--accessor", runs["accessor"])
    assert_fails(result, f"tensor {tensor}", "untouched: not the base's")


def test_a_flipped_byte_in_an_edited_tensor(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["progressive"], tmp_path)
    tensor = down_projection(checkpoint, 2)
    flip_byte(checkpoint, tensor)
    forge_manifest(checkpoint)
    result = invoke(checkpoint, "--base", runs["base"], "--accessor", runs["exposure"])
    assert_fails(result, f"tensor {tensor}", "edited (layer 2): not W * exp(-gamma * E) with gamma 0.8; element")


def test_a_deleted_shard(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    shard = sorted(manifest_of(checkpoint)["shards"])[1]
    (checkpoint / shard).unlink()
    assert_fails(invoke(checkpoint), f"shard {shard}: missing; {MANIFEST_FILE} lists it")


def test_an_extra_weight_file(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    (checkpoint / "pytorch_model.bin").write_bytes(b"unedited weights")
    assert_fails(invoke(checkpoint), f"pytorch_model.bin: a weight file that {MANIFEST_FILE} does not list")


def test_an_edited_gamma(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    manifest = manifest_of(checkpoint)
    manifest["gamma"] = 0.9
    write_manifest(checkpoint, manifest)
    result = invoke(checkpoint, "--base", runs["base"], "--accessor", runs["accessor"])
    assert_fails(result, f"tensor {down_projection(checkpoint, 1)}", "edited (layer 1)", "with gamma 0.9")
    manifest["gamma"] = "0.8"
    write_manifest(checkpoint, manifest)
    assert_fails(invoke(checkpoint), "gamma '0.8' is not a finite number")


def test_edited_gate_statistics(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    manifest = manifest_of(checkpoint)
    manifest["per_layer"]["2"]["min_gate"] = 1.0
    write_manifest(checkpoint, manifest)
    result = invoke(checkpoint, "--base", runs["base"], "--accessor", runs["accessor"])
    assert_fails(result, "per_layer.2.min_gate is 1.0; recomputed")


def test_a_different_accessor(runs: dict[str, Path]) -> None:
    result = invoke(runs["one_shot"], "--base", runs["base"], "--accessor", runs["other_accessor"])
    assert_fails(result, f"accessor {runs['other_accessor']}: sha256", "accessor.sha256 says")
    result = invoke(runs["progressive"], "--base", runs["base"], "--accessor", runs["accessor"])
    assert_fails(result, f"accessor {runs['accessor']}: sha256", "progressive.exposure_sha256 says")


def test_a_wrong_base(runs: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    result = invoke(runs["one_shot"], "--base", checkpoints["qwen2"], "--accessor", runs["accessor"])
    assert_fails(result, f"base {checkpoints['qwen2']}: fingerprint", "input_model.fingerprint says")
    result = invoke(runs["one_shot"], "--base", runs["progressive"], "--accessor", runs["accessor"])
    assert_fails(result, f"base {runs['progressive']}: fingerprint")


def test_a_changed_carried_over_file(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    (checkpoint / "chat_template.jinja").write_text("{{ messages }}")
    assert invoke(checkpoint).exit_code == 0  # the manifest hashes weights only
    result = invoke(checkpoint, "--base", runs["base"], "--accessor", runs["accessor"])
    assert_fails(result, "file chat_template.jinja: differs from the base's")


def test_a_missing_or_malformed_manifest(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    (checkpoint / MANIFEST_FILE).write_text("{not json")
    assert_fails(invoke(checkpoint), f"{MANIFEST_FILE} is not valid JSON")
    (checkpoint / MANIFEST_FILE).unlink()
    result = invoke(checkpoint)
    assert_fails(
        result, f"{checkpoint} has no {MANIFEST_FILE}", "Hint: verify checks checkpoints written by kvwctl apply"
    )
    assert_fails(invoke(tmp_path / "absent"), "is not a directory")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"].update({"../x.safetensors": "0" * 64}), "shards: '../x.safetensors'"),
        (lambda m: m.update(previous_manifest="x"), "previous_manifest is neither an object nor null"),
        (lambda m: m["per_layer"].update({"1": 5}), "per_layer holds an entry that is not an object"),
        (lambda m: m.update(layers=[1]), "per_layer has layers ['1', '2']; layers says [1]"),
        (lambda m: m.pop("accessor"), "mode one-shot but no accessor object"),
        (lambda m: m.update(format="kvwctl.manifest/2"), "expected kvwctl.manifest/1"),
    ],
)
def test_a_malformed_manifest_names_the_key(
    edit: Callable[[dict[str, Any]], object], message: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = copy_of(runs["one_shot"], tmp_path)
    manifest = manifest_of(checkpoint)
    edit(manifest)
    write_manifest(checkpoint, manifest)
    assert_fails(invoke(checkpoint), f"{MANIFEST_FILE}: ", message, "Hint: the manifest is not one kvwctl apply wrote")


def test_base_and_accessor_go_together(runs: dict[str, Path]) -> None:
    for args in (("--base", runs["base"]), ("--accessor", runs["accessor"]), ("--revision", "main")):
        result = invoke(runs["one_shot"], *args)
        assert result.exit_code == 2, result.output
        assert "--base and --accessor go together" in result.stderr
    result = invoke(runs["one_shot"], "--device", "tpu")
    assert result.exit_code == 2 and "--device must be" in result.stderr
