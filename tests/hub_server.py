"""A minimal Hugging Face Hub look-alike on 127.0.0.1 for tests of the real ``huggingface_hub``.

It implements just what ``push_to_hub`` / ``upload_folder`` / ``snapshot_download`` /
``hf_hub_download`` (huggingface_hub 2.x) call::

    POST /api/repos/create                          create a model repo (409 if it exists)
    POST /api/validate-yaml                         README front-matter check (always valid)
    POST /api/models/{repo}/preupload/{rev}         every file is "regular" (inline base64)
    POST /api/models/{repo}/commit/{rev}            NDJSON commit: header, file, deletedFile
    GET  /api/models/{repo}[/revision/{rev}]        repo info with the head commit ``sha``
    GET  /api/models/{repo}/tree/{rev}              flat recursive file listing
    HEAD/GET /{repo}/resolve/{rev}/{file}           download with ETag + X-Repo-Commit headers
    GET  /api/whoami-v2                             the fake user

LFS/Xet uploads are never requested because preupload answers "regular" for every file.

Usage::

    with HubServer() as hub:
        hub.configure(monkeypatch, cache_dir=tmp_path / "hf")  # point the client at it
        tuner.push_to_hub("test-user/my-tuner")
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

USER = "test-user"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_REPO = re.compile(
    rf"^/api/models/{_REPO}(?:/(?P<action>revision|tree|preupload|commit)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$"
)
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def free_port() -> int:
    """A port nothing listens on (bound, then released): use it for an unreachable endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def head(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if not self.commits:
            return None
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


class HubServer:
    """The fake Hub; a context manager that serves on a random port in a daemon thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []
        self.fail_downloads: set[str] = set()  # file names answered with 500
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "HubServer is not running: use `with HubServer() as hub`"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def configure(self, monkeypatch: Any, cache_dir: str | Path | None = None) -> None:
        """Point huggingface_hub (constants are read at import) at this server and a tmp cache."""
        configure_client(monkeypatch, self.endpoint, cache_dir)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self.repos.get(repo_id)
            head = repo.head(revision) if repo else None
            return dict(head[1]) if head else {}


def configure_client(monkeypatch: Any, endpoint: str, cache_dir: str | Path | None = None) -> None:
    """Set the huggingface_hub constants (and env) for ``endpoint`` with ``monkeypatch``."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        # hf_xet (Rust) reads its cache/log folder from the environment when its session starts
        monkeypatch.setenv("HF_XET_CACHE", str(cache_dir.parent / "xet"))
        monkeypatch.setattr(constants, "HF_XET_CACHE", str(cache_dir.parent / "xet"))


class _NoWaitTime:
    """``time`` for huggingface_hub's retry loop with ``sleep`` a no-op (everything else real)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def skip_retry_waits(monkeypatch: Any) -> None:
    """The client retries connection errors 5 times with backoff (~23 s): keep the tries, not the waits."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", _NoWaitTime())


def set_offline(monkeypatch: Any, offline: bool = True) -> None:
    """HF_HUB_OFFLINE for the current process (the client reads it at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the log
        pass

    # --- plumbing -------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        length = headers.pop("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers)

    def _route(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
            if "Authorization" in self.headers:
                self.hub.authorizations.append(self.headers["Authorization"])
        body = self._body() if self.command in ("POST", "PUT") else b""
        if path == "/api/whoami-v2":
            return self._json(200, {"name": USER, "type": "user", "orgs": []})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and self.command == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if match := _API_REPO.match(path):
            return self._api_repo(match, body)
        if (match := _RESOLVE.match(path)) and self.command in ("GET", "HEAD"):
            return self._resolve(match["repo"], match["rev"], match["file"])
        self._error(404, "RepoNotFound", f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _route

    # --- endpoints ------------------------------------------------------------------------------

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = Repo()
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api_repo(self, match: re.Match[str], body: bytes) -> None:
        repo_id, action, rev = match["repo"], match["action"], match["rev"] or "main"
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if action == "preupload":
                return self._preupload(repo, rev, json.loads(body))
            if action == "commit":
                return self._commit(repo_id, repo, body)
            head = repo.head(rev)
            if head is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        sha, files = head
        if action == "tree":
            listing = [
                {"type": "file", "path": p, "size": len(c), "oid": git_blob_sha(c)}
                for p, c in sorted(files.items())
            ]
            return self._json(200, listing)
        siblings = [{"rfilename": p} for p in sorted(files)]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings},
        )

    def _preupload(self, repo: Repo, rev: str, payload: dict[str, Any]) -> None:
        head = repo.head(rev)
        existing = head[1] if head else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in payload["files"]
        ]
        self._json(200, {"files": files, "commitOid": head[0] if head else None})

    def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
        files = dict(repo.commits[-1][1]) if repo.commits else {}
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key != "header":
                return self._error(400, "BadRequest", f"this test Hub does not support {key!r}")
        digest = hashlib.sha1(repr((len(repo.commits), sorted(files.items()))).encode())
        sha = digest.hexdigest()
        repo.commits.append((sha, files))
        url = f"{self.hub.endpoint}/{repo_id}/commit/{sha}"
        self._json(200, {"commitUrl": url, "commitOid": sha, "success": True})

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        with self.hub.lock:
            repo = self.hub.repos.get(repo_id)
            head = repo.head(rev) if repo else None
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if head is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        sha, files = head
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", commit=sha)
        if filename in self.hub.fail_downloads and self.command == "GET":
            return self._error(500, "InternalError", "simulated server failure")
        content = files[filename]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(content)}"',
            "X-Repo-Commit": sha,
            "Content-Length": str(len(content)),
        }
        start = _range_start(self.headers.get("Range"))
        if start and self.command == "GET":
            part = content[start:]
            headers["Content-Length"] = str(len(part))
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            return self._send(206, part, headers)
        self._send(200, content if self.command == "GET" else b"", headers)


def _range_start(value: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", value or "")
    return int(match[1]) if match else 0


if __name__ == "__main__":  # manual use: python tests/hub_server.py
    with HubServer() as server:
        print(f"serving a test Hub at {server.endpoint} (pid {os.getpid()}); Ctrl-C to stop")
        threading.Event().wait()
