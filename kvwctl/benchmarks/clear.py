"""CLEAR (Dontsov et al., 2024): 200 fictitious persons with faces, captions and names, as parquet.

    kvwctl data convert clear --from CLEAR --split forget05 --out data/forget05.jsonl

The schema is the one of the Hugging Face dataset ``therem/CLEAR`` (its card's ``dataset_info``)
and of the scripts that read it (the KVW authors' ``CLEAR/eval.py`` and
``CLEAR/data_process/CLEAR_process.py``):

* ``forget01/05/10``, ``retain90/95/99``: ``image``, ``caption``, ``name``. Each row gives a
  ``caption`` sample (the question one of ``CAPTION_QUESTIONS``, the answer the caption, as
  CLEAR_process.py's caption mode, which KVW profiles) and a ``name`` sample ("What is the name
  of the person in the image?", the name, ``keywords`` the name: the name-recognition VQA);
* ``forget01/05/10_perturbed``, ``retain_perturbed``: the same plus ``perturbed_names`` (and
  ``perturbed_captions``, ``paraphrased_caption``): the ``name`` sample's ``options`` are the name
  inserted among the perturbed names, the ``caption`` sample's the caption among the perturbed
  captions (``paraphrased_caption`` is kept);
* ``real_faces``, ``real_world``: ``image``, ``question``, ``answer``, ``options`` (the wrong
  answers): one ``mc`` sample, ``options`` the answer inserted among them.

The original scripts draw with Python's ``random`` after ``random.seed(42)``: the caption question
(``random.choice``) and where the answer goes among the options (``random.randint(0, len)``).
Here each split draws from its own ``random.Random(42)``, row after row (per row: the caption
question, then the name's place, then the caption's), so the conversion is the same every time;
the draws are not those of one run of the original scripts, whose order depends on what they ran. ``option_letters`` and ``correct_letter`` record the letters
the protocol's prompt gives the options. ``group`` is the person's name (real_faces: the answer;
real_world: the row).
"""

from __future__ import annotations

import random
from typing import Any

from kvwctl.benchmarks.reading import Row, image_bytes, text_field, text_list
from kvwctl.benchmarks.samples import Adapter, Converted, Picture, record

PERSON_SPLITS = ("forget01", "forget05", "forget10", "retain90", "retain95", "retain99")
PERTURBED_SPLITS = ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")
REAL_SPLITS = ("real_faces", "real_world")
SPLITS = PERSON_SPLITS + PERTURBED_SPLITS + REAL_SPLITS
TASKS = ("caption", "name", "mc")
SEED = 42
NAME_QUESTION = "What is the name of the person in the image?"
CAPTION_QUESTIONS = (  # CLEAR_process.py's IMAGE_CAPTION_QUESTIONS, in its order
    "What can you see in this picture?",
    "Tell me about the content of this image",
    "Can you give a description of the image?",
    "What is depicted in the image?",
    "Explain what you observe in the picture.",
    "Describe the image in detail.",
    "What is the main subject of this image?",
    "Can you describe the scene or objects in the image?",
    "What is happening in this image?",
)


def letters(count: int) -> list[str]:
    return [chr(ord("A") + index) for index in range(count)]


def insert_answer(rng: random.Random, wrong: list[str], answer: str) -> list[str]:
    """``answer`` inserted among ``wrong`` at ``rng.randint(0, len(wrong))``, as CLEAR's eval.py does."""
    options = [option for option in wrong if option != answer]
    options.insert(rng.randint(0, len(options)), answer)
    return options


def _choice_fields(options: list[str], answer: str) -> dict[str, Any]:
    names = letters(len(options))
    return {"options": options, "option_letters": names, "correct_letter": names[options.index(answer)]}


def convert(rows: list[Row], split: str) -> list[Converted]:
    rng = random.Random(SEED)
    converted: list[Converted] = []
    for number, row in enumerate(rows, 1):
        row_id = str(number)
        picture = Picture(f"{split}-{number:05d}", image_bytes(row.record.get("image"), row.where, "image"))
        if split in REAL_SPLITS:
            answer = text_field(row, "answer")
            options = insert_answer(rng, text_list(row, "options"), answer)
            group = answer if split == "real_faces" else f"row-{number}"
            fields = record("clear", split, row_id, group, "mc", 1, question=text_field(row, "question"), answer=answer)
            converted.append(Converted(fields={**fields, **_choice_fields(options, answer)}, image=picture))
            continue
        name, caption = text_field(row, "name"), text_field(row, "caption")
        caption_question = rng.choice(CAPTION_QUESTIONS)
        caption_extra: dict[str, Any] = {}
        name_extra: dict[str, Any] = {"keywords": [name]}
        if split in PERTURBED_SPLITS:
            name_extra |= _choice_fields(insert_answer(rng, text_list(row, "perturbed_names"), name), name)
            perturbed_captions = text_list(row, "perturbed_captions", required=False)
            if perturbed_captions:
                caption_extra |= _choice_fields(insert_answer(rng, perturbed_captions, caption), caption)
            paraphrased = text_field(row, "paraphrased_caption", required=False)
            caption_extra |= {"paraphrased_caption": paraphrased} if paraphrased else {}
        caption_fields = record("clear", split, row_id, name, "caption", 1, question=caption_question, answer=caption)
        name_fields = record("clear", split, row_id, name, "name", 1, question=NAME_QUESTION, answer=name)
        converted.append(Converted(fields={**caption_fields, **caption_extra}, image=picture))
        converted.append(Converted(fields={**name_fields, **name_extra}, image=picture))
    return converted


ADAPTER = Adapter(
    name="clear",
    title="CLEAR",
    splits=SPLITS,
    tasks=TASKS,
    source="huggingface.co/datasets/therem/CLEAR (card dataset_info) and github.com/kyj93790/KVW CLEAR/eval.py, "
    "CLEAR/data_process/CLEAR_process.py",
    convert=convert,
)
