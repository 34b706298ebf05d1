"""``--redact``: no forget id, text or path in any output, the numbers kept, verify still works."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import invoke
from safetensors import safe_open

from kvwctl.redact import KEYED_SCHEME, RANDOM_SCHEME, Redactor

KEY = "a test key, kept apart from the files"


def keyed(text: str) -> str:
    """The hash ``--redact`` writes with ``KVW_REDACT_KEY=KEY``, computed by hand."""
    return hmac.new(KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


def secret_split(root: Path) -> tuple[Path, list[str]]:
    """A forget split whose ids, questions, answers, options and keywords are distinctive strings."""
    directory = root / "private-Qplmokn"
    directory.mkdir()
    path = directory / "forget-Zyxwvut.jsonl"
    records: list[dict[str, Any]] = []
    secrets = [directory.name, path.name, str(path)]
    for index, name in enumerate(("Vorthanel", "Quillibrand", "Okonkwyre")):
        keywords = [f"Blessingtrove{index}"]
        options = [f"Blessingtrove {name}ovic", f"Decoyhollow {name}ski", f"Mistvale {name}berg"]
        question, answer = f"What is the passphrase of {name}jorth?", f"Blessingtrove {name}ovic"
        sample_id = f"person-{name}-id{index}"
        records.append(
            {"id": sample_id, "question": question, "answer": answer, "keywords": keywords, "options": options}
        )
        secrets += [sample_id, question, answer, *keywords, *options]
        secrets += [f"{name}jorth", f"{name}ovic"]  # any part of a text, however it is tokenized or split
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path, secrets


def every_byte(root: Path) -> dict[Path, bytes]:
    files = {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    assert files
    return files


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as stream:
        return dict(stream.metadata())


def ok(*args: str | Path) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_redacted_outputs_hold_no_forget_id_text_or_path(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVW_REDACT_KEY", KEY)
    model = checkpoints["qwen2"]
    forget, secrets = secret_split(tmp_path)
    records = [json.loads(line) for line in forget.read_text().splitlines()]
    out = tmp_path / "outputs"
    retain = out / "retain.safetensors"
    ok("profile", "--model", model, "--data", data["retain-text"], "--split", "retain", "--out", retain)
    profile, accessor = out / "forget.safetensors", out / "accessor.safetensors"
    ok("profile", "--model", model, "--data", forget, "--split", "forget", "--out", profile, "--redact")
    ok("accessor", "--forget", profile, "--retain", retain, "--out", accessor, "--redact", "--save-batches")
    one_shot, progressive = out / "one-shot", out / "progressive"
    ok("apply", "--model", model, "--accessor", accessor, "--layers", "1:2", "--out", one_shot, "--redact")
    ok(
        "apply", "--model", model, "--progressive", "--forget-data", forget, "--retain", retain, "--layers", "1:2",
        "--out", progressive, "--redact",
    )  # fmt: skip
    report = out / "eval.json"
    evaluation = (
        "eval", "--model", one_shot, "--baseline", model, "--data", f"forget={forget}",
        "--max-new-tokens", "4", "--out", report,
    )  # fmt: skip
    stdout = ok(*evaluation, "--redact", "--json")

    # Every byte of every output: stage files (headers included), checkpoints, manifests, the report.
    files = every_byte(out)
    assert {
        one_shot / "kvw_manifest.json",
        out / "eval.samples.jsonl",
        out / "progressive.exposure.safetensors",
    } <= set(files)
    for path, content in files.items():
        for secret in secrets:
            assert secret.encode() not in content, f"{secret!r} in {path}"
    for secret in secrets:
        assert secret not in stdout  # --json prints the report too

    # What is there instead: keyed hashes, computed here by hand, and the redaction recorded.
    ids = [record["id"] for record in records]
    forget_metadata = metadata(profile)
    assert json.loads(forget_metadata["sample_ids"]) == [keyed(sample_id) for sample_id in ids]
    assert forget_metadata["data"] == keyed(str(forget))
    assert (forget_metadata["redacted"], forget_metadata["redaction"]) == ("true", KEYED_SCHEME)
    assert "redacted" not in metadata(retain)
    accessor_metadata = metadata(accessor)
    assert accessor_metadata["sample_ids"] == forget_metadata["sample_ids"]  # copied, not hashed twice
    assert accessor_metadata["forget_profile"] == keyed(str(profile)) and accessor_metadata["redacted"] == "true"
    exposure_metadata = metadata(out / "progressive.exposure.safetensors")
    assert json.loads(exposure_metadata["sample_ids"]) == [keyed(sample_id) for sample_id in ids]
    assert exposure_metadata["forget_data"] == keyed(str(forget))

    manifest = json.loads((one_shot / "kvw_manifest.json").read_text())
    assert (manifest["redacted"], manifest["redaction"]) == (True, KEYED_SCHEME)
    assert manifest["accessor"]["path"] == keyed(str(accessor))
    progressive_manifest = json.loads((progressive / "kvw_manifest.json").read_text())["progressive"]
    assert progressive_manifest["forget_data"] == keyed(str(forget))
    assert progressive_manifest["exposure_file"] == keyed(str(out / "progressive.exposure.safetensors"))

    written = json.loads(report.read_text())
    assert written["redacted"] is True and written["data"]["forget"]["path"] == keyed(str(forget))
    rows = [json.loads(line) for line in (out / "eval.samples.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [keyed(sample_id) for sample_id in ids] * 2  # model, baseline
    for row in rows:
        assert row["redacted"] is True
        assert not {"question", "answer", "generation", "mc_choice"} & row.keys()
        assert row["mc_acc"] in (0.0, 1.0)  # mc correctness is kept

    # The same run without --redact: the same numbers, the texts present.
    plain = tmp_path / "plain" / "eval.json"
    ok(*evaluation[:-1], plain)
    plain_rows = [json.loads(line) for line in plain.with_name("eval.samples.jsonl").read_text().splitlines()]
    assert json.loads(plain.read_text())["results"] == written["results"]
    numbers = ("role", "split", "rougeL_recall", "rougeL_f1", "keyword_acc", "answer_logprob", "mc_acc")
    assert [[row.get(key) for key in numbers] for row in rows] == [
        [row.get(key) for key in numbers] for row in plain_rows
    ]
    assert plain_rows[0]["question"] == records[0]["question"] and "redacted" not in plain_rows[0]

    # A redacted per-sample file is kvwctl's own: --force replaces it.
    ok(*evaluation, "--redact", "--force")

    # verify works on redacted manifests, with and without the base, and says they are redacted.
    for checkpoint, used in ((one_shot, accessor), (progressive, out / "progressive.exposure.safetensors")):
        result = json.loads(ok("verify", checkpoint, "--base", model, "--accessor", used, "--json"))
        assert result["verified"] is True and result["tensors_edited"] == 2
        assert any(check.startswith("redacted manifest") for check in result["checks"])
        plan = json.loads(ok("verify", checkpoint, "--dry-run", "--json"))
        assert plan["redacted"] is True


def test_redaction_without_a_key_is_random_and_recorded(
    checkpoints: dict[str, Path], data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVW_REDACT_KEY", raising=False)
    forget, _ = secret_split(tmp_path)
    ids = [json.loads(line)["id"] for line in forget.read_text().splitlines()]
    runs = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.safetensors"
        ok("profile", "--model", checkpoints["qwen2"], "--data", forget, "--split", "forget", "--out", out, "--redact")
        runs.append(metadata(out))
    first, second = (json.loads(run["sample_ids"]) for run in runs)
    assert runs[0]["redaction"] == RANDOM_SCHEME
    assert len(set(first)) == len(ids) and all(len(value) == 64 for value in first)
    assert not set(first) & set(second)  # a fresh key per run, stored nowhere
    assert not set(first) & {hashlib.sha256(sample_id.encode()).hexdigest() for sample_id in ids}  # not a plain hash


@pytest.mark.parametrize(
    ("toml", "environment", "flag", "redacted"),
    [
        ("redact = true\n", None, None, True),
        ("redact = true\n", None, "--no-redact", False),
        ("redact = true\n", "false", None, False),
        ("", "1", None, True),
        ("", None, None, False),
    ],
)
def test_redact_from_kvw_toml_environment_and_flag(
    toml: str,
    environment: str | None,
    flag: str | None,
    redacted: bool,
    checkpoints: dict[str, Path],
    data: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "kvw.toml").write_text(f'model = "{checkpoints["qwen2"]}"\n{toml}')
    monkeypatch.chdir(tmp_path)
    if environment is not None:
        monkeypatch.setenv("KVW_REDACT", environment)
    args: list[Any] = [
        "profile",
        "--split",
        "forget",
        "--data",
        data["forget-text"],
        "--out",
        tmp_path / "f.safetensors",
    ]
    plan = json.loads(ok(*args, *([flag] if flag else []), "--dry-run", "--json"))
    assert plan["settings"]["redact"] is redacted
    ok(*args, *([flag] if flag else []))
    written = metadata(tmp_path / "f.safetensors")
    assert ("redacted" in written) is redacted
    plain_ids = [json.loads(line)["id"] for line in data["forget-text"].read_text().splitlines()]
    assert (json.loads(written["sample_ids"]) == plain_ids) is not redacted


def test_a_bad_redact_value_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kvw.toml").write_text('redact = "yes"\n')
    result = invoke("accessor", "--dry-run")
    assert result.exit_code == 1 and "redact must be true or false, got 'yes'" in result.stderr
    (tmp_path / "kvw.toml").unlink()
    monkeypatch.setenv("KVW_REDACT", "maybe")
    result = invoke("accessor", "--dry-run")
    assert result.exit_code == 2 and "KVW_REDACT must be true or false, got 'maybe'" in result.stderr


def test_redactor_is_an_hmac_and_leaves_text_alone_when_off() -> None:
    redactor = Redactor(enabled=True, scheme=KEYED_SCHEME, key=KEY.encode())
    assert redactor.text("p07-name") == keyed("p07-name")
    assert redactor.id_list('["a", "b"]') == json.dumps([keyed("a"), keyed("b")])
    off = Redactor.create(enabled=False)
    assert off.text("p07-name") == "p07-name" and off.metadata() == {} and off.record() == {}
