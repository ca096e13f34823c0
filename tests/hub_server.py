"""A loopback fake of the Hugging Face Hub HTTP API, for upload tests that must not touch the network.

It implements exactly the endpoints that ``huggingface_hub``'s ``HfApi.create_repo``, ``create_branch`` and
``create_commit`` call (see ``hf_api.py`` / ``_commit_api.py``):

- ``POST /api/repos/create``                          create a repo (409 when it exists); without an organization it
                                                      goes to the token's user, ``FAKE_USER``
- ``GET  /api/models/{ns}/{name}/tree/{rev}``         recursive listing of the files of a branch (one page)
- ``POST /api/validate-yaml``                         README metadata check, done with ``huggingface_hub.ModelCard``
                                                      parsing (the real Hub runs its own schema validation)
- ``POST /api/models/{ns}/{name}/branch/{branch}``    create a branch (409 when it exists)
- ``POST /api/models/{ns}/{name}/preupload/{rev}``    answers ``uploadMode: "regular"`` for every file, so the client
                                                      sends contents inline (no LFS / Xet transfer)
- ``POST /api/models/{ns}/{name}/commit/{rev}``       NDJSON commit with base64 file contents and
                                                      ``deletedFile`` lines; ``lfsFile`` and ``deletedFolder`` lines
                                                      are rejected (400) since this fake never asks for them

Committed files land under ``store / repo_id / path`` (branch ``main``) or ``store / f"{repo_id}@{branch}" / path``.
Every request is recorded in ``requests``; any other endpoint answers 404 and is also recorded in ``unknown_requests``.
Setting ``fail_commit = True`` makes the commit endpoint answer HTTP 500 without storing anything.
The server binds 127.0.0.1 only, on a free port.
"""

from __future__ import annotations

from contextlib import contextmanager

import base64
import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import ModelCard


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
FAKE_USER = "fake-user"
_GET_ROUTES = [
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)$")),
]
_ROUTES = [
    ("create_repo", re.compile(r"^/api/repos/create$")),
    ("validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("create_branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")),
    ("preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
]


@dataclass
class RecordedRequest:
    """One request the fake Hub received."""

    method: str
    path: str
    status: int
    authorization: str | None


class FakeHub:
    """Loopback fake Hub; use as a context manager: ``with FakeHub(tmp_path / "hub") as hub: ... hub.endpoint``."""

    def __init__(self, store: str | Path) -> None:
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.fail_commit = False
        self.requests: list[RecordedRequest] = []
        self.unknown_requests: list[RecordedRequest] = []
        self.validated_readmes: list[str] = []
        self.commits: list[dict[str, Any]] = []
        self._branches: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """Base URL to pass as ``endpoint=`` to ``HfApi`` / ``push_student``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def repo_dir(self, repo_id: str, revision: str = "main") -> Path:
        """Folder holding the files committed to ``repo_id`` at branch ``revision``."""
        return self.store / (repo_id if revision == "main" else f"{repo_id}@{revision}")

    def uploaded_files(self, repo_id: str, revision: str = "main") -> set[str]:
        """Relative POSIX paths of the files committed to ``repo_id`` at ``revision``."""
        root = self.repo_dir(repo_id, revision)
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any], bool]:
        """Route one request; returns ``(status, json body, whether the endpoint is implemented)``."""
        routes = {"POST": _ROUTES, "GET": _GET_ROUTES}.get(method)
        if routes:
            for name, pattern in routes:
                match = pattern.match(path)
                if match:
                    with self._lock:
                        status, payload = getattr(self, f"_{name}")(body, **match.groupdict())
                    return status, payload, True
        return 404, {"error": f"fake Hub: no endpoint {method} {path}"}, False

    def _create_repo(self, body: bytes) -> tuple[int, dict[str, Any]]:
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            return 400, {"error": f"fake Hub only hosts model repos, got type={payload.get('type')!r}"}
        repo_id = f"{payload.get('organization') or FAKE_USER}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._branches:
            return 409, {"error": "You already created this model repo", "url": url}
        self._branches[repo_id] = {"main"}
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=True)
        return 200, {"url": url, "name": repo_id}

    def _validate_yaml(self, body: bytes) -> tuple[int, dict[str, Any]]:
        content = json.loads(body)["content"]
        self.validated_readmes.append(content)
        try:
            ModelCard(content)
        except Exception as err:  # any parse failure is a validation error for the client
            return 400, {"errors": [{"message": f"{type(err).__name__}: {err}"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _create_branch(self, body: bytes, repo: str, rev: str) -> tuple[int, dict[str, Any]]:
        if repo not in self._branches:
            return 404, {"error": f"Repository {repo} not found"}
        if rev in self._branches[repo]:
            return 409, {"error": f"Branch {rev} already exists"}
        self._branches[repo].add(rev)
        shutil.copytree(self.repo_dir(repo), self.repo_dir(repo, rev), dirs_exist_ok=True)  # a branch starts at main
        return 200, {}

    def _tree(self, body: bytes, repo: str, rev: str) -> tuple[int, dict[str, Any] | list[dict[str, Any]]]:
        if repo not in self._branches or rev not in self._branches[repo]:
            return 404, {"error": f"Repository {repo} or revision {rev} not found"}
        root = self.repo_dir(repo, rev)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return 200, [
            {"type": "file", "path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
             "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
            for p in files
        ]

    def _preupload(self, body: bytes, repo: str, rev: str) -> tuple[int, dict[str, Any]]:
        if repo not in self._branches or rev not in self._branches[repo]:
            return 404, {"error": f"Repository {repo} or revision {rev} not found"}
        files = json.loads(body)["files"]
        return 200, {
            "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
        }

    def _commit(self, body: bytes, repo: str, rev: str) -> tuple[int, dict[str, Any]]:
        if repo not in self._branches or rev not in self._branches[repo]:
            return 404, {"error": f"Repository {repo} or revision {rev} not found"}
        if self.fail_commit:
            return 500, {"error": "fake Hub: commit endpoint switched to fail"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "commit payload must start with a header line"}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        root = self.repo_dir(repo, rev)
        for line in lines[1:]:
            key = line.get("key")
            inline = key == "file" and line["value"].get("encoding") == "base64"
            if not (inline or key == "deletedFile"):
                return 400, {"error": f"fake Hub accepts only inline base64 files and deletedFile, got {key!r}"}
            path = PurePosixPath(line["value"]["path"])
            if path.is_absolute() or ".." in path.parts:
                return 400, {"error": f"invalid path {path}"}
            if inline:
                files[str(path)] = base64.b64decode(line["value"]["content"])
            elif (root / path).is_file():
                deleted.append(str(path))
            else:
                return 404, {"error": f"cannot delete {path}: no such file in {repo}@{rev}"}
        for path in deleted:
            (root / path).unlink()
        for path, content in files.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(content)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo_id": repo, "revision": rev, "header": lines[0]["value"], "paths": sorted(files),
                             "deleted": sorted(deleted)})
        return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            path = self.path.split("?", 1)[0]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload, known = hub.handle(self.command, path, body)
            record = RecordedRequest(self.command, path, status, self.headers.get("Authorization"))
            hub.requests.append(record)
            if not known:
                hub.unknown_requests.append(record)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", payload.get("error", "invalid request"))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default stderr access log."""

    return Handler


@contextmanager
def online(monkeypatch, hub: FakeHub):
    """Let huggingface_hub make HTTP calls (tests run offline), with its default endpoint also at the fake Hub."""
    import huggingface_hub.constants

    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        yield
