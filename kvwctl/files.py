"""Files on disk: atomic files and directories, outputs committed together, hashing, timestamps.

Which outputs may be written at all (against the inputs, ``--force``) is ``kvwctl.outputs``.

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
* **Outputs that belong together are committed together.** ``committed_together()`` stages
  several files and directories (eval's report and per-sample file; a progressive checkpoint
  and its exposure file) and renames them into place only at the end, all of them or none: if
  one rename fails, those already made are undone.
* **Modes as ``open()`` gives them.** Temporary files and staging directories are created by
  ``mkstemp``/``mkdtemp`` as 0600/0700; before an output is renamed into place it gets the mode
  a plain ``open()``/``mkdir()`` would have given it, ``0666``/``0777`` less the umask, so a
  checkpoint can be handed to another user or group as any other file could.
* **A write that fails is a user error.** An ``OSError`` while staging or committing an output
  (a full disk, a read-only or vanished directory) becomes a ``KvwError`` naming the output and
  the reason, with a hint; the staged files are removed as on any other failure.
* **A hash cache.** ``cached_digests`` keeps per-file digests in ``hashes.json`` under
  ``$KVW_CACHE_DIR`` (else ``$XDG_CACHE_HOME/kvwctl`` or ``~/.cache/kvwctl``), keyed by resolved
  path, size and mtime, so the model fingerprint reads a checkpoint once, not on every run.

    from kvwctl.files import atomic_file, file_sha256, write_json_atomically

    write_json_atomically(Path("report.json"), {"ok": True})   # report.json: '{\\n  "ok": true\\n}\\n'
    with atomic_file(Path("big.bin")) as temporary:
        temporary.write_bytes(b"...")                          # big.bin appears only now
    file_sha256(Path("big.bin"))                               # hex SHA-256 of the bytes

Only the standard library is imported here; ``save_safetensors_atomically`` imports safetensors
when it is called.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvwctl.errors import KvwError
from kvwctl.outputs import check_replaceable, json_object


def now() -> str:
    """The current UTC time to the second, ISO 8601 (``2025-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# --- the hash cache ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$KVW_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvwctl``, else ``~/.cache/kvwctl``."""
    if os.environ.get("KVW_CACHE_DIR"):
        return Path(os.environ["KVW_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvwctl"


def cached_digests(path: Path, compute: Callable[[Path], dict[str, str]]) -> dict[str, str]:
    """``compute(path)`` (names -> hex digests of parts of the file), cached in ``hashes.json``.

    An entry is keyed by the file's resolved path and valid while its size and ``mtime_ns`` are
    unchanged (a rewrite changes the mtime). The cache is only a cache: an unreadable or corrupt
    one is ignored and rewritten, and a cache directory that cannot be written is skipped.
    """
    key = str(path.resolve())
    stat = path.stat()
    cache_file = cache_dir() / "hashes.json"
    entries = json_object(cache_file.read_bytes()) if cache_file.is_file() else {}
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        digests = entry.get("digests")
        if isinstance(digests, dict) and all(isinstance(value, str) for value in digests.values()):
            return digests
    digests = compute(path)
    entries = {name: value for name, value in entries.items() if Path(name).exists()}  # forget deleted files
    entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digests": digests}
    with contextlib.suppress(OSError):  # a cache directory that cannot be written: hash again next time
        write_json_atomically(cache_file, entries)
    return digests


# --- errors and modes ----------------------------------------------------------------------------

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write the output elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write the output elsewhere",
    errno.EFBIG: "the file is larger than this filesystem or process allows: write it elsewhere",
    errno.EACCES: "check the permissions of the output directory or choose another --out",
    errno.EPERM: "check the permissions of the output directory or choose another --out",
    errno.EROFS: "the filesystem is read-only: choose another --out",
    errno.ENOENT: "the output directory was removed or renamed while kvwctl ran: run it again",
}


@contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into a ``KvwError`` that names ``out`` and the reason.

    Used around the staging and committing of every output, so that a full disk or a vanished
    directory is reported as ``Error: cannot write …`` plus a hint, never as a traceback.
    """
    try:
        yield
    except OSError as error:
        raise write_error(str(out), error) from error


def write_error(out: str, error: OSError) -> KvwError:
    """``cannot write OUT: <reason> (<the file it was about, unless a staging name>)`` and a hint."""
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename and ".kvw-" not in str(error.filename) else ""
    hint = _HINTS.get(error.errno or 0, "check the output location and run it again")
    return KvwError(f"cannot write {out}: {reason}{where}", hint=hint)


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc/self/status``).

    ``os.umask`` can only read the mask by setting it, which for a moment gives every other
    thread's new files mode 0666 (the lock only orders the callers of this function), so it is
    the fallback where ``/proc`` has no ``Umask:`` line (other systems, Linux before 4.7).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def give_default_mode(path: Path) -> None:
    """Give a file the mode ``open()`` would create it with (0666 less the umask), a directory
    the mode of ``mkdir()`` (0777 less the umask); ``mkstemp``/``mkdtemp`` create 0600/0700."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


# --- atomic writes -------------------------------------------------------------------------------


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """A temporary file beside ``out``, renamed onto it only if the block succeeds.

    ``out`` is never half-written and never overwritten in place (it may be memory-mapped as an
    input); a failed or interrupted block leaves it as it was and removes the temporary file.
    """
    temporary: Path | None = None
    try:
        with output_errors(out):
            temporary = _temporary_file(out)
            yield temporary
            give_default_mode(temporary)
            os.replace(temporary, out)
    finally:
        if temporary is not None and temporary.exists():
            temporary.unlink()


def _temporary_file(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.kvw-", suffix=".tmp", dir=out.parent)
    os.close(handle)
    return Path(name)


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
    with committed_together() as outputs:
        yield outputs.directory(out, force=force)


class StagedOutputs:
    """Outputs staged beside their targets, renamed into place together by ``committed_together``."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path, bool]] = []  # (staging path, target, force)

    @property
    def targets(self) -> list[Path]:
        return [out for _, out, _ in self._staged]

    def file(self, out: Path, *, force: bool = True) -> Path:
        """A temporary file beside ``out`` to write ``out``'s content into."""
        with output_errors(out):
            temporary = _temporary_file(out)
        self._staged.append((temporary, out, force))
        return temporary

    def directory(self, out: Path, *, force: bool) -> Path:
        """A hidden staging directory beside ``out`` to build ``out`` in."""
        with output_errors(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.kvw-", dir=out.parent))
        self._staged.append((staging, out, force))
        return staging

    def commit(self) -> None:
        """Rename every staged output onto its target; on a failure undo the renames already made.

        An existing target is moved aside first (refused without ``force``) and deleted only once
        all are in place, so a failed commit puts the old outputs back.
        """
        for _, out, force in self._staged:
            if out.exists() or out.is_symlink():
                if not force:
                    raise KvwError(f"output {out} already exists", hint="pass --force to replace it")
                check_replaceable(out)  # again at the moment of replacing: it may have changed since
        moved: list[tuple[Path, Path | None]] = []  # (target, where its old version went)
        placed: list[Path] = []
        try:
            for staging, out, _ in self._staged:
                with output_errors(out):
                    give_default_mode(staging)
                    aside = None
                    if out.exists():
                        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.kvw-old-", dir=out.parent)) / out.name
                        os.replace(out, aside)
                    moved.append((out, aside))
                    os.replace(staging, out)
                    placed.append(out)
        except BaseException:
            # Put the old outputs back; the error that stopped the commit is the one reported.
            for out, aside in reversed(moved):
                with suppress(OSError):
                    if out in placed:
                        _remove(out)
                    if aside is not None:
                        os.replace(aside, out)
                        aside.parent.rmdir()
            raise
        for _, aside in moved:
            if aside is not None:
                with suppress(OSError):
                    shutil.rmtree(aside.parent)

    def discard(self) -> None:
        """Remove whatever is still staged (after a failure, or what a commit did not move)."""
        for staging, _, _ in self._staged:
            if staging.exists():
                _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextmanager
def committed_together() -> Iterator[StagedOutputs]:
    """Stage several outputs and rename them into place together when the block succeeds.

    with committed_together() as outputs:
        write_report(outputs.file(report_path))
        write_samples(outputs.file(samples_path))
    # both renamed into place now; after a failure, neither (and the staged files are gone)
    """
    outputs = StagedOutputs()
    try:
        try:
            yield outputs
        except OSError as error:
            raise write_error(" and ".join(map(str, outputs.targets)) or "the output", error) from error
        outputs.commit()
    finally:
        outputs.discard()
