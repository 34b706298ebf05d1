"""Files on disk: atomic files and directories, output checks, hashing and timestamps.

Every file or directory kvwctl writes goes through this module, so that an interrupted or failed
run never leaves a half-written output behind:

* **Temporary file, then ``os.replace``.** ``atomic_file(out)`` yields a temporary path beside
  ``out`` (same directory, hence the same filesystem) and renames it onto ``out`` only when the
  block succeeds. On a POSIX filesystem ``os.replace`` is atomic: readers see the old file or the
  new one, never a mix; a failure removes the temporary file and leaves ``out`` as it was.
* **Never overwrite a memory-mapped input.** ``safetensors.safe_open`` memory-maps the file it
  reads; writing over that same path in place (``save_file(tensors, path)`` after reading from
  ``path``) truncates the mapped file under any tensor that still views it, the pattern
  safetensors warns against. A rename replaces the directory entry instead: the mapped file stays
  intact until its last reader lets go.
  To rewrite a file you have read, read it, then ``save_safetensors_atomically`` onto its path.
* **Staging directories beside the target.** ``staged_output_dir(out)`` builds a whole checkpoint
  in a hidden ``.NAME.kvw-*`` directory next to ``out`` and renames it into place at the end; with
  ``force`` the old directory is moved aside first and removed only after the new one is in place.
* **Output checks before work.** ``check_output_file`` and ``check_output_dir`` refuse an existing
  output without ``--force`` and an output that overlaps an input, before anything expensive runs.

    from kvwctl.files import atomic_file, file_sha256, write_json_atomically

    write_json_atomically(Path("report.json"), {"ok": True})   # report.json: '{\\n  "ok": true\\n}\\n'
    with atomic_file(Path("big.bin")) as temporary:
        temporary.write_bytes(b"...")                          # big.bin appears only now
    file_sha256(Path("big.bin"))                               # hex SHA-256 of the bytes

Only the standard library is imported here; ``save_safetensors_atomically`` imports safetensors
when it is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvwctl.errors import KvwError


def now() -> str:
    """The current UTC time to the second, ISO 8601 (``2025-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# --- output checks -------------------------------------------------------------------------------


def check_output_file(out: Path, *, force: bool) -> None:
    """Refuse an output file that exists (without ``--force``) or that is a directory."""
    if out.exists() and not force:
        raise KvwError(f"output {out} already exists", hint="pass --force to replace it")
    if out.is_dir():
        raise KvwError(f"output {out} is a directory; expected a file path")


def check_output_dir(out: Path, *, inputs: list[Path], force: bool) -> None:
    """Refuse an output that exists (without ``--force``) or that overlaps an input directory."""
    resolved = out.resolve()
    for path in inputs:
        path = path.resolve()
        if resolved == path or path in resolved.parents or resolved in path.parents:
            raise KvwError(
                f"output {out} overlaps the input {path}",
                hint="kvwctl never writes into its input: choose another --out",
            )
    if out.exists() and not force:
        raise KvwError(f"output {out} already exists", hint="pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise KvwError(f"output {out} exists and is not a directory")


# --- atomic writes -------------------------------------------------------------------------------


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """A temporary file beside ``out``, renamed onto it only if the block succeeds.

    ``out`` is never half-written and never overwritten in place (it may be memory-mapped as an
    input); a failed or interrupted block leaves it as it was and removes the temporary file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomically(out: Path, text: str) -> None:
    """Write ``text`` as UTF-8 (no newline translation) through ``atomic_file``."""
    with atomic_file(out) as temporary:
        temporary.write_bytes(text.encode("utf-8"))


def write_json_atomically(out: Path, obj: Any, *, ensure_ascii: bool = False) -> None:
    """Write ``obj`` as indented JSON plus a final newline through ``atomic_file``.

    ``ensure_ascii=False`` keeps non-ASCII text readable (reports); pass ``True`` where a file's
    bytes have always been written with ``\\uXXXX`` escapes (the output manifest). NaN and
    infinities are refused (``ValueError``), never written as the non-JSON ``NaN``/``Infinity``:
    callers turn a non-finite number into null, and say so, before writing.
    """
    write_text_atomically(out, json.dumps(obj, indent=2, ensure_ascii=ensure_ascii, allow_nan=False) + "\n")


def save_safetensors_atomically(tensors: dict[str, Any], out: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file and ``os.replace``, reproducibly.

    safetensors serialises the metadata map in a per-process random (hash) order, so the same
    tensors and metadata would give different bytes from one run to the next. The header is
    rewritten with the metadata keys sorted (:func:`canonical_safetensors_header`), then read back.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    with atomic_file(out) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, temporary, metadata=metadata)
        canonical_safetensors_header(temporary)
        with safe_open(str(temporary), framework="pt") as stream:
            if (stream.metadata() or {}) != metadata or set(stream.keys()) != set(tensors):
                raise AssertionError(f"{temporary}: the rewritten safetensors header does not read back")


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's header with ``__metadata__`` first and its keys sorted.

    Tensor entries keep safetensors' own (deterministic) order and their data offsets, which are
    relative to the end of the header, so only the header bytes change. The JSON is compact, as
    safetensors writes it, and padded with spaces to a multiple of 8 bytes. When its length is
    unchanged (the usual case) the header is overwritten in place, else the file is rewritten.
    """
    with path.open("r+b") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(length))
        metadata = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        if len(text) == length:
            stream.seek(8)
            stream.write(text)
            return
        stream.seek(8 + length)
        data = stream.read()
        stream.seek(0)
        stream.write(struct.pack("<Q", len(text)) + text + data)
        stream.truncate()


@contextmanager
def staged_output_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Build a directory next to ``out`` and rename it into place only if the block succeeds.

    An interrupted or failed run leaves ``out`` as it was (absent, or the old version with
    ``--force``) and removes the half-written staging directory.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.kvw-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            if not force:
                raise KvwError(f"output {out} already exists", hint="pass --force to replace it")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.kvw-old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
