"""Upload a kvwctl checkpoint to the Hugging Face Hub.

    kvwctl push unlearned/ me/llava-forget-p07                    # main branch, public repo
    kvwctl push unlearned/ me/llava-forget-p07 --private --create-pr
    kvwctl push unlearned/ me/llava-forget-p07 --revision gamma-0.02

The directory is checked first, as ``kvwctl verify DIR`` checks it (the manifest is well-formed,
every shard has its sha256, no extra weight file, the output fingerprint), and it must carry a
card kvwctl wrote (``README.md``; ``kvwctl card DIR`` writes one). Then ``HfApi.create_repo``
(``exist_ok=True``, ``private``), ``HfApi.create_branch`` for a ``--revision`` other than
``main`` (``exist_ok=True``), and one ``HfApi.upload_folder`` of the directory (hidden files
left out). The endpoint and the token are huggingface_hub's (``HF_ENDPOINT``, ``HF_TOKEN`` or the
saved login) unless ``--token`` is given. Errors from the Hub (HTTP errors, a missing or refused
token, no connection, ``HF_HUB_OFFLINE``) are kvwctl errors (exit 1) with a hint. ``--dry-run``
(:func:`plan_push`) makes the checks that need neither the network nor hashing (the manifest, the
chain, every shard present, the card) and lists the files that would be uploaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvwctl import __version__
from kvwctl.card import CARD_FILE, is_kvwctl_card
from kvwctl.errors import KvwError, UsageError
from kvwctl.options import VerifyOptions
from kvwctl.progress import NullTracker, Tracker

DEFAULT_BRANCH = "main"
# kvwctl skips hidden entries when it reads a checkpoint; they are not uploaded either.
IGNORED = [".*", "*/.*"]


@dataclass(frozen=True)
class PushResult:
    path: Path
    repo_id: str
    repo_url: str
    revision: str
    commit_url: str
    commit_oid: str
    pr_url: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "repo_url": self.repo_url,
            "revision": self.revision,
            "commit_url": self.commit_url,
            "commit": self.commit_oid,
            "pr_url": self.pr_url,
        }


def commit_message(manifest: dict[str, Any]) -> str:
    """``kvwctl 0.1.0: one-shot KVW of BASE, gamma 0.02, layers [1, 2]``."""
    return (
        f"kvwctl {__version__}: {manifest['mode']} KVW of {manifest['input_model']['reference']}, "
        f"gamma {manifest['gamma']}, layers {manifest['layers']}"
    )


@dataclass(frozen=True)
class PushPlan:
    """A push checked without the network and without hashing: what would be uploaded, where."""

    checkpoint_dir: Path
    repo_id: str
    revision: str
    private: bool
    create_pr: bool
    files: dict[str, int]  # relative path -> size in bytes, hidden entries left out
    message: str
    command: str = "push"

    def facts(self) -> dict[str, Any]:
        """What ``push --dry-run`` prints (``kvwctl.plans``)."""
        return {
            "command": self.command,
            "checkpoint": str(self.checkpoint_dir),
            "repo_id": self.repo_id,
            "revision": self.revision,
            "private": self.private,
            "create_pr": self.create_pr,
            "commit_message": self.message,
            "files": self.files,
            "bytes": sum(self.files.values()),
            "checked": "manifest, chain and shards present, kvwctl card; shard sha256 and fingerprint by the real push",
        }


def plan_push(checkpoint_dir: Path, repo_id: str, *, revision: str | None, private: bool, create_pr: bool) -> PushPlan:
    """Every check of ``run_push`` that needs neither the network nor hashing the shards."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils._validators import validate_repo_id  # re-exported by utils, untyped there

    from kvwctl.verify import plan_verify, read_manifest

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{repo_id!r} is not a Hub repository id: {error}", hint="pass owner/name") from None
    if "/" not in repo_id:
        raise UsageError(f"{repo_id!r} is not a Hub repository id: it has no owner", hint="pass owner/name")
    branch = revision or DEFAULT_BRANCH
    if create_pr and branch != DEFAULT_BRANCH:
        raise UsageError(
            f"--create-pr with --revision {revision}: a pull request is opened against {DEFAULT_BRANCH}",
            hint="drop --revision, or push to the branch without --create-pr",
        )
    plan_verify(checkpoint_dir, VerifyOptions(), base=None, accessor=None)
    card = checkpoint_dir / CARD_FILE
    if not card.is_file() or not is_kvwctl_card(card):
        raise KvwError(
            f"{checkpoint_dir} has no model card written by kvwctl ({CARD_FILE})",
            hint=f"write one with kvwctl card {checkpoint_dir}",
        )
    files = {
        path.relative_to(checkpoint_dir).as_posix(): path.stat().st_size
        for path in sorted(checkpoint_dir.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(checkpoint_dir).parts)
    }
    return PushPlan(
        checkpoint_dir=checkpoint_dir,
        repo_id=repo_id,
        revision=branch,
        private=private,
        create_pr=create_pr,
        files=files,
        message=commit_message(read_manifest(checkpoint_dir)),
    )


def run_push(
    checkpoint_dir: Path,
    repo_id: str,
    *,
    revision: str | None,
    private: bool,
    create_pr: bool,
    token: str | None,
    tracker: Tracker | None = None,
) -> PushResult:
    """Check ``checkpoint_dir`` (verify's checks without a base, a kvwctl card), then upload it."""
    plan = plan_push(checkpoint_dir, repo_id, revision=revision, private=private, create_pr=create_pr)
    return execute_push(plan, token=token, tracker=tracker)


def execute_push(plan: PushPlan, *, token: str | None, tracker: Tracker | None = None) -> PushResult:
    """Verify the shards' hashes and the fingerprint, then create the repository and upload."""
    from huggingface_hub import HfApi

    from kvwctl.verify import run_verify

    checkpoint_dir, repo_id, branch, create_pr = plan.checkpoint_dir, plan.repo_id, plan.revision, plan.create_pr
    run_verify(checkpoint_dir, VerifyOptions(), base=None, accessor=None, tracker=tracker or NullTracker())
    api = HfApi(token=token)
    with hub_errors(repo_id):
        repo = api.create_repo(repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=checkpoint_dir,
            repo_type="model",
            revision=None if create_pr else branch,
            create_pr=create_pr,
            commit_message=plan.message,
            ignore_patterns=list(IGNORED),
        )
    return PushResult(
        path=checkpoint_dir,
        repo_id=repo_id,
        repo_url=str(repo),
        revision=branch,
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
        pr_url=commit.pr_url,
    )


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into kvwctl errors (exit 1) with a hint; never a traceback."""
    from httpx2 import HTTPError
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        yield
    except HFValidationError as error:  # a --revision that is not a valid branch name, for instance
        raise UsageError(f"cannot push to {repo_id}: {error}") from None
    except OfflineModeIsEnabled:
        raise KvwError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        hint = {
            401: "log in with `hf auth login`, or pass --token or set HF_TOKEN",
            403: "the token may not write to this repository: check its permissions",
        }.get(status, "check the repository id, the token and the Hub's status")
        raise KvwError(f"cannot push to {repo_id}: {str(error).splitlines()[0]}", hint=hint) from None
    except HTTPError as error:  # no connection, a timeout
        raise KvwError(
            f"cannot push to {repo_id}: {type(error).__name__}: {error}",
            hint="check the network connection and HF_ENDPOINT",
        ) from None
