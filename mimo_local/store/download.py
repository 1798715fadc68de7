"""Download one file over HTTP: resume inside a partial file with Range, retry with backoff, verify.

Bytes land in a `.part` file; a retry (or a later pull) continues from its size with a Range
request, so completed bytes are never fetched twice. The file is renamed into place only after
its size and hash (sha256 for LFS files, the git blob sha1 otherwise) match the hub's metadata.

The server is not trusted: at most the expected number of bytes is read (a longer body is an error
and the partial file is dropped), an answer to a Range request that cannot continue the partial
file (416, a wrong Content-Range) drops it and starts over once, and a transfer that stalls for
`read_timeout` seconds or runs slower than `min_speed` over that long is abandoned (and retried).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import MimoError

CHUNK = 1 << 20
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
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


@dataclass(frozen=True)
class TransferLimits:
    """When a download is given up as stalled or too slow (each abandoned attempt is retried)."""

    read_timeout: float = 60.0  # seconds without a byte; also the window `min_speed` is measured over
    min_speed: float = 1024.0  # bytes per second, averaged over `read_timeout` seconds; 0: no floor


class _Retry(Exception):
    """A failure worth another attempt (network trouble, a server error, a corrupt download)."""


class TooSlow(_Retry):
    """A transfer below the speed floor."""


class _Unusable(Exception):
    """An answer the resume logic cannot use (416, a wrong Content-Range): the partial file must go."""

    def __init__(self, message: str, ranged: bool):
        super().__init__(message)
        self.ranged = ranged  # the request asked for a range (a fresh request may still work)


class _Oversized(Exception):
    """The server sent (or announced) more bytes than the file has."""


class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects (LFS files live on a CDN) without sending the hub token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme not in ("http", "https"):
            refused = f"redirect to a {urlsplit(newurl).scheme or 'relative'} URL refused"
            raise urllib.error.HTTPError(newurl, code, refused, headers, fp)
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
    limits: TransferLimits = TransferLimits(),
    progress: Progress | None = None,
) -> None:
    """Fetch `url` into `dest` through `part`, resuming whatever `part` already holds.

    The caller has checked that `dest` and `part` lie inside its directory. A full disk raises the
    OSError (ENOSPC) as is, the partial file kept for a later resume.
    """
    progress = progress or Progress()
    part.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failure, attempt, started_over = "", 0, False
    while attempt <= retries:
        try:
            size, hasher = _fetch(url, part, expected, headers or {}, limits, progress)
        except _Retry as error:
            failure = str(error)
        except _Oversized as error:
            part.unlink(missing_ok=True)
            raise MimoError(f"{dest.name}: {error}; dropped the partial file") from None
        except _Unusable as error:
            part.unlink(missing_ok=True)
            if not error.ranged or started_over:
                raise MimoError(f"{dest.name}: {error}, even for the whole file; dropped the partial file") from None
            started_over = True  # once, at once, without using up an attempt
            continue
        else:
            problem = expected.check(size, hasher)
            if problem is None:
                os.replace(part, dest)
                return
            part.unlink()
            failure = f"corrupt download ({problem})"
        attempt += 1
        if attempt <= retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    raise MimoError(f"{dest.name}: {failure}; gave up after {retries + 1} attempts")


def _prefix(part: Path, expected: Expected):
    """Bytes already in `part` and a hasher fed with them (a partial file longer than the file is dropped)."""
    if part.is_symlink():
        part.unlink()  # never write through a link planted in our partial directory
    done = part.stat().st_size if part.exists() else 0
    if done > expected.size:
        part.unlink()
        done = 0
    hasher = hash_file(part, expected) if done else expected.hasher()
    return done, hasher


def _fetch(url: str, part: Path, expected: Expected, headers: dict, limits: TransferLimits, progress: Progress):
    done, hasher = _prefix(part, expected)
    progress.start(done)
    if done == expected.size:
        return done, hasher
    ranged = done > 0
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={done}-"} if ranged else {})})
    try:
        with _opener.open(request, timeout=limits.read_timeout) as response:
            if _body_offset(response, done, expected.size, ranged) == 0 and done:
                done, hasher = 0, expected.hasher()  # the server sent the whole file: start over
                progress.start(0)
            length = _content_length(response)
            if length is not None and length > expected.size - done:
                raise _Oversized(f"server announced {done + length} bytes, the file has {expected.size}")
            pace = Pace(limits, done)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                os.ftruncate(fd, done)
                os.lseek(fd, done, os.SEEK_SET)
                # read1: return whatever arrived, so a trickle cannot hide inside one long read;
                # one byte more than the rest of the file shows a body that is too long
                while chunk := response.read1(min(CHUNK, expected.size - done + 1)):
                    if done + len(chunk) > expected.size:
                        raise _Oversized(f"server sent more than the {expected.size} bytes of the file")
                    _write_all(fd, chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    done += len(chunk)
                    progress.advance(len(chunk))
                    pace.check(done)
            finally:
                os.close(fd)
    except urllib.error.HTTPError as error:
        _raise_for_status(error, url, ranged)
    except (TimeoutError, socket.timeout):
        raise _Retry(f"no data for {limits.read_timeout:g} s at byte {done} (read timeout)") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise _Retry(f"no answer within {limits.read_timeout:g} s (read timeout)") from None
        raise _Retry(f"connection failed at byte {done} ({_reason(error)})") from None
    except (http.client.HTTPException, ConnectionError) as error:
        raise _Retry(f"connection failed at byte {done} ({_reason(error)})") from None
    if done < expected.size:
        raise _Retry(f"connection closed at byte {done} of {expected.size}")
    return done, hasher


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Pace:
    """Abandons a transfer slower than `min_speed` bytes/s over any `read_timeout` seconds (raises TooSlow)."""

    def __init__(self, limits: TransferLimits, done: int):
        self.limits = limits
        self.since, self.at = time.monotonic(), done

    def check(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.since
        if elapsed < self.limits.read_timeout:
            return
        speed = (done - self.at) / elapsed
        if speed < self.limits.min_speed:
            raise TooSlow(
                f"transfer too slow at byte {done}: {speed:.0f} B/s over {elapsed:.1f} s, "
                f"below the floor of {self.limits.min_speed:g} B/s"
            )
        self.since, self.at = now, done


def _body_offset(response, done: int, size: int, ranged: bool) -> int:
    """Where the body starts in the file: 0 for a whole file, `done` for the range asked for."""
    if response.status == 200:
        return 0
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range is not None:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if match and int(match[1]) == done and int(match[2]) == size - 1 and match[3] in (str(size), "*"):
            return done
    got = f"with Content-Range {content_range!r}" if content_range is not None else "without a Content-Range"
    raise _Unusable(f"server answered {response.status} {got} to a request from byte {done} of {size}", ranged)


def _content_length(response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, TypeError, ValueError):
        return None


def _raise_for_status(error: urllib.error.HTTPError, url: str, ranged: bool):
    status = error.code
    if status in RETRY_STATUSES:
        raise _Retry(f"server answered {status} {_printable(error.reason)}") from None
    if status == 416:  # the partial file does not fit this file any more
        raise _Unusable("server answered 416 Range Not Satisfiable", ranged) from None
    if status == 401:
        raise MimoError(f"access denied to {url} (401): set HF_TOKEN to a token with access") from None
    if status == 403:
        raise MimoError(f"access forbidden to {url} (403): the repository may be gated; accept its terms on the hub") from None
    if status == 404:
        raise MimoError(f"{url} not found (404)") from None
    raise MimoError(f"{url}: server answered {status} {_printable(error.reason)}") from None


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return _printable(reason) or type(reason).__name__


def _printable(text: object, limit: int = 100) -> str:
    """A server's words for the one-line error: no control characters (terminal escapes), bounded."""
    cleaned = "".join(c if c.isprintable() else "?" for c in str(text))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
