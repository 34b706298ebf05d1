"""kvwctl push: against a local HTTP server that speaks the Hub endpoints an upload uses.

The server (``FakeHub``) answers ``POST /api/repos/create``, ``/api/models/{repo}/branch/{b}``,
``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}`` (every file ``regular``, so it is
sent inline, base64 in the commit's NDJSON) and ``/api/models/{repo}/commit/{rev}``, and records
what it received, so the tests compare the uploaded files byte for byte with the directory. Both
of huggingface_hub's upload paths are run: the single commit (``HF_HUB_DISABLE_XET``) and the
pipelined one used when ``hf_xet`` is installed (with only regular files it sends no xet data;
uploads of LFS/xet files, which large real shards need, are not tested).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from helpers import copy_checkpoint, expect_error, invoke
from huggingface_hub import constants

from kvwctl.apply import run_apply
from kvwctl.options import ApplyOptions
from kvwctl.source import ModelSpec

REPO = "kvw-tests/unlearned"
TOKEN = "hf_test_token"


class FakeHub(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []  # method, path, query
        self.created: list[dict[str, Any]] = []
        self.branches: list[str] = []
        self.commits: list[dict[str, Any]] = []  # revision, create_pr, summary, files {path: bytes}
        self.authorization: set[str | None] = set()
        self.refuse = False  # answer 401 to everything

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, {}))
        self.reply(404, {"error": f"not served: {self.path}"})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(("POST", url.path, query))
        self.server.authorization.add(self.headers.get("Authorization"))
        if self.server.refuse:
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        parts = url.path.strip("/").split("/")
        if url.path == "/api/repos/create":
            payload = json.loads(body)
            self.server.created.append(payload)
            return self.reply(200, {"url": f"{self.server.url}/{payload['organization']}/{payload['name']}"})
        if url.path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch":
            self.server.branches.append("/".join(parts[5:]))
            return self.reply(200, {})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False} for file in files]
            return self.reply(200, {"files": modes})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {}
            for line in lines:
                if line["key"] == "file":
                    assert line["value"]["encoding"] == "base64"
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] != "header":
                    return self.reply(400, {"error": f"not served: {line['key']}"})
            revision = "/".join(parts[5:])
            create_pr = query.get("create_pr") == ["1"]
            oid = f"{len(self.server.commits) + 1:040x}"
            self.server.commits.append(
                {"revision": revision, "create_pr": create_pr, "summary": header["summary"], "files": files}
            )
            repo = "/".join(parts[2:4])
            pr = {"pullRequestUrl": f"{self.server.url}/{repo}/discussions/1"} if create_pr else {}
            return self.reply(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid, **pr})
        return self.reply(404, {"error": f"not served: {url.path}"})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the single-commit path; one test lifts it
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def unlearned(checkpoints: dict[str, Path], accessor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("push")
    base = copy_checkpoint(checkpoints["qwen2"], root / "base")
    (base / "LICENSE").write_text("Base license terms\n")
    out = root / "unlearned"
    run_apply(ModelSpec(str(base)), accessor, out, ApplyOptions(gamma=0.5, layers="1:2"))
    return out


def directory_files(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes() for path in directory.rglob("*") if path.is_file()
    }


def test_push_uploads_every_file_byte_for_byte_and_prints_the_commit_url(hub: FakeHub, unlearned: Path) -> None:
    result = invoke("push", unlearned, REPO, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    assert hub.created == [{"name": "unlearned", "organization": "kvw-tests", "visibility": "public", "type": "model"}]
    assert hub.branches == []
    [commit] = hub.commits
    assert commit["revision"] == "main" and commit["create_pr"] is False
    assert commit["files"] == directory_files(unlearned)
    assert {"README.md", "LICENSE", "kvw_manifest.json", "config.json"} <= set(commit["files"])
    assert (
        commit["summary"]
        == "kvwctl 0.1.0: one-shot KVW of " + str(unlearned.parent / "base") + ", gamma 0.5, layers [1, 2]"
    )
    assert result.stdout == f"{hub.url}/{REPO}/commit/{1:040x}\n"
    assert hub.authorization == {f"Bearer {TOKEN}"}


def test_push_to_a_branch_privately(hub: FakeHub, unlearned: Path) -> None:
    result = invoke("push", unlearned, REPO, "--revision", "gamma-0.5", "--private", "--token", TOKEN, "--json")
    assert result.exit_code == 0, result.output
    assert hub.created[0]["visibility"] == "private"
    assert hub.branches == ["gamma-0.5"]
    assert [commit["revision"] for commit in hub.commits] == ["gamma-0.5"]
    summary = json.loads(result.stdout)
    assert summary == {
        "path": str(unlearned),
        "repo_id": REPO,
        "repo_url": f"{hub.url}/{REPO}",
        "revision": "gamma-0.5",
        "commit_url": f"{hub.url}/{REPO}/commit/{1:040x}",
        "commit": f"{1:040x}",
        "pr_url": None,
    }


def test_push_as_a_pull_request(hub: FakeHub, unlearned: Path) -> None:
    result = invoke("push", unlearned, REPO, "--create-pr", "--token", TOKEN)
    assert result.exit_code == 0, result.output
    [commit] = hub.commits
    assert commit["create_pr"] is True and commit["revision"] == "main"
    assert result.stdout == f"{hub.url}/{REPO}/discussions/1\n"


def test_push_through_the_pipelined_upload(hub: FakeHub, unlearned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With hf_xet installed, upload_folder streams through its pipeline; regular files still go inline."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    result = invoke("push", unlearned, REPO, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    received: dict[str, bytes] = {}
    for commit in hub.commits:
        received |= commit["files"]
    assert received == directory_files(unlearned)
    assert result.stdout.startswith(f"{hub.url}/{REPO}/commit/")


def test_a_refused_token_is_an_error_with_a_hint(hub: FakeHub, unlearned: Path) -> None:
    hub.refuse = True
    result = invoke("push", unlearned, REPO, "--token", "hf_wrong")
    expect_error(result, f"cannot push to {REPO}: Client error '401 Unauthorized' for url '{hub.url}/api/repos/create'")
    assert "hf auth login" in result.stderr
    assert hub.commits == []


def test_only_a_kvwctl_checkpoint_is_pushed(
    hub: FakeHub, checkpoints: dict[str, Path], unlearned: Path, tmp_path: Path
) -> None:
    expect_error(invoke("push", checkpoints["qwen2"], REPO, "--token", TOKEN), "has no kvw_manifest.json")
    tampered = copy_checkpoint(unlearned, tmp_path / "tampered")
    shard = sorted(tampered.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    expect_error(invoke("push", tampered, REPO, "--token", TOKEN), f"shard {shard.name}: sha256")
    no_card = copy_checkpoint(unlearned, tmp_path / "no-card")
    (no_card / "README.md").write_text("# my notes\n")
    expect_error(invoke("push", no_card, REPO, "--token", TOKEN), "has no model card written by kvwctl")
    assert hub.requests == []


def test_create_pr_with_a_revision_is_a_usage_error(hub: FakeHub, unlearned: Path) -> None:
    result = invoke("push", unlearned, REPO, "--create-pr", "--revision", "dev", "--token", TOKEN)
    expect_error(result, "--create-pr with --revision dev", exit_code=2)
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["no-owner", "a/b/c", "bad repo/x"])
def test_a_malformed_repository_id_is_a_usage_error(hub: FakeHub, unlearned: Path, repo: str) -> None:
    expect_error(invoke("push", unlearned, repo, "--token", TOKEN), f"{repo!r} is not a Hub repository id", exit_code=2)
    assert hub.requests == []


def test_quiet_push_prints_only_the_result(hub: FakeHub, unlearned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils.tqdm import enable_progress_bars

    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # the pipeline, which draws its own progress
    try:
        result = invoke("push", unlearned, REPO, "--token", TOKEN, "--quiet")
    finally:
        enable_progress_bars()
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith(f"{hub.url}/{REPO}/commit/")


def test_dry_run_lists_what_would_be_uploaded_and_sends_nothing(hub: FakeHub, unlearned: Path) -> None:
    result = invoke("push", unlearned, REPO, "--revision", "gamma-0.5", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    files = directory_files(unlearned)
    assert plan["dry_run"] is True and plan["repo_id"] == REPO and plan["revision"] == "gamma-0.5"
    assert plan["files"] == {name: len(content) for name, content in sorted(files.items())}
    assert plan["bytes"] == sum(len(content) for content in files.values())
    assert plan["commit_message"].startswith("kvwctl 0.1.0: one-shot KVW of ")
    assert hub.created == [] and hub.commits == [] and hub.branches == []
    bad = invoke("push", unlearned, REPO, "--create-pr", "--revision", "x", "--dry-run")
    assert bad.exit_code == 2 and "--create-pr with --revision x" in bad.stderr
