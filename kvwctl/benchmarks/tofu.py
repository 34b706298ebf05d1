"""TOFU (Maini et al., 2024): 200 fictitious authors, 20 question-answer pairs each, for text models.

    kvwctl data convert tofu --from TOFU --split forget10_perturbed --out data/forget10.jsonl

The schema is the one of the Hugging Face dataset ``locuslab/TOFU`` as open-unlearning reads it
(``configs/data/datasets/TOFU_QA_*.yaml``: ``question``, ``answer``, ``paraphrased_answer``,
``perturbed_answer``; ``configs/eval/tofu.yaml``: ``paraphrased_question`` as the alternative
question key), one JSON object a line (``forget10.json``) or parquet. Each row gives one ``qa``
sample, without image; ``paraphrased_question``, ``paraphrased_answer`` and ``perturbed_answers``
(TOFU's ``perturbed_answer``, a list, or one string) are kept when present: ``eval --protocol
tofu`` scores them for the truth ratio.

TOFU has no author field; its files list each author's 20 questions together, the forget sets
being the last authors of ``full`` (forget01: the last 2, forget05: 10, forget10: 20) and the
retain sets the first. ``group`` is therefore ``author-K`` (0-based in ``full``) for the forget,
retain and full splits, counted from that layout, and the row itself (``row-N``) for the others.
"""

from __future__ import annotations

from kvwctl.benchmarks.reading import Row, text_field
from kvwctl.benchmarks.samples import Adapter, Converted, record
from kvwctl.errors import DataError

AUTHORS = 200
QUESTIONS_PER_AUTHOR = 20
FORGET_AUTHORS = {"01": 2, "05": 10, "10": 20}
SPLITS = (
    *(f"forget{size}" for size in FORGET_AUTHORS),
    *(f"forget{size}_perturbed" for size in FORGET_AUTHORS),
    "retain90",
    "retain95",
    "retain99",
    "retain_perturbed",
    "real_authors",
    "real_authors_perturbed",
    "world_facts",
    "world_facts_perturbed",
    "full",
)
TASKS = ("qa",)


def first_author(split: str) -> int | None:
    """The index in ``full`` of the split's first author, where TOFU's layout gives it; else None."""
    base = split.removesuffix("_perturbed")
    if base.startswith("forget") and base[len("forget") :] in FORGET_AUTHORS:
        return AUTHORS - FORGET_AUTHORS[base[len("forget") :]]
    if base in ("retain90", "retain95", "retain99", "full"):
        return 0
    return None


def convert(rows: list[Row], split: str) -> list[Converted]:
    start = first_author(split)
    converted = []
    for number, row in enumerate(rows, 1):
        group = f"row-{number}" if start is None else f"author-{start + (number - 1) // QUESTIONS_PER_AUTHOR}"
        perturbed = row.record.get("perturbed_answer")
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        if perturbed is not None and not (
            isinstance(perturbed, list)
            and perturbed
            and all(isinstance(item, str) and item.strip() for item in perturbed)
        ):
            raise DataError(f"{row.where}: perturbed_answer: must be a non-empty string or list of them")
        fields = record(
            "tofu",
            split,
            str(number),
            group,
            "qa",
            1,
            question=text_field(row, "question"),
            answer=text_field(row, "answer"),
            paraphrased_question=text_field(row, "paraphrased_question", required=False) or None,
            paraphrased_answer=text_field(row, "paraphrased_answer", required=False) or None,
            perturbed_answers=perturbed,
        )
        converted.append(Converted(fields=fields))
    return converted


ADAPTER = Adapter(
    name="tofu",
    title="TOFU",
    splits=SPLITS,
    tasks=TASKS,
    source="huggingface.co/datasets/locuslab/TOFU as github.com/locuslab/open-unlearning reads it "
    "(configs/data/datasets/TOFU_QA_*.yaml, configs/eval/tofu.yaml)",
    convert=convert,
)
