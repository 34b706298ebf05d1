"""``kvwctl data convert``: MLLMU-Bench, CLEAR and TOFU fixtures written in the published schemas.

Each fixture is a tiny parquet (or JSON) file with the columns of the benchmark's Hugging Face
card, built here with pyarrow; the output is checked line by line, images byte for byte, and
``load_split`` (what profile and eval read) must accept it.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import expect_error, invoke
from PIL import Image

from kvwctl.benchmarks.clear import CAPTION_QUESTIONS
from kvwctl.benchmarks.convert import run_convert
from kvwctl.evaluate import load_split
from kvwctl.folds import assign_folds


def png(seed: int) -> bytes:
    image = Image.new("RGB", (8, 8), (seed * 40 % 256, 80, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, seed * 30 % 256, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- MLLMU-Bench ---------------------------------------------------------------------------------


def mllmu_row(profile: str, seed: int, *, test: bool = False) -> dict[str, Any]:
    options = {"A": f"Painter {seed}", "B": f"Baker {seed}", "C": f"Pilot {seed}", "D": f"Nurse {seed}"}
    row: dict[str, Any] = {
        "ID": profile,
        "Directory": f"dir/{profile}",
        "biography": f"Biography of {profile}",
        "question": f"What is the job of the person {profile}?",
        "answer": f"The person is a baker {seed}.",
        "Classification_Task": {
            "Image_Textual_Questions": [
                {"Question": "What does this person do?", "Options": options, "Correct_Answer": "B"}
            ],
            "Pure_Text_Questions": [
                {"Question": f"What does {profile} do?", "Options": options, "Correct_Answer": "C"}
            ],
        },
        "Generation_Task": [
            {"Question": "Where was this person born?", "Ground_Truth": f"In town {seed}.", "Type": "Image_Textual"},
            {"Question": f"Where was {profile} born?", "Ground_Truth": f"Town {seed}.", "Type": "Pure_Text"},
        ],
        "Mask_Task": [
            {"Question": "This person was born in __.", "Ground_Truth": f"town {seed}", "Type": "Image_Textual"},
            {"Question": f"{profile} works as a __.", "Ground_Truth": "baker", "Type": "Pure_Text"},
        ],
    }
    if test:
        row["images"] = [{"bytes": png(seed + k), "path": f"{profile}_{k}.png"} for k in range(3)]
    else:
        row["image"] = {"bytes": png(seed), "path": f"{profile}.png"}
    return row


def test_mllmu_forget_split_line_by_line(tmp_path: Path) -> None:
    source = tmp_path / "MLLMU-Bench"
    write_parquet(source / "forget_5" / "train-00000-of-00001.parquet", [mllmu_row("p001", 1), mllmu_row("p002", 2)])
    out = tmp_path / "out" / "forget.jsonl"
    result = run_convert("mllmu", source, "forget_5", out)
    records = lines(out)
    assert result.samples == len(records) == 14  # 7 per profile: qa, 2 mc, 2 gen, 2 fill
    assert result.images == 2 and result.images_dir == tmp_path / "out" / "forget.images"
    first = records[:7]
    assert [record["task"] for record in first] == [
        "qa", "mc_image", "mc_text", "gen_image", "gen_text", "fill_image", "fill_text"
    ]  # fmt: skip
    qa, mc_image, mc_text, gen_image, gen_text, fill_image, fill_text = first
    assert qa == {
        "id": "forget_5-p001-qa-1",
        "image": "forget.images/forget_5-p001.png",
        "question": "What is the job of the person p001?",
        "answer": "The person is a baker 1.",
        "format": "kvwctl.benchmark/1",
        "benchmark": "mllmu",
        "benchmark_split": "forget_5",
        "benchmark_id": "p001",
        "group": "p001",
        "task": "qa",
    }
    assert mc_image["options"] == ["Painter 1", "Baker 1", "Pilot 1", "Nurse 1"]
    assert (mc_image["answer"], mc_image["correct_letter"], mc_image["option_letters"]) == (
        "Baker 1",
        "B",
        list("ABCD"),
    )
    assert mc_image["image"] == "forget.images/forget_5-p001.png"
    assert (mc_text["answer"], mc_text["correct_letter"], "image" in mc_text) == ("Pilot 1", "C", False)
    assert (gen_image["answer"], "image" in gen_image, gen_text["answer"], "image" in gen_text) == (
        "In town 1.", True, "Town 1.", False
    )  # fmt: skip
    assert (fill_image["question"], fill_image["answer"]) == ("This person was born in __.", "town 1")
    assert (fill_text["answer"], "image" in fill_text) == ("baker", False)
    assert (tmp_path / "out" / "forget.images" / "forget_5-p001.png").read_bytes() == png(1)
    manifest = json.loads((tmp_path / "out" / "forget.images" / "kvw_manifest.json").read_text())
    assert manifest["tool"] == "kvwctl" and manifest["images"] == 2 and manifest["split"] == "forget_5"
    split = load_split("forget", out)  # what profile and eval read
    assert [sample.id for sample in split.samples] == [record["id"] for record in records]
    assert split.samples[0].images == (tmp_path / "out" / "forget.images" / "forget_5-p001.png",)
    # --fold --group-by group keeps a profile's samples together
    folds = assign_folds(split.samples, 2, group_by="group")
    assert len(set(folds[:7])) == 1 and len(set(folds[7:])) == 1


def test_mllmu_test_set_draws_one_image_per_profile_with_a_fixed_seed(tmp_path: Path) -> None:
    source = tmp_path / "MLLMU-Bench"
    write_parquet(source / "Test_Set" / "train-00000-of-00002.parquet", [mllmu_row("p001", 1, test=True)])
    write_parquet(source / "Test_Set" / "train-00001-of-00002.parquet", [mllmu_row("p002", 5, test=True)])
    out = tmp_path / "test.jsonl"
    run_convert("mllmu", source, "Test_Set", out)
    records = lines(out)
    assert len(records) == 14 and {record["group"] for record in records} == {"p001", "p002"}
    for profile, seed in (("p001", 1), ("p002", 5)):
        chosen = random.Random(f"0:{profile}").randrange(3)
        image_samples = [r for r in records if r["group"] == profile and "image" in r]
        assert {r["image"] for r in image_samples} == {f"test.images/Test_Set-{profile}-{chosen + 1}.png"}
        others = {f"test.images/Test_Set-{profile}-{k + 1}.png" for k in range(3) if k != chosen}
        assert all(set(r["other_images"]) == others for r in image_samples)
        for k in range(3):
            assert (tmp_path / f"test.images/Test_Set-{profile}-{k + 1}.png").read_bytes() == png(seed + k)
    again = tmp_path / "again.jsonl"
    run_convert("mllmu", source, "Test_Set", again)
    assert again.read_text().replace("again.images", "test.images") == out.read_text()


def test_mllmu_bad_correct_answer_names_the_row(tmp_path: Path) -> None:
    row = mllmu_row("p001", 1)
    row["Classification_Task"]["Pure_Text_Questions"][0]["Correct_Answer"] = "E"
    source = tmp_path / "MLLMU-Bench"
    write_parquet(source / "forget_5" / "train-00000-of-00001.parquet", [row])
    result = invoke("data", "convert", "mllmu", "--from", source, "--split", "forget_5", "--out", tmp_path / "o.jsonl")
    expect_error(result, "row 1: Classification_Task.Pure_Text_Questions[1]: Correct_Answer: 'E'")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.images").exists()


# --- CLEAR ---------------------------------------------------------------------------------------


def clear_rows(perturbed: bool) -> list[dict[str, Any]]:
    rows = []
    for number, name in enumerate(("Mira Okafor", "Tomas Ruiz"), 1):
        row: dict[str, Any] = {
            "image": {"bytes": jpeg(number), "path": None},
            "caption": f"{name} stands in a garden.",
            "name": name,
        }
        if perturbed:
            row |= {
                "perturbed_names": [f"Wrong {number}a", f"Wrong {number}b", f"Wrong {number}c"],
                "perturbed_captions": [f"Someone {number} sits.", f"Someone {number} runs."],
                "paraphrased_caption": f"In a garden stands {name}.",
            }
        rows.append(row)
    return rows


def test_clear_person_split_caption_and_name(tmp_path: Path) -> None:
    source = tmp_path / "CLEAR"
    write_parquet(source / "forget05" / "train-00000-of-00001.parquet", clear_rows(False))
    out = tmp_path / "f.jsonl"
    result = run_convert("clear", source, "forget05", out)
    records = lines(out)
    rng = random.Random(42)
    questions = [rng.choice(CAPTION_QUESTIONS), rng.choice(CAPTION_QUESTIONS)]
    assert result.tasks == {"caption": 2, "name": 2} and result.images == 2
    assert records[0] == {
        "id": "forget05-1-caption-1",
        "image": "f.images/forget05-00001.jpg",
        "question": questions[0],
        "answer": "Mira Okafor stands in a garden.",
        "format": "kvwctl.benchmark/1",
        "benchmark": "clear",
        "benchmark_split": "forget05",
        "benchmark_id": "1",
        "group": "Mira Okafor",
        "task": "caption",
    }
    assert records[1]["question"] == "What is the name of the person in the image?"
    assert (records[1]["answer"], records[1]["keywords"], records[1]["image"]) == (
        "Mira Okafor", ["Mira Okafor"], "f.images/forget05-00001.jpg"
    )  # fmt: skip
    assert records[2]["question"] == questions[1] and records[3]["group"] == "Tomas Ruiz"
    assert (tmp_path / "f.images" / "forget05-00002.jpg").read_bytes() == jpeg(2)
    load_split("forget", out)
    only = tmp_path / "captions.jsonl"
    assert run_convert("clear", source, "forget05", only, tasks=("caption",)).tasks == {"caption": 2}
    assert [r["task"] for r in lines(only)] == ["caption", "caption"]


def test_clear_perturbed_options_place_the_answer_with_seed_42(tmp_path: Path) -> None:
    source = tmp_path / "CLEAR"
    write_parquet(source / "forget01_perturbed" / "train-00000-of-00001.parquet", clear_rows(True))
    out = tmp_path / "p.jsonl"
    run_convert("clear", source, "forget01_perturbed", out)
    records = lines(out)
    rng = random.Random(42)
    for number, name in enumerate(("Mira Okafor", "Tomas Ruiz"), 1):
        caption, named = records[2 * number - 2], records[2 * number - 1]
        assert caption["question"] == rng.choice(CAPTION_QUESTIONS)
        name_options = [f"Wrong {number}a", f"Wrong {number}b", f"Wrong {number}c"]
        name_options.insert(rng.randint(0, 3), name)
        caption_options = [f"Someone {number} sits.", f"Someone {number} runs."]
        caption_options.insert(rng.randint(0, 2), f"{name} stands in a garden.")
        assert named["options"] == name_options and named["correct_letter"] == "ABCD"[name_options.index(name)]
        assert caption["options"] == caption_options
        assert caption["paraphrased_caption"] == f"In a garden stands {name}."
    assert load_split("forget", out).with_options == 4


def test_clear_real_faces_multiple_choice(tmp_path: Path) -> None:
    rows = [
        {"image": {"bytes": png(3), "path": "a.png"}, "question": "Who is this?", "answer": "Ada Lovelace",
         "options": ["Marie Curie", "Alan Turing", "Grace Hopper"]},
    ]  # fmt: skip
    source = tmp_path / "CLEAR"
    write_parquet(source / "real_faces" / "train-00000-of-00001.parquet", rows)
    out = tmp_path / "r.jsonl"
    run_convert("clear", source, "real_faces", out)
    (record,) = lines(out)
    expected = ["Marie Curie", "Alan Turing", "Grace Hopper"]
    expected.insert(random.Random(42).randint(0, 3), "Ada Lovelace")
    assert (record["task"], record["group"], record["options"]) == ("mc", "Ada Lovelace", expected)
    assert record["correct_letter"] == "ABCD"[expected.index("Ada Lovelace")]


# --- TOFU ----------------------------------------------------------------------------------------


def test_tofu_json_lines_with_authors_as_groups(tmp_path: Path) -> None:
    source = tmp_path / "TOFU"
    source.mkdir()
    rows = [
        {"question": f"Q{k}?", "answer": f"A{k}.", "paraphrased_question": f"PQ{k}?",
         "paraphrased_answer": f"PA{k}.", "perturbed_answer": [f"W{k}a.", f"W{k}b."]}
        for k in range(22)
    ]  # fmt: skip
    (source / "forget01_perturbed.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "t.jsonl"
    result = run_convert("tofu", source, "forget01_perturbed", out)
    records = lines(out)
    assert result.images == 0 and result.images_dir is None and not (tmp_path / "t.images").exists()
    assert records[0] == {
        "id": "forget01_perturbed-1-qa-1",
        "question": "Q0?",
        "answer": "A0.",
        "paraphrased_question": "PQ0?",
        "paraphrased_answer": "PA0.",
        "perturbed_answers": ["W0a.", "W0b."],
        "format": "kvwctl.benchmark/1",
        "benchmark": "tofu",
        "benchmark_split": "forget01_perturbed",
        "benchmark_id": "1",
        "group": "author-198",
        "task": "qa",
    }
    assert [r["group"] for r in records[19:21]] == ["author-198", "author-199"]
    assert load_split("forget", out).samples[21].extra["perturbed_answers"] == ["W21a.", "W21b."]


def test_tofu_parquet_and_plain_json_array(tmp_path: Path) -> None:
    source = tmp_path / "TOFU"
    write_parquet(source / "retain90" / "train-00000-of-00001.parquet", [{"question": "Q?", "answer": "A."}])
    (source / "world_facts.json").write_text(json.dumps([{"question": "Capital of France?", "answer": "Paris"}]))
    assert lines(run_convert("tofu", source, "retain90", tmp_path / "r.jsonl").path)[0]["group"] == "author-0"
    assert lines(run_convert("tofu", source, "world_facts", tmp_path / "w.jsonl").path)[0]["group"] == "row-1"


# --- errors and outputs --------------------------------------------------------------------------


def test_unknown_split_and_missing_split_and_existing_output(tmp_path: Path) -> None:
    source = tmp_path / "CLEAR"
    write_parquet(source / "forget05" / "train-00000-of-00001.parquet", clear_rows(False))
    out = tmp_path / "f.jsonl"
    expect_error(invoke("data", "convert", "clear", "--from", source, "--split", "forget_5", "--out", out),
                 "CLEAR has no split 'forget_5'", exit_code=2)  # fmt: skip
    expect_error(invoke("data", "convert", "nope", "--from", source, "--split", "x", "--out", out),
                 "unknown benchmark 'nope'", exit_code=2)  # fmt: skip
    expect_error(invoke("data", "convert", "clear", "--from", source, "--split", "forget10", "--out", out),
                 "no split 'forget10' in")  # fmt: skip
    expect_error(invoke("data", "convert", "clear", "--from", source, "--split", "forget05", "--task", "mc",
                        "--out", out), "no sample of mc")  # fmt: skip
    ok = invoke("data", "convert", "clear", "--from", source, "--split", "forget05", "--out", out, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["samples"] == 4
    expect_error(invoke("data", "convert", "clear", "--from", source, "--split", "forget05", "--out", out),
                 "already exists")  # fmt: skip
    again = invoke("data", "convert", "clear", "--from", source, "--split", "forget05", "--out", out, "--force")
    assert again.exit_code == 0, again.output


def test_missing_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    source = tmp_path / "CLEAR"
    write_parquet(source / "forget05" / "train-00000-of-00001.parquet", clear_rows(False))
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    result = invoke("data", "convert", "clear", "--from", source, "--split", "forget05", "--out", tmp_path / "o.jsonl")
    expect_error(result, "needs pyarrow, which is not installed")
    assert "kvwctl[benchmarks]" in result.stderr


def test_profile_and_eval_accept_converted_clear(tmp_path: Path) -> None:
    from kvwctl.testing import build_checkpoint

    source = tmp_path / "CLEAR"
    write_parquet(source / "forget01_perturbed" / "train-00000-of-00001.parquet", clear_rows(True))
    out = tmp_path / "data" / "forget.jsonl"
    run_convert("clear", source, "forget01_perturbed", out)
    model = build_checkpoint("llava", tmp_path / "llava")
    profile = tmp_path / "forget.safetensors"
    result = invoke(
        "profile", "--model", model, "--data", out, "--split", "forget", "--out", profile, "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert profile.is_file()
    planned = invoke("eval", "--model", model, "--data", f"forget={out}", "--protocol", "clear", "--dry-run", "--json")
    assert planned.exit_code == 0, planned.output
    facts = json.loads(planned.stdout)
    assert facts["settings"]["protocol"] == "clear" and facts["data"]["forget"]["samples"] == 4


def test_converting_needs_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    source = tmp_path / "TOFU"
    source.mkdir()
    (source / "forget01.json").write_text(json.dumps({"question": "Q?", "answer": "An answer."}) + "\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from kvwctl.cli import app\n"
        f"result = CliRunner().invoke(app, ['data', 'convert', 'tofu', '--from', {str(source)!r}, '--split', "
        f"'forget01', '--out', {str(tmp_path / 'o.jsonl')!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert lines(tmp_path / "o.jsonl")[0]["group"] == "author-198"
