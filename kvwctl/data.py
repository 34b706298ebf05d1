"""Samples: JSON Lines, one question/answer pair a line (DESIGN §4).

    {"id": "p07-name", "image": "images/p07.png", "question": "Who is this person?",
     "answer": "Mira Okafor", "keywords": ["Mira Okafor"], "options": ["Mira Okafor", "Tomas Ruiz"]}

``image`` is optional (a path relative to the JSONL file, or a list of paths); ``question`` and
``answer`` are required and non-empty; ``id``, ``keywords`` and ``options`` are optional. Unknown
fields are kept and ignored. An image may have at most ``MAX_IMAGE_PIXELS`` (64 megapixels). The
whole file is validated, images included, before any model work, and every problem is reported as
``file:line: field: problem``; a line that is not UTF-8 or not JSON is such a problem too, never a
traceback, whatever the bytes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvwctl.errors import DataError


@dataclass(frozen=True)
class Sample:
    id: str
    question: str
    answer: str
    images: tuple[Path, ...] = ()
    keywords: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    source: str = ""  # "file:line", for error messages
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def load_samples(path: Path) -> list[Sample]:
    """Read and validate a JSON Lines file; raises ``DataError`` listing every problem found."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    samples: list[Sample] = []
    problems: list[str] = []
    seen_ids: dict[str, str] = {}
    with path.open("rb") as stream:
        for line_number, raw in enumerate(stream, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                problems.append(f"{where}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: invalid JSON: {error.msg}")
                continue
            except (ValueError, RecursionError) as error:  # an integer of 5000 digits, [[[[… nested too deep
                problems.append(f"{where}: invalid JSON: {str(error) or type(error).__name__}")
                continue
            if not isinstance(record, dict):
                problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            sample, sample_problems = _parse_record(record, where, path.parent, default_id=f"line-{line_number}")
            problems.extend(sample_problems)
            if sample is None:
                continue
            if sample.id in seen_ids:
                problems.append(f"{where}: id: {sample.id!r} is already used at {seen_ids[sample.id]}")
            seen_ids[sample.id] = where
            samples.append(sample)
    if problems:
        shown = problems[:20]
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError("invalid data:\n  " + "\n  ".join(shown) + more)
    if not samples:
        raise DataError(f"{path} contains no samples")
    return samples


def _parse_record(
    record: dict[str, Any], where: str, base: Path, *, default_id: str
) -> tuple[Sample | None, list[str]]:
    problems: list[str] = []
    texts: dict[str, str] = {}
    for name in ("question", "answer"):
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where}: {name}: required, must be a non-empty string")
        else:
            texts[name] = value
    sample_id = record.get("id", default_id)
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        problems.append(f"{where}: id: must be a string")
    images = _string_list(record, "image", where, problems, allow_single=True)
    image_paths = []
    for image in images:
        image_path = base / image
        try:
            exists = image_path.is_file()
        except OSError as error:  # e.g. a name too long for the filesystem
            problems.append(f"{where}: image: {image!r} cannot be opened: {error.strerror}")
            continue
        if not exists:
            problems.append(f"{where}: image: {image_path} does not exist")
        elif (problem := _image_problem(image_path)) is not None:
            problems.append(f"{where}: image: {problem}")
        image_paths.append(image_path)
    keywords = _string_list(record, "keywords", where, problems)
    options = _string_list(record, "options", where, problems)
    if problems:
        return None, problems
    known = {"id", "question", "answer", "image", "keywords", "options"}
    sample = Sample(
        id=str(sample_id),
        question=texts["question"],
        answer=texts["answer"],
        images=tuple(image_paths),
        keywords=tuple(keywords),
        options=tuple(options),
        source=where,
        extra={key: value for key, value in record.items() if key not in known},
    )
    return sample, []


def _string_list(
    record: dict[str, Any], name: str, where: str, problems: list[str], *, allow_single: bool = False
) -> list[str]:
    value = record.get(name)
    if value is None:
        return []
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        kind = "a string or a list of strings" if allow_single else "a list of non-empty strings"
        problems.append(f"{where}: {name}: must be {kind}")
        return []
    return value


# The most pixels an image may have (64 megapixels, e.g. 8192 x 8192): PIL's limit against
# decompression bombs, a small file that decodes to gigabytes. Processors resize images to a few
# hundred pixels a side anyway; a larger image is refused as a data error naming file:line.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, from its header (pixels are decoded when profiling)."""
    from PIL import UnidentifiedImageError

    try:
        with _open_image(path) as image:
            image.verify()
    except _TooLarge as error:
        return str(error)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return f"{path} is not a readable image"
    return None


class _TooLarge(Exception):
    pass


@contextmanager
def _open_image(path: Path) -> Iterator[Any]:
    """``PIL.Image.open`` with kvwctl's pixel limit; an image over it raises ``_TooLarge``.

    PIL warns (``DecompressionBombWarning``) above its limit and raises only above twice it;
    here both are refused, before any pixel is decoded.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _TooLarge(
                f"{path} has more than {MAX_IMAGE_PIXELS // (1024 * 1024)} megapixels, the limit "
                "(a possible decompression bomb); scale it down"
            ) from None
        with image:
            yield image


def load_image(path: Path) -> Any:
    """Open an image as RGB (PIL is imported here, not at module import)."""
    from PIL import UnidentifiedImageError

    try:
        with _open_image(path) as image:
            return image.convert("RGB")
    except _TooLarge as error:
        raise DataError(str(error)) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
