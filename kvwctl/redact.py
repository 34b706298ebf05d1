"""``--redact``: outputs without the ids and paths of the data being deleted.

The by-products of unlearning hold the very data that is to be forgotten: a forget profile's
metadata lists every sample id and the data file's path, the accessor and the progressive
exposure file copy them, ``kvw_manifest.json`` records the input paths, and eval's per-sample file
holds every question, answer and generation. With ``--redact`` (or ``redact = true`` in kvw.toml,
or ``KVW_REDACT=true``) every id and path is replaced by a keyed hash and the texts are left out;
the file records ``redacted`` (``"true"`` in stage-file metadata, ``true`` in JSON) and
``redaction`` (the scheme). Numbers (sums, exposures, metrics, counts) and file hashes are kept.

    redactor = Redactor.create(enabled=True)
    redactor.text("p07-name")   # 64 hex digits: HMAC-SHA256(key, "p07-name")

**Why an HMAC and not a plain sha256.** Ids and file names are short and guessable
(``p07-name``, ``forget.jsonl``): a plain sha256 of one is reversed by hashing candidate names
until one matches. The hash is therefore an HMAC-SHA256 with a secret key:

* ``KVW_REDACT_KEY`` set (any text): the key. The same id gets the same hash in every file and
  every run, so redacted files can still be matched to each other, and whoever holds the key can
  check whether a given id was in a run (by computing its HMAC). Keep the key apart from the files.
* not set: a random 32-byte key drawn once per command and **never stored**. Nobody, the user
  included, can recover or test an id afterwards; hashes of the same id differ between runs (and
  between the files of different commands), so they only tell samples apart within one file.

The scheme is recorded as ``redaction``: ``hmac-sha256, key KVW_REDACT_KEY`` or
``hmac-sha256, random key not stored``. Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field

KEY_VARIABLE = "KVW_REDACT_KEY"
KEYED_SCHEME = f"hmac-sha256, key {KEY_VARIABLE}"
RANDOM_SCHEME = "hmac-sha256, random key not stored"


@dataclass(frozen=True)
class Redactor:
    """Replaces ids and paths by keyed hashes when ``enabled``; leaves them as they are otherwise."""

    enabled: bool
    scheme: str = ""
    key: bytes = field(default=b"", repr=False)

    @classmethod
    def create(cls, *, enabled: bool) -> Redactor:
        """A redactor keyed by ``KVW_REDACT_KEY`` if set, else by a fresh random key (module docstring)."""
        if not enabled:
            return cls(enabled=False)
        given = os.environ.get(KEY_VARIABLE)
        if given:
            return cls(enabled=True, scheme=KEYED_SCHEME, key=given.encode("utf-8"))
        return cls(enabled=True, scheme=RANDOM_SCHEME, key=secrets.token_bytes(32))

    def text(self, value: str) -> str:
        """``value`` itself, or its HMAC-SHA256 (64 hex digits) when redacting."""
        if not self.enabled:
            return value
        return hmac.new(self.key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def ids(self, ids: list[str]) -> list[str]:
        return [self.text(value) for value in ids]

    def id_list(self, encoded: str) -> str:
        """A JSON list of ids (as stage-file metadata holds them), each redacted."""
        if not self.enabled:
            return encoded
        return json.dumps(self.ids([str(value) for value in json.loads(encoded)]))

    def metadata(self) -> dict[str, str]:
        """The keys a redacted stage file's metadata records (none when not redacting)."""
        return {"redacted": "true", "redaction": self.scheme} if self.enabled else {}

    def record(self) -> dict[str, object]:
        """The keys a redacted JSON file records (none when not redacting)."""
        return {"redacted": True, "redaction": self.scheme} if self.enabled else {}
