"""What a benchmark adapter produces: kvwctl samples (DESIGN §4) plus the images to write.

Every converted record holds the sample fields ``data.load_samples`` reads (``id``, ``question``,
``answer`` and, where they apply, ``image``, ``keywords``, ``options``) and these, kept as unknown
fields by kvwctl and read by ``eval --protocol``:

* ``format``: ``kvwctl.benchmark/1``; ``benchmark``, ``benchmark_split``: where it came from;
* ``benchmark_id``: the benchmark's own id of the row (MLLMU ``ID``; CLEAR and TOFU have none,
  so the 1-based row number in the split);
* ``group``: the person or profile the sample is about (``eval --fold --group-by group``);
* ``task``: the task kind (each adapter's ``TASKS``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

FORMAT = "kvwctl.benchmark/1"


@dataclass(frozen=True)
class Picture:
    """An image to write next to the JSON Lines file, as ``<stem>.<its format's suffix>``."""

    stem: str
    data: bytes


@dataclass(frozen=True)
class Converted:
    fields: dict[str, Any]  # the record without its image paths
    image: Picture | None = None
    other_images: tuple[Picture, ...] = ()  # MLLMU's Test_Set: the row's other images ("other_images")


def safe_stem(text: str) -> str:
    """``text`` as a file-name part: runs of anything but letters, digits, ``_`` and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def record(
    benchmark: str,
    split: str,
    benchmark_id: str,
    group: str,
    task: str,
    index: int,
    *,
    question: str,
    answer: str,
    **extra: Any,
) -> dict[str, Any]:
    """A converted record: the id is ``<split>-<benchmark id>-<task>-<index>`` (1-based index per row and task)."""
    return {
        "id": f"{split}-{safe_stem(benchmark_id)}-{task}-{index}",
        "question": question,
        "answer": answer,
        **{key: value for key, value in extra.items() if value not in (None, [], ())},
        "format": FORMAT,
        "benchmark": benchmark,
        "benchmark_split": split,
        "benchmark_id": benchmark_id,
        "group": group,
        "task": task,
    }


@dataclass(frozen=True)
class Adapter:
    """One benchmark: its splits, task kinds, and the function that converts a split's rows."""

    name: str
    title: str
    splits: tuple[str, ...]
    tasks: tuple[str, ...]
    source: str  # where the schema was read from
    convert: Any = field(repr=False)  # (rows, split) -> list[Converted]
