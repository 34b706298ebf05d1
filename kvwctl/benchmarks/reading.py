"""Rows of a benchmark split as published: parquet files (through pyarrow) or JSON.

    rows = read_split(Path("MLLMU-Bench"), "forget_5")   # MLLMU-Bench/forget_5/*.parquet
    rows[0].record["ID"], rows[0].where                   # "…/train-00000-of-00001.parquet: row 1"

A split is looked for, in this order, as a directory ``DIR/SPLIT`` of ``*.parquet`` files (the
Hugging Face layout: ``forget_5/train-00000-of-00001.parquet``; all its parquet files, sorted by
name, their rows in file order), as ``DIR/SPLIT.parquet``, or as ``DIR/SPLIT.json`` /
``DIR/SPLIT.jsonl`` (a JSON array of objects, or one object a line, as TOFU's ``forget10.json``).
Parquet needs pyarrow, an optional extra (``pip install 'kvwctl[benchmarks]'``); a missing pyarrow
is a clear error, not a traceback. Image columns are read as Hugging Face stores them: a struct
``{"bytes": …, "path": …}`` (``image_bytes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl.errors import DataError, KvwError


@dataclass(frozen=True)
class Row:
    record: dict[str, Any]
    where: str  # "file: row N", for error messages


def split_files(directory: Path, split: str) -> list[Path]:
    """The files that hold ``split`` under ``directory``; a ``DataError`` saying where it looked if none."""
    if not directory.is_dir():
        raise DataError(f"benchmark directory {directory} does not exist", hint="pass --from DIR, a local copy")
    folder = directory / split
    if folder.is_dir():
        files = sorted(folder.rglob("*.parquet"))
        if files:
            return files
    for suffix in (".parquet", ".json", ".jsonl"):
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return [candidate]
    present = sorted(path.name for path in directory.iterdir() if not path.name.startswith("."))
    raise DataError(
        f"no split {split!r} in {directory}: looked for {folder}/*.parquet and {split}.parquet, "
        f"{split}.json, {split}.jsonl",
        hint=f"{directory} holds: {', '.join(present[:20]) or 'nothing'}",
    )


def read_split(directory: Path, split: str) -> tuple[list[Row], list[Path]]:
    """Every row of ``split`` in file order, and the files read."""
    files = split_files(directory, split)
    rows: list[Row] = []
    for path in files:
        rows.extend(_read_parquet(path) if path.suffix == ".parquet" else _read_json(path))
    if not rows:
        raise DataError(f"split {split!r} in {directory} has no rows ({', '.join(map(str, files))})")
    return rows, files


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise KvwError(
            f"reading {path} needs pyarrow, which is not installed",
            hint="pip install 'kvwctl[benchmarks]' (or pip install pyarrow)",
        ) from None
    import pyarrow

    try:
        table = parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable parquet file: {error}") from None
    return [Row(record=record, where=f"{path}: row {index}") for index, record in enumerate(table.to_pylist(), 1)]


def _read_json(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
        located = [(record, f"{path}: item {index}") for index, record in enumerate(records, 1)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON: {error.msg}") from None
    rows = []
    for record, where in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rows.append(Row(record=record, where=where))
    return rows


# --- fields --------------------------------------------------------------------------------------


def text_field(row: Row, name: str, *, required: bool = True) -> str:
    """A non-empty string field of a row (``""`` when absent and not required)."""
    value = row.record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{row.where}: {name}: required, must be a non-empty string (got {_shown(value)})")
    return value


def text_list(row: Row, name: str, *, required: bool = True) -> list[str]:
    """A list of non-empty strings (``[]`` when absent and not required)."""
    value = row.record.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item.strip() for item in value):
        raise DataError(f"{row.where}: {name}: must be a non-empty list of non-empty strings (got {_shown(value)})")
    return value


def image_bytes(value: Any, where: str, name: str) -> bytes:
    """The encoded bytes of an image cell: ``{"bytes": b"…", "path": …}`` as Hugging Face stores it."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes) or not data:
        raise DataError(f"{where}: {name}: expected an image ({{'bytes': …}}), got {_shown(value)}")
    return data


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
