"""The bundled example's data: reproducible from its seeded script, valid, and split as documented."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from kvwctl.data import load_samples

DATA = Path(__file__).resolve().parent.parent / "examples" / "people" / "data"
SCRIPT = DATA.parent / "make_data.py"


@pytest.fixture(scope="module")
def make_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_is_what_the_seeded_script_writes(make_data: ModuleType, tmp_path: Path) -> None:
    make_data.main(tmp_path)
    written = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    committed = sorted(
        path.relative_to(DATA) for path in DATA.rglob("*") if path.is_file() and path.name != "world.jsonl"
    )
    assert written == committed
    for relative in written:
        assert (tmp_path / relative).read_bytes() == (DATA / relative).read_bytes(), relative


def test_splits_are_valid_and_separate_the_people() -> None:
    people = [json.loads(line) for line in (DATA / "people.jsonl").open()]
    forget_people = {person["person"] for person in people if person["forget"]}
    assert len(people) == 40 and len(forget_people) == 4
    assert len({person["name"] for person in people}) == 40
    splits = {name: load_samples(DATA / f"{name}.jsonl") for name in ("forget", "retain", "test", "test_retain")}
    assert {sample.extra["person"] for sample in splits["forget"]} == forget_people
    assert {sample.extra["person"] for sample in splits["test"]} == forget_people
    assert not {sample.extra["person"] for sample in splits["retain"]} & forget_people
    assert len(splits["forget"]) == 4 * 7 and len(splits["retain"]) == 36 * 7
    # The held-out renderings are other image files than the ones fine-tuned on.
    trained = {path for name in ("forget", "retain") for sample in splits[name] for path in sample.images}
    held_out = {path for name in ("test", "test_retain") for sample in splits[name] for path in sample.images}
    assert held_out and not trained & held_out
    for samples in splits.values():
        for sample in samples:
            assert not sample.options or sample.answer in sample.options


def test_portraits_differ_between_people_and_renderings() -> None:
    from PIL import Image

    people = [json.loads(line) for line in (DATA / "people.jsonl").open()]
    looks = {tuple(person["look"].values()) for person in people}
    assert len(looks) == 40
    pixels = {
        (person["person"], rendering): Image.open(DATA / "images" / f"{person['person']}-{rendering}.png").tobytes()
        for person in people
        for rendering in ("train", "test")
    }
    assert len(set(pixels.values())) == 80
