"""Download one file over HTTP: resume inside a partial file with Range, retry with backoff, verify.

Bytes land in a `.part` file; a retry (or a later pull) continues from its size with a Range
request, so completed bytes are never fetched twice. The file is renamed into place only after
its size and hash (sha256 for LFS files, the git blob sha1 otherwise) match the hub's metadata.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import MimoError

CHUNK = 1 << 20
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Expected:
    """What a verified file must be."""

    size: int
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # files stored in git: sha1 of "blob <size>\0" + content

    def hasher(self):
        if self.sha256:
            return hashlib.sha256()
        if self.git_sha1:
            hasher = hashlib.sha1()
            hasher.update(b"blob %d\0" % self.size)
            return hasher
        return None

    def check(self, size: int, hasher) -> str | None:
        """Why a file of `size` bytes hashed by `hasher` is not this one, or None when it is."""
        if size != self.size:
            return f"size {size} instead of {self.size}"
        want = self.sha256 or self.git_sha1
        if hasher is not None and hasher.hexdigest() != want:
            return f"{'sha256' if self.sha256 else 'git sha1'} {hasher.hexdigest()[:12]}... instead of {want[:12]}..."
        return None


class Progress:
    """Told how far a download is: `start(bytes_on_disk)` before each request, `advance(n)` per chunk."""

    def start(self, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


class _Retry(Exception):
    """A failure worth another attempt (network trouble, a server error, a corrupt download)."""


class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects (LFS files live on a CDN) without sending the hub token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_DropAuthOnRedirect)


def hash_file(path: Path, expected: Expected):
    hasher = expected.hasher()
    if hasher is not None:
        with open(path, "rb") as file:
            while chunk := file.read(CHUNK):
                hasher.update(chunk)
    return hasher


def download_file(
    url: str,
    dest: Path,
    part: Path,
    expected: Expected,
    *,
    headers: dict[str, str] | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> None:
    """Fetch `url` into `dest` through `part`, resuming whatever `part` already holds."""
    progress = progress or Progress()
    part.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failure = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            size, hasher = _fetch(url, part, expected, headers or {}, timeout, progress)
        except _Retry as error:
            failure = str(error)
            continue
        problem = expected.check(size, hasher)
        if problem is None:
            os.replace(part, dest)
            return
        part.unlink()
        failure = f"corrupt download ({problem})"
    raise MimoError(f"{dest.name}: {failure}; gave up after {retries + 1} attempts")


def _prefix(part: Path, expected: Expected):
    """Bytes already in `part` and a hasher fed with them (a partial file longer than the file is dropped)."""
    done = part.stat().st_size if part.exists() else 0
    if done > expected.size:
        part.unlink()
        done = 0
    hasher = hash_file(part, expected) if done else expected.hasher()
    return done, hasher


def _fetch(url: str, part: Path, expected: Expected, headers: dict, timeout: float, progress: Progress):
    done, hasher = _prefix(part, expected)
    progress.start(done)
    if done == expected.size:
        return done, hasher
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={done}-"} if done else {})})
    try:
        with _opener.open(request, timeout=timeout) as response:
            if done and not _continues_at(response, done):
                done, hasher = 0, expected.hasher()  # the server sent the whole file: start over
                progress.start(0)
            with open(part, "r+b" if done else "wb") as file:
                file.seek(done)
                file.truncate()
                while chunk := response.read(CHUNK):
                    file.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    done += len(chunk)
                    progress.advance(len(chunk))
    except urllib.error.HTTPError as error:
        _raise_for_status(error, url)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as error:
        raise _Retry(f"connection failed at byte {done} ({_reason(error)})") from None
    if done < expected.size:
        raise _Retry(f"connection closed at byte {done} of {expected.size}")
    return done, hasher


def _continues_at(response, offset: int) -> bool:
    content_range = response.headers.get("Content-Range", "")
    return response.status == 206 and content_range.startswith(f"bytes {offset}-")


def _raise_for_status(error: urllib.error.HTTPError, url: str):
    status = error.code
    if status in RETRY_STATUSES:
        raise _Retry(f"server answered {status} {error.reason}") from None
    if status == 416:  # the partial file does not fit this file any more
        raise _Retry("server answered 416 Range Not Satisfiable") from None
    if status == 401:
        raise MimoError(f"access denied to {url} (401): set HF_TOKEN to a token with access") from None
    if status == 403:
        raise MimoError(f"access forbidden to {url} (403): the repository may be gated; accept its terms on the hub") from None
    if status == 404:
        raise MimoError(f"{url} not found (404)") from None
    raise MimoError(f"{url}: server answered {status} {error.reason}") from None


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason) or type(reason).__name__
