"""MLLMU-Bench (Liu et al., 2024): 500 fictitious profiles and 153 real celebrities, as parquet.

    kvwctl data convert mllmu --from MLLMU-Bench --split forget_5 --out data/forget_5.jsonl

The schema is the one of the Hugging Face dataset ``MLLMMU/MLLMU-Bench`` (its card's
``dataset_info``) and of the benchmark's ``eval.py``, which reads it: each row is one profile with
``image`` (``{"bytes", "path"}``; the Test_Set has ``images``, a list, instead), ``ID``,
``question`` and ``answer`` (the profile's fine-tuning pair), ``Classification_Task`` with
``Image_Textual_Questions`` and ``Pure_Text_Questions`` (each ``{Question, Options: {A, B, C, D},
Correct_Answer}``), ``Generation_Task`` and ``Mask_Task`` (each ``[{Question, Ground_Truth,
Type}]``, ``Type`` ``Image_Textual`` or ``Pure_Text``). One row gives these samples (``task``):

* ``qa``: ``question`` → ``answer``, with the image (when the row has both);
* ``mc_image`` / ``mc_text``: a classification question, ``options`` the texts of A–D in that
  order, ``answer`` the text of ``Correct_Answer``; ``option_letters`` and ``correct_letter`` keep
  the letters. ``mc_image`` has the image, ``mc_text`` (Pure_Text_Questions) none;
* ``gen_image`` / ``gen_text``: a generation question, ``answer`` its ``Ground_Truth``;
* ``fill_image`` / ``fill_text``: a Mask_Task question (its blank ``__``), ``answer`` the
  ``Ground_Truth`` that fills it.

``group`` is the profile's ``ID``. For the Test_Set the original script draws one of the row's
images with ``random.choice`` and no seed; here the image is drawn once per row with
``random.Random(f"0:{ID}")`` (fixed, independent of row order) and the other images are written
too (``other_images``).
"""

from __future__ import annotations

import random
from typing import Any

from kvwctl.benchmarks.reading import Row, image_bytes, text_field
from kvwctl.benchmarks.samples import Adapter, Converted, Picture, record, safe_stem
from kvwctl.errors import DataError

SPLITS = ("forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85", "Test_Set", "Retain_Set")
TASKS = ("qa", "mc_image", "mc_text", "gen_image", "gen_text", "fill_image", "fill_text")
LETTERS = ("A", "B", "C", "D")
TYPES = {"Image_Textual": "image", "Pure_Text": "text"}
TEST_IMAGE_SEED = 0


def convert(rows: list[Row], split: str) -> list[Converted]:
    converted: list[Converted] = []
    for row in rows:
        profile = text_field(row, "ID")
        image, others = _images(row, profile, split)
        new = _profile_samples(row, profile, split)
        converted.extend(
            Converted(fields=fields, image=image if with_image else None, other_images=others if with_image else ())
            for fields, with_image in new
        )
    return converted


def _images(row: Row, profile: str, split: str) -> tuple[Picture, tuple[Picture, ...]]:
    stem = f"{split}-{safe_stem(profile)}"
    if row.record.get("images") is not None:
        cells = row.record["images"]
        if not isinstance(cells, list) or not cells:
            raise DataError(f"{row.where}: images: must be a non-empty list of images")
        pictures = [
            Picture(f"{stem}-{number}", image_bytes(cell, row.where, "images")) for number, cell in enumerate(cells, 1)
        ]
        chosen = random.Random(f"{TEST_IMAGE_SEED}:{profile}").randrange(len(pictures))
        return pictures[chosen], tuple(picture for index, picture in enumerate(pictures) if index != chosen)
    return Picture(stem, image_bytes(row.record.get("image"), row.where, "image")), ()


def _profile_samples(row: Row, profile: str, split: str) -> list[tuple[dict[str, Any], bool]]:
    samples: list[tuple[dict[str, Any], bool]] = []

    def add(task: str, index: int, with_image: bool, **fields: Any) -> None:
        samples.append((record("mllmu", split, profile, profile, task, index, **fields), with_image))

    question, answer = row.record.get("question"), row.record.get("answer")
    if isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip():
        add("qa", 1, True, question=question, answer=answer)
    classification = row.record.get("Classification_Task") or {}
    if not isinstance(classification, dict):
        raise DataError(f"{row.where}: Classification_Task: must be a struct of question lists")
    for key, task, with_image in (
        ("Image_Textual_Questions", "mc_image", True),
        ("Pure_Text_Questions", "mc_text", False),
    ):
        for index, item in enumerate(_items(row, f"Classification_Task.{key}", classification.get(key)), 1):
            where = f"{row.where}: Classification_Task.{key}[{index}]"
            options = item.get("Options")
            if not isinstance(options, dict) or set(options) - set(LETTERS) or not options:
                raise DataError(f"{where}: Options: must map letters A-D to option texts")
            letters = [letter for letter in LETTERS if options.get(letter) is not None]
            texts = [_text(options[letter], f"{where}: Options.{letter}") for letter in letters]
            correct = item.get("Correct_Answer")
            if correct not in letters:
                raise DataError(f"{where}: Correct_Answer: {correct!r} is not one of the letters {', '.join(letters)}")
            add(
                task,
                index,
                with_image,
                question=_text(item.get("Question"), f"{where}: Question"),
                answer=texts[letters.index(correct)],
                options=texts,
                option_letters=letters,
                correct_letter=correct,
            )
    for key, prefix in (("Generation_Task", "gen"), ("Mask_Task", "fill")):
        counts = {"image": 0, "text": 0}
        for index, item in enumerate(_items(row, key, row.record.get(key)), 1):
            where = f"{row.where}: {key}[{index}]"
            kind = TYPES.get(str(item.get("Type")))
            if kind is None:
                raise DataError(f"{where}: Type: {item.get('Type')!r} is not Image_Textual or Pure_Text")
            counts[kind] += 1
            add(
                f"{prefix}_{kind}",
                counts[kind],
                kind == "image",
                question=_text(item.get("Question"), f"{where}: Question"),
                answer=_text(item.get("Ground_Truth"), f"{where}: Ground_Truth"),
            )
    return samples


def _items(row: Row, name: str, value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise DataError(f"{row.where}: {name}: must be a list of question structs")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: required, must be a non-empty string (got {value!r})")
    return value


ADAPTER = Adapter(
    name="mllmu",
    title="MLLMU-Bench",
    splits=SPLITS,
    tasks=TASKS,
    source="huggingface.co/datasets/MLLMMU/MLLMU-Bench (card dataset_info) and MLLMU-Bench's eval.py",
    convert=convert,
)
