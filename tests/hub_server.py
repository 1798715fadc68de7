"""A real HTTP server on 127.0.0.1 speaking the Hugging Face Hub endpoints that `mimo pull` uses.

- GET /api/models/{repo}/revision/{rev}?blobs=true: model info with siblings (size, blobId, lfs).
- GET|HEAD /{repo}/resolve/{rev}/{file}: small files directly (ETag = git blob sha1), LFS files by a
  302 redirect to a second server (the "CDN", another host:port) with X-Linked-Etag/X-Linked-Size,
  as the hub does. Both honour Range (206 + Content-Range, 416 past the end).
- Errors the hub's way: 404 + X-Error-Code RepoNotFound / RevisionNotFound, 401 for private repos
  without a token, 401 + "Invalid credentials in Authorization header" for a wrong token.

Faults for tests: `fail[key] = [status, ...]` answers the next requests for `key` ("api" or a file
name) with those statuses; `cut[file] = n` ends the next body of that file after n bytes;
`corrupt.add(file)` flips one byte in the next body of that file. `served[file]` counts body bytes
sent, `requests` logs (method, path, headers) of every request.

Hostile behaviour (tests/test_hostile_hub.py): any name can be put in `repo.files` (it is listed as
is); `oversize[file] = n` sends n bytes too many (Content-Length included); `endless.add(file)`
sends bodies without Content-Length that never end; `range_answer[file] = (status, content_range)`
answers every Range request for that file so (content_range None: no header), `answer[file]` every
request; `repo.overrides[file]` replaces fields of its file list entry, `raw_info[repo]` is sent as
the whole model info body; `stall[file] = n`
sends n bytes, then nothing until the server closes; `trickle[file] = seconds` sends one byte per
`seconds`. The key "api" applies these to the model info answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_PATTERNS = (".safetensors", "tokenizer.json")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubRepo:
    def __init__(self, repo_id: str, directory: Path, commit: str):
        self.repo_id, self.commit = repo_id, commit
        self.overrides: dict[str, dict] = {}
        self.files = {
            str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*"))
            if path.is_file() and ".mimo-runtime" not in path.relative_to(directory).parts  # a local load's cache
        }

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_PATTERNS)

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(name):
            sha = hashlib.sha256(data).hexdigest()
            entry["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
            entry["blobId"] = git_blob_sha1(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n".encode())
        return {**entry, **self.overrides.get(name, {})}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up on a hostile body is expected
            super().handle_error(request, client_address)


class HubServer:
    def __init__(self):
        self.repos: dict[str, HubRepo] = {}
        self.revisions: dict[tuple[str, str], str] = {}  # (repo, branch or tag) -> commit
        self.token: str | None = None  # when set, every repo is private to this token
        self.fail: dict[str, list[int]] = {}
        self.cut: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.oversize: dict[str, int] = {}
        self.endless: set[str] = set()
        self.range_answer: dict[str, tuple[int, str | None]] = {}
        self.answer: dict[str, tuple[int, str | None]] = {}
        self.raw_info: dict[str, bytes] = {}
        self.reason: str | None = None  # the reason phrase of hostile error answers
        self.stall: dict[str, int] = {}
        self.trickle: dict[str, float] = {}
        self.closing = threading.Event()
        self.served: Counter = Counter()
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.hub = self._serve()
        self.cdn = self._serve()
        self.url = f"http://127.0.0.1:{self.hub.server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_port}"

    def _serve(self) -> ThreadingHTTPServer:
        server = _QuietServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def add_repo(self, repo_id: str, directory: Path, revisions: tuple[str, ...] = ("main",)) -> HubRepo:
        commit = hashlib.sha1(f"{repo_id}:{len(self.repos)}".encode()).hexdigest()
        repo = self.repos[repo_id] = HubRepo(repo_id, Path(directory), commit)
        for revision in (*revisions, commit):
            self.revisions[(repo_id, revision)] = commit
        return repo

    def take_failure(self, key: str) -> int | None:
        with self.lock:
            statuses = self.fail.get(key)
            return statuses.pop(0) if statuses else None

    def close(self) -> None:
        self.closing.set()
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._route(body=False)

        def do_GET(self):
            self._route(body=True)

        def _route(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path, dict(self.headers)))
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                return self._model_info(match[1], match[2] or "main")
            if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(match[1], match[2], match[3], body)
            if match := re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", path):
                return self._file(hub.repos[match[1]], match[2], body)
            self._error(404, "EntryNotFound", "not found")

        def _error(self, status: int, code: str | None, message: str, extra: dict | None = None,
                   reason: str | None = None):
            payload = json.dumps({"error": message}).encode()
            self.send_response(status, reason)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _authorized(self, repo_id: str) -> bool:
            if repo_id not in hub.repos:
                self._error(404, "RepoNotFound", "Repository not found")
                return False
            if hub.token is None:
                return True
            given = self.headers.get("Authorization")
            if given is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return False
            if given != f"Bearer {hub.token}":
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            return True

        def _model_info(self, repo_id: str, revision: str):
            if (status := hub.take_failure("api")) is not None:
                return self._error(status, None, "Internal Error")
            if not self._authorized(repo_id):
                return
            commit = hub.revisions.get((repo_id, revision))
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            if repo_id in hub.raw_info:
                return self._send(200, hub.raw_info[repo_id], {"Content-Type": "application/json"}, True)
            repo = hub.repos[repo_id]
            info = {
                "_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": hub.token is not None,
                "siblings": [repo.sibling(name) for name in repo.files], "tags": [], "downloads": 0, "likes": 0,
            }
            payload, headers = json.dumps(info).encode(), {"Content-Type": "application/json"}
            if not self._hostile("api", payload, 200, headers):
                self._send(200, payload, headers, True)

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool):
            if (status := hub.take_failure(name)) is not None:
                return self._error(status, None, "Internal Error")
            if not self._authorized(repo_id):
                return
            commit = hub.revisions.get((repo_id, revision))
            repo = hub.repos[repo_id]
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            if name not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found")
            if not repo.is_lfs(name):
                return self._file(repo, name, body)
            data = repo.files[name]
            self._send(302, b"", {
                "Location": f"{hub.cdn_url}/cdn/{repo_id}/{name}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(data)}"',
            }, body)

        def _file(self, repo: HubRepo, name: str, body: bool):
            data = repo.files[name]
            headers = {
                "Accept-Ranges": "bytes",
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{hashlib.sha256(data).hexdigest() if repo.is_lfs(name) else git_blob_sha1(data)}"',
            }
            status, start = 200, 0
            hostile = hub.answer.get(name) or (hub.range_answer.get(name) if self.headers.get("Range") else None)
            if hostile:
                status, content_range = hostile
                if content_range is not None:
                    headers["Content-Range"] = content_range
                if status >= 400:
                    return self._error(status, None, "hostile", headers, reason=hub.reason)
                headers["Content-Length"] = str(len(data))
                return self._send(status, data, headers, body, served_as=name)
            if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start = int(match[1])
                end = int(match[2]) + 1 if match[2] else len(data)
                if start >= len(data):
                    return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                data = data[start:end]
            else:
                end = len(data)
            with hub.lock:
                cut = hub.cut.pop(name, None) if body else None
                corrupt = body and name in hub.corrupt
                hub.corrupt.discard(name)
            if corrupt:
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0xFF
                data = bytes(flipped)
            if body and self._hostile(name, data, status, headers):
                return
            headers["Content-Length"] = str(len(data))
            self._send(status, data[:cut] if cut is not None else data, headers, body, served_as=name)
            if cut is not None:
                self.close_connection = True

        def _hostile(self, name: str, data: bytes, status: int, headers: dict) -> bool:
            """Serve `name` the hostile way set for it, if any (True when the answer was sent)."""
            with hub.lock:
                extra = hub.oversize.pop(name, None)
                stall = hub.stall.pop(name, None)
                trickle = hub.trickle.pop(name, None)
                endless = name in hub.endless
            if extra is not None:
                headers["Content-Length"] = str(len(data) + extra)
                self._send(status, data + b"x" * extra, headers, True, served_as=name)
                return True
            if endless or stall is not None or trickle is not None:
                if stall is not None or trickle is not None:
                    headers["Content-Length"] = str(len(data))
                headers["Connection"] = "close"
                self.close_connection = True
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    if endless:
                        self._write_until_hangup(data + b"y" * (1 << 16))
                    elif stall is not None:
                        self._write_counted(name, data[:stall])
                        hub.closing.wait(60)
                    else:
                        for index in range(len(data)):
                            self._write_counted(name, data[index:index + 1])
                            if hub.closing.wait(trickle):
                                break
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should
                return True
            return False

        def _write_counted(self, name: str, payload: bytes) -> None:
            self.wfile.write(payload)
            self.wfile.flush()
            with hub.lock:
                hub.served[name] += len(payload)

        def _write_until_hangup(self, block: bytes) -> None:
            for _ in range((256 << 20) // len(block)):  # bounded, in case a client never hangs up
                if hub.closing.is_set():
                    return
                self.wfile.write(block)

        def _send(self, status: int, payload: bytes, headers: dict, body: bool, served_as: str | None = None):
            """Send `payload` (for a cut file, fewer bytes than the Content-Length already in `headers`)."""
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(payload)
                if served_as is not None:
                    with hub.lock:
                        hub.served[served_as] += len(payload)

    return Handler
