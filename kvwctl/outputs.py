"""Which outputs a command may write, checked before any work, and names read from files.

* **Output checks before work.** ``check_outputs`` compares every output of a command with every
  input and with the other outputs (symlinks resolved): the same file, an output inside an input
  directory or an input inside an output directory is refused, before anything expensive runs.
  An existing output is replaced only with ``--force`` and only if kvwctl wrote it (a checkpoint
  with its ``kvw_manifest.json``, a file with a ``kvwctl.*`` format tag (for a PNG of ``kvwctl
  plot``, its ``format`` text chunk), eval's per-sample file, or an empty file or directory); a
  user's folder at ``--out`` is never deleted.
* **Names read from files stay inside their directory.** ``inside(directory, name, source=...)``
  is the one place a name taken from a file (an index's shard names) is joined to a directory.

    check_outputs(files=[out], inputs=[data], force=False)   # before the model is loaded
    inside(checkpoint_dir, shard_name, source=index_path)     # a shard name from the index

Only the standard library is imported here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvwctl.errors import KvwError, ModelError

MANIFEST_FILE = "kvw_manifest.json"


# --- names read from files ----------------------------------------------------------------------


def inside(directory: Path, name: object, *, source: Path) -> Path:
    """``directory / name`` for a ``name`` read from the file ``source``, refused if it leaves it.

    A name must be a relative POSIX path whose every component is a plain name: no absolute path,
    no ``..``, ``.`` or empty component, no backslash or NUL. The check is on the name itself,
    not on where it resolves to, so it holds for an output directory that does not exist yet.
    """
    if not isinstance(name, str) or not is_plain_relative(name):
        raise ModelError(
            f"{source} names the file {name!r}, which is not a plain path inside {directory}",
            hint="a name read from a checkpoint's files must be relative, without '..', '.' or '\\'",
        )
    return directory / name


def is_plain_relative(name: str) -> bool:
    if not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


# --- output checks -------------------------------------------------------------------------------


def check_outputs(
    *, files: Sequence[Path] = (), directories: Sequence[Path] = (), inputs: Sequence[Path], force: bool
) -> None:
    """Refuse, before any work, every output that could destroy something it should not.

    Every output (``files``: stage files, reports; ``directories``: checkpoints) is checked against
    every input of the command and against the other outputs, with symlinks resolved: it may not
    be the same file, lie inside an input directory or contain an input. An output that exists is
    replaced only with ``force``, and only if kvwctl wrote it (:func:`check_replaceable`).
    """
    outputs = [*files, *directories]
    for position, out in enumerate(outputs):
        # The most telling collision first: the very file before the directory it is in.
        collisions = sorted(
            ((overlap, path) for path in inputs if (overlap := _overlap(out, path))),
            key=lambda collision: collision[0] != "the same file",
        )
        if collisions:
            overlap, path = collisions[0]
            raise KvwError(
                f"output {out} overlaps the input {path} ({overlap})",
                hint="kvwctl never writes into or over its inputs: choose another output path",
            )
        for other in outputs[position + 1 :]:
            overlap = _overlap(out, other)
            if overlap:
                raise KvwError(
                    f"output {out} overlaps the output {other} ({overlap})", hint="choose distinct output paths"
                )
    for out in files:
        if out.is_dir():
            raise KvwError(f"output {out} is a directory; expected a file path")
    for out in directories:
        if out.exists() and not out.is_dir():
            raise KvwError(f"output {out} exists and is not a directory")
    for out in outputs:
        if out.exists() or out.is_symlink():
            if not force:
                raise KvwError(f"output {out} already exists", hint="pass --force to replace it")
            check_replaceable(out)
        check_writable_parent(out)


def _overlap(first: Path, second: Path) -> str | None:
    """How ``first`` collides with ``second``, symlinks resolved (``"the same file"``, ...); else None."""
    a, b = first.resolve(), second.resolve()
    if a == b or (a.exists() and b.exists() and os.path.samefile(a, b)):
        return "the same file"
    if b in a.parents:
        return "inside it"
    if a in b.parents:
        return "it contains it"
    return None


def check_replaceable(out: Path) -> None:
    """Refuse to replace (``--force``) an existing output that kvwctl did not write.

    kvwctl replaces only its own outputs: a checkpoint directory with a ``kvw_manifest.json`` whose
    ``tool`` is ``kvwctl``, a stage file (safetensors), report (JSON) or picture (PNG, its ``format``
    text chunk) whose ``format`` starts with ``kvwctl.``, eval's per-sample JSON Lines file (its
    first record has ``role``, ``split``, ``id`` and ``generation``, or ``"redacted": true`` instead
    of ``generation``), a JSON Lines file whose first record has a ``kvwctl.`` format (tune's
    trial log), or an empty file or directory (nothing is lost). A user's folder or file
    at the output path is never deleted.
    """
    if out.is_symlink():
        raise KvwError(f"output {out} is a symlink; kvwctl does not replace it", hint="choose another output path")
    if _written_by_kvwctl(out):
        return
    what = "directory has no kvw_manifest.json" if out.is_dir() else "file has no kvwctl format tag"
    raise KvwError(
        f"output {out} exists and was not written by kvwctl (the {what}); --force replaces only kvwctl's outputs",
        hint="remove it yourself if it may go, or choose another output path",
    )


def _written_by_kvwctl(out: Path) -> bool:
    try:
        if out.is_dir():
            if not any(out.iterdir()):
                return True
            manifest = out / MANIFEST_FILE
            return manifest.is_file() and json_object(manifest.read_bytes()).get("tool") == "kvwctl"
        size = out.stat().st_size
        if size == 0:
            return True
        with out.open("rb") as stream:
            head = stream.read(min(size, _TAGGED_FILE_LIMIT))
    except OSError:
        return False
    if head.startswith(_PNG_SIGNATURE):
        return _png_format(head).startswith("kvwctl.")  # a picture of kvwctl plot
    # A safetensors file: 8-byte little-endian header length, then the JSON header.
    header_size = int.from_bytes(head[:8], "little")
    if 2 <= header_size <= len(head) - 8:
        metadata = json_object(head[8 : 8 + header_size]).get("__metadata__")
        if isinstance(metadata, dict) and str(metadata.get("format", "")).startswith("kvwctl."):
            return True
    if str(json_object(head).get("format", "")).startswith("kvwctl."):  # a report
        return True
    first_record = json_object(head.split(b"\n", 1)[0])  # eval's per-sample JSON Lines (or redacted), tune's log
    if str(first_record.get("format", "")).startswith("kvwctl."):
        return True
    return {"role", "split", "id", "generation"} <= first_record.keys() or (
        {"role", "split", "id"} <= first_record.keys() and first_record.get("redacted") is True
    )


_TAGGED_FILE_LIMIT = 64 << 20  # headers and reports are far smaller; a longer file is not read whole
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_format(data: bytes) -> str:
    """The ``format`` tEXt chunk of a PNG (before its image data), or ``""``.

    A chunk is a 4-byte big-endian length, a 4-byte type, the data and a 4-byte CRC.
    """
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind in (b"IDAT", b"IEND"):
            break
        body = data[position + 8 : position + 8 + length]
        if kind == b"tEXt" and body.startswith(b"format\0"):
            return body.removeprefix(b"format\0").decode("latin-1")
        position += 12 + length
    return ""


def json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def check_writable_parent(out: Path) -> None:
    """Refuse an output whose parent (or nearest existing ancestor) cannot be written, before work.

    ``os.access`` answers for the real user; a root process passes it everywhere, and a
    read-only filesystem is caught at write time instead (``output_errors``).
    """
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise KvwError(f"cannot write {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise KvwError(
            f"cannot write {out}: the directory {ancestor} is not writable",
            hint="choose another --out or fix the directory's permissions",
        )
