"""Where a checkpoint comes from: a local directory as it is, or a Hub id resolved to a snapshot.

A Hub id is resolved with ``huggingface_hub.snapshot_download`` (safetensors, JSON, tokenizer and
template files, license files and the model card only), which honours ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and the cache; the resolved commit is recorded in every output. A name that can only be a local path
(``./x``, ``/x``, ``kvw-run/unlearned`` when ``kvw-run`` exists) and does not exist is an error
saying so, never a Hub lookup.

    resolve_model("llava-hf/llava-1.5-7b-hf", "main").path   # .../snapshots/<commit>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl.errors import ModelError, UsageError

HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "tokenizer*",
    # The base's license terms, carried into every output (kvwctl.card.is_license_file), and its
    # card, read for its license fields only: the output gets a card of its own.
    *(f"{name}*" for name in ("LICENSE", "LICENCE", "COPYING", "NOTICE", "USE_POLICY")),
    *(f"{name}*" for name in ("License", "license", "Licence", "licence", "Copying", "copying")),
    *(f"{name}*" for name in ("Notice", "notice", "Use_Policy", "use_policy")),
    "README.md",
]


@dataclass(frozen=True)
class ModelSpec:
    """A model as the user names it: a local directory or Hub id, and a revision for Hub ids."""

    reference: str
    revision: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint came from: the user's reference and the resolved revision."""

    path: Path
    reference: str
    revision: str | None  # the commit for Hub models; None for a local directory

    def describe(self) -> dict[str, Any]:
        return {"reference": self.reference, "revision": self.revision, "path": str(self.path)}


def resolve_model(reference: str, revision: str | None = None) -> ModelSource:
    """A local directory as it is, or a Hub id downloaded (or found in the cache)."""
    local = Path(reference).expanduser()
    if local.is_dir():
        if revision is not None:
            raise UsageError(
                f"--revision {revision} was given but {reference} is a local directory",
                hint="--revision applies to Hub ids only",
            )
        return ModelSource(path=local.resolve(), reference=reference, revision=None)
    if local.exists():
        raise ModelError(f"{reference} is a file; a model is a checkpoint directory or a Hub id")
    if _names_a_local_path(reference):
        raise ModelError(
            f"model directory {reference} does not exist",
            hint="check the path (a Hub id has the form owner/name and names no local directory)",
        )
    return _resolve_hub(reference, revision)


def _names_a_local_path(reference: str) -> bool:
    """Whether ``reference`` can only be meant as a local path, never as a Hub id (``owner/name``).

    Absolute, ``./``, ``../`` and ``~`` paths, a trailing slash, more than one ``/``, or a first
    component that is an existing directory (``kvw-run/unlearned``).
    """
    if reference.startswith(("/", "./", "../", "~", ".\\")) or reference.endswith(("/", "\\")):
        return True
    parts = reference.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _resolve_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except HFValidationError:
        raise ModelError(
            f"{repo_id} is neither a local directory nor a valid Hub id",
            hint="pass a checkpoint directory or an id such as llava-hf/llava-1.5-7b-hf",
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(f"model {repo_id} was not found on the Hub") from None
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision} of {repo_id} was not found on the Hub") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the Hub cache and cannot be downloaded{offline}",
            hint="download it once with network access, or pass a local checkpoint directory",
        ) from None
    except HfHubHTTPError as error:
        raise ModelError(f"cannot download {repo_id}: {error}") from None
    path = Path(snapshot)
    # The cache stores every snapshot under its commit hash (…/snapshots/<commit>/).
    return ModelSource(path=path, reference=repo_id, revision=path.name)
