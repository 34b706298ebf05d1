"""Tune's trial log: JSON Lines appended as work finishes, so that a killed run resumes.

The first line is a header with the sha256 of everything that decides the results (the models'
fingerprints, the data files' hashes, the search space and the settings: ``inputs_digest``); every
other line is one finished piece of work, keyed by ``key``: the reference's or baseline's scores,
a trial's screen, a trial's generation. Each line is written whole, flushed and fsynced before the
work after it starts. ``--resume`` reads the log back (a last line cut short by a kill is dropped,
and the file truncated to the last whole line before anything is appended); a log made from other
inputs is refused, naming the file. Without ``--resume`` an existing log is an error unless
``--force``, which starts it over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

from kvwctl.errors import ArtifactError, KvwError

LOG_FORMAT = "kvwctl.tune-log/1"


def inputs_digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class TrialLog:
    """The log of one tune run: what is already done (``done``) and how to add to it (``write``)."""

    def __init__(self, path: Path, digest: str, *, resume: bool, force: bool) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists() and not path.is_file():
            raise ArtifactError(f"{path} exists and is not a file")
        if path.is_file() and resume:
            keep = self._read(digest)
            with path.open("r+b") as stream:
                stream.truncate(keep)
        elif path.is_file() and not force:
            raise KvwError(
                f"{path} exists: the log of an earlier tune",
                hint="pass --resume to continue it, or --force to start over",
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as stream:
                stream.write(_dumps({"key": "header", "format": LOG_FORMAT, "inputs_sha256": digest}) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
        self._stream: IO[str] = path.open("a", encoding="utf-8")

    def _read(self, digest: str) -> int:
        """Read the finished work; returns the byte length of the whole lines to keep."""
        data = self.path.read_bytes()
        keep = 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            if last and not raw:
                break
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                    raise ValueError("not a log record")
            except ValueError:
                if last:  # cut short by a kill: dropped
                    break
                raise ArtifactError(
                    f"{self.path}:{number}: not a tune log line", hint="remove it, or --force"
                ) from None
            if number == 1:
                if record.get("format") != LOG_FORMAT or record.get("key") != "header":
                    raise ArtifactError(f"{self.path} is not a tune log ({LOG_FORMAT})")
                if record.get("inputs_sha256") != digest:
                    raise KvwError(
                        f"{self.path} was written by a tune with other inputs (model, data, search space or settings)",
                        hint="run without --resume and with --force to start over, or restore the inputs",
                    )
            else:
                self.done[record["key"]] = record
            keep += len(raw) + 1
        if keep == 0:
            raise ArtifactError(f"{self.path} has no header line", hint="remove it, or --force")
        return keep

    def write(self, key: str, record: dict[str, Any]) -> None:
        line = _dumps({"key": key, **record})
        self._stream.write(line + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self.done[key] = {"key": key, **json.loads(line)}

    def close(self) -> None:
        self._stream.close()
