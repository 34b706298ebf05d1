"""``kvwctl data convert``: read a benchmark split, write kvwctl samples and their images.

    result = run_convert("clear", Path("CLEAR"), "forget05", Path("data/forget05.jsonl"), tasks=("name",))

The JSON Lines file (one sample a line, DESIGN §4 plus the fields of ``samples``) and the image
directory ``<out stem>.images/`` (one file per image, named ``<split>-<id>.<png|jpg|…>``, and a
``kvw_manifest.json`` recording the benchmark, the source files and their sha256) are staged
beside their targets and renamed into place together: an interrupted run leaves neither.
``tasks`` keeps only those task kinds (e.g. ``caption`` to profile CLEAR as KVW does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from kvwctl import __version__
from kvwctl.benchmarks import ADAPTERS
from kvwctl.benchmarks.reading import read_split
from kvwctl.benchmarks.samples import Converted, Picture
from kvwctl.errors import DataError, UsageError
from kvwctl.files import committed_together, file_sha256
from kvwctl.outputs import MANIFEST_FILE, check_outputs

IMAGES_FORMAT = "kvwctl.benchmark-images/1"
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    images_dir: Path | None
    samples: int
    images: int
    tasks: dict[str, int]  # task kind -> samples

    def summary(self) -> dict[str, Any]:
        return {
            "images_dir": None if self.images_dir is None else str(self.images_dir),
            "samples": self.samples,
            "images": self.images,
            "tasks": self.tasks,
        }


def images_dir_for(out: Path) -> Path:
    """``data/forget.jsonl`` -> ``data/forget.images``."""
    return out.with_name(f"{out.stem}.images")


def check_request(benchmark: str, split: str, tasks: tuple[str, ...]) -> None:
    """Usage errors (exit 2): an unknown benchmark, split or task kind, listing the known ones."""
    if benchmark not in ADAPTERS:
        raise UsageError(f"unknown benchmark {benchmark!r}", hint=f"choose one of {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[benchmark]
    if split not in adapter.splits:
        raise UsageError(f"{adapter.title} has no split {split!r}", hint=f"its splits: {', '.join(adapter.splits)}")
    unknown = [task for task in tasks if task not in adapter.tasks]
    if unknown:
        raise UsageError(
            f"{adapter.title} has no task kind {', '.join(map(repr, unknown))}",
            hint=f"its task kinds: {', '.join(adapter.tasks)}",
        )


def run_convert(
    benchmark: str, source: Path, split: str, out: Path, *, tasks: tuple[str, ...] = (), force: bool = False
) -> ConvertResult:
    check_request(benchmark, split, tasks)
    adapter = ADAPTERS[benchmark]
    if out.suffix != ".jsonl":
        raise UsageError(f"--out {out} should end in .jsonl", hint="kvwctl reads samples from JSON Lines files")
    rows, files = read_split(source, split)
    converted = adapter.convert(rows, split)
    if tasks:
        converted = [item for item in converted if item.fields["task"] in tasks]
    if not converted:
        kinds = ", ".join(tasks) if tasks else "any task"
        raise DataError(f"{adapter.title} {split}: no sample of {kinds} in {source}")
    images_dir = images_dir_for(out)
    has_images = any(item.image is not None for item in converted)
    check_outputs(files=[out], directories=[images_dir] if has_images else [], inputs=files, force=force)
    pictures = _name_pictures(converted)
    lines = [_line(item, pictures, images_dir.name) for item in converted]
    with committed_together() as outputs:
        samples_file = outputs.file(out, force=force)
        samples_file.write_text("".join(lines), encoding="utf-8")
        if has_images:
            staging = outputs.directory(images_dir, force=force)
            for name, data in pictures.values():
                (staging / name).write_bytes(data)
            manifest = {
                "tool": "kvwctl",
                "format": IMAGES_FORMAT,
                "tool_version": __version__,
                "benchmark": adapter.title,
                "split": split,
                "schema_source": adapter.source,
                "source_files": {str(path): file_sha256(path) for path in files},
                "images": len(pictures),
            }
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    counts: dict[str, int] = {}
    for item in converted:
        counts[item.fields["task"]] = counts.get(item.fields["task"], 0) + 1
    return ConvertResult(
        path=out,
        images_dir=images_dir if has_images else None,
        samples=len(converted),
        images=len(pictures),
        tasks=counts,
    )


def _name_pictures(converted: list[Converted]) -> dict[str, tuple[str, bytes]]:
    """Picture stem -> (file name, bytes), each picture once, its suffix from its format."""
    named: dict[str, tuple[str, bytes]] = {}
    for item in converted:
        for picture in (item.image, *item.other_images):
            if picture is not None and picture.stem not in named:
                named[picture.stem] = (picture.stem + _suffix(picture, item), picture.data)
    return named


def _suffix(picture: Picture, item: Converted) -> str:
    """The file suffix of an image's format, read from its bytes (PIL); a DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(BytesIO(picture.data)) as image:
            kind = image.format or ""
    except (OSError, UnidentifiedImageError, ValueError):
        raise DataError(f"sample {item.fields['id']}: its image is not a readable image") from None
    return SUFFIXES.get(kind, f".{kind.lower() or 'img'}")


def _line(item: Converted, pictures: dict[str, tuple[str, bytes]], folder: str) -> str:
    fields = dict(item.fields)
    if item.image is not None:
        fields = {**_ordered_head(fields), "image": f"{folder}/{pictures[item.image.stem][0]}", **_tail(fields)}
    if item.other_images:
        fields["other_images"] = [f"{folder}/{pictures[picture.stem][0]}" for picture in item.other_images]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n"


def _ordered_head(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: fields[key] for key in ("id",) if key in fields}


def _tail(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if key != "id"}
