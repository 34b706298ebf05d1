"""Copying a file with some byte ranges rewritten: read, rewrite and write overlapped, in bounded memory.

``apply`` writes every output shard this way (``kvwctl.checkpoint.copy_patched_shard``). Three
threads pass a fixed pool of buffers around a ring, so reading, rewriting and writing overlap
and the memory held is the pool, whatever the size of the file::

    reader (read + input SHA-256) -> rewriter (the caller's thread: patches) -> writer (output SHA-256 + write)
          ^------------------------------- free buffers ----------------------------------|

A **patch** rewrites the bytes of one range ``[start, end)`` of the file in place, block by
block, as they stream through: it sees each block of its range once, in order, with the block's
offset from ``start``. Every block of a range is a whole number of the patch's ``alignment``
bytes (one row of a weight, so that a block is a matrix of whole rows), and no block spans a
range boundary: the reader cuts its reads there. A patch may be plain ``bytes`` (the new bytes
of the range). Neither the input nor the output is read a second time for its hash.

Only the standard library is used here; hashing, reading and writing release the GIL, so the
three stages run in parallel on as many cores as there are. An error in any stage stops the
other two and is raised in the caller's thread, after both have finished (the target file is
then incomplete: callers write into a staging directory that is removed on failure).

    copied = copy_with_patches(Path("in"), Path("out"), {(5, 16): b"A" * 11}, block_size=1 << 22)
    copied.input_sha256, copied.output_sha256
"""

from __future__ import annotations

import hashlib
import io
import mmap
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

BUFFERS = 4  # buffers in the ring: one per stage in use, one waiting
POLL_SECONDS = 0.1  # how often a waiting stage looks whether another one has failed


class Patch(Protocol):
    """Rewrites the bytes of one range of a file, block by block, in place."""

    @property
    def alignment(self) -> int:
        """Every block handed to :meth:`rewrite` is a whole number of this many bytes."""
        ...

    def rewrite(self, offset: int, block: memoryview) -> None:
        """Rewrite ``block`` (the range's bytes ``offset:offset + len(block)``) in place."""
        ...


@dataclass(frozen=True)
class LiteralPatch:
    """A range's new bytes, given whole."""

    data: bytes
    alignment: int = 1

    def rewrite(self, offset: int, block: memoryview) -> None:
        block[:] = self.data[offset : offset + len(block)]


@dataclass(frozen=True)
class ShardCopy:
    """The SHA-256 of a shard as it was read and of the copy as it was written."""

    input_sha256: str
    output_sha256: str


class _Stopped(Exception):
    """Another stage failed: this one leaves quietly (the failure is raised by the caller)."""


@dataclass(frozen=True)
class _Block:
    position: int  # absolute offset in the file
    buffer: mmap.mmap
    length: int
    patch: tuple[int, Patch] | None  # (the range's start, its patch) when the block lies in a range


def copy_with_patches(
    source: Path, target: Path, patches: Mapping[tuple[int, int], Patch | bytes], *, block_size: int
) -> ShardCopy:
    """Copy ``source`` to ``target`` with each range ``(start, end)`` rewritten by its patch; hash both.

    Ranges must not overlap; a ``bytes`` patch must have exactly ``end - start`` bytes. At most
    :data:`BUFFERS` blocks of ``block_size`` bytes (or of one ``alignment``, when that is larger)
    are held at a time.
    """
    ranges = sorted((start, end, _as_patch(start, end, patch)) for (start, end), patch in patches.items())
    for (_, end, _), (start, _, _) in zip(ranges, ranges[1:], strict=False):
        if start < end:
            raise AssertionError(f"patches overlap at byte {start}")
    size = max([block_size, *(patch.alignment for _, _, patch in ranges)])
    free: queue.Queue[mmap.mmap] = queue.Queue()
    for _ in range(BUFFERS):  # anonymous maps, not the heap: returned to the system when let go
        free.put(mmap.mmap(-1, size))
    filled: queue.Queue[_Block | None] = queue.Queue()
    rewritten: queue.Queue[_Block | None] = queue.Queue()
    failed = threading.Event()
    errors: list[BaseException] = []
    input_digest, output_digest = hashlib.sha256(), hashlib.sha256()

    def read() -> None:
        position, index = 0, 0
        with source.open("rb") as reader:
            while True:
                while index < len(ranges) and ranges[index][1] <= position:
                    index += 1
                length, patch = block_size, None
                if index < len(ranges):
                    start, end, current = ranges[index]
                    if position < start:
                        length = min(block_size, start - position)
                    else:
                        alignment = current.alignment
                        length = min(end - position, max(alignment, block_size // alignment * alignment))
                        patch = (start, current)
                buffer = _take(free, failed)
                count = _read_fully(reader, memoryview(buffer)[:length])
                if patch is not None and count < length:
                    raise AssertionError(f"a patch ends beyond the {position + count} bytes of {source}")
                if count == 0:
                    if index < len(ranges):
                        raise AssertionError(f"a patch ends beyond the {position} bytes of {source}")
                    free.put(buffer)
                    filled.put(None)
                    return
                input_digest.update(memoryview(buffer)[:count])
                filled.put(_Block(position, buffer, count, patch))
                position += count

    def write() -> None:
        with target.open("wb") as writer:
            while (block := _take(rewritten, failed)) is not None:
                data = memoryview(block.buffer)[: block.length]
                output_digest.update(data)
                writer.write(data)
                free.put(block.buffer)

    threads = [threading.Thread(target=_stage(work, failed, errors), daemon=True) for work in (read, write)]
    for thread in threads:
        thread.start()
    try:
        _rewrite(filled, rewritten, failed)
    except _Stopped:
        pass  # another stage failed: its error is raised below
    except BaseException:
        failed.set()  # this stage failed (or was interrupted): stop the others, then raise
        raise
    finally:
        try:
            for thread in threads:
                thread.join()
        except BaseException:  # interrupted while waiting: the stages stop on their own
            failed.set()
            raise
    if errors:
        raise errors[0]
    return ShardCopy(input_sha256=input_digest.hexdigest(), output_sha256=output_digest.hexdigest())


def _rewrite(
    filled: queue.Queue[_Block | None], rewritten: queue.Queue[_Block | None], failed: threading.Event
) -> None:
    """The caller's stage: apply each block's patch, pass every block on to the writer."""
    while (block := _take(filled, failed)) is not None:
        if block.patch is not None:
            start, patch = block.patch
            patch.rewrite(block.position - start, memoryview(block.buffer)[: block.length])
        rewritten.put(block)
    rewritten.put(None)


def _stage(work: Callable[[], None], failed: threading.Event, errors: list[BaseException]) -> Callable[[], None]:
    """``work`` that records its error and tells the other stages to stop."""

    def run() -> None:
        try:
            work()
        except _Stopped:
            pass
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)
            failed.set()

    return run


def _take(source: queue.Queue[T], failed: threading.Event) -> T:
    """The next item of ``source``; :class:`_Stopped` as soon as another stage has failed."""
    while True:
        if failed.is_set():
            raise _Stopped
        try:
            return source.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue


def _read_fully(reader: io.BufferedReader, view: memoryview) -> int:
    """Fill ``view`` from ``reader`` unless the file ends first; the number of bytes read."""
    count = 0
    while count < len(view):
        got = reader.readinto(view[count:])
        if not got:
            break
        count += got
    return count


def _as_patch(start: int, end: int, patch: Patch | bytes) -> Patch:
    if isinstance(patch, bytes | bytearray):
        if len(patch) != end - start:
            raise AssertionError(f"patch for bytes {start}:{end} has {len(patch)} bytes")
        return LiteralPatch(bytes(patch))
    return patch
