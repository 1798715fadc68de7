"""`mimo pull`: read a repository's file list through huggingface_hub, then download and verify it.

The manifest (`.mimo/manifest.json`) is written last and atomically: a model directory counts as
complete only once every file in it has been verified.

The file list is not trusted: every name in it must be a safe relative path (repo_paths.py) or the
whole pull is refused before anything is written, and every write stays inside the model
directory as resolved on disk (a symbolic link inside it cannot lead a file elsewhere).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from .download import DISK_FULL_ERRNOS, Expected, Pace, Progress, TooSlow, TransferLimits, download_file
from ..errors import MimoError
from .names import MANIFEST, SOURCE, STATE_DIR, ModelRef, parse_name, write_json_atomic
from .repo_paths import conflicting_names, unsafe_reason

DEFAULT_ENDPOINT = "https://huggingface.co"
DISK_MARGIN = 256 << 20  # keep this much free after a pull
MAX_METADATA_BYTES = 64 << 20  # the hub's file list of a repository (100k files is about 30 MB)
READ_TIMEOUT_ENV = "MIMO_PULL_READ_TIMEOUT"  # defaults for --read-timeout / --min-speed
MIN_SPEED_ENV = "MIMO_PULL_MIN_SPEED"


@dataclass(frozen=True)
class RemoteFile:
    path: str
    expected: Expected


@dataclass
class PullPlan:
    ref: ModelRef
    endpoint: str
    commit: str
    files: list[RemoteFile]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    retries: int = 5
    backoff: float = field(default=0.5, repr=False)
    limits: TransferLimits = field(default_factory=lambda: transfer_limits())

    @property
    def size(self) -> int:
        return sum(f.expected.size for f in self.files)

    @property
    def size_text(self) -> str:
        return format_bytes(self.size)


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def transfer_limits(read_timeout: float | None = None, min_speed: float | None = None) -> TransferLimits:
    """The stall and speed limits: the values given, else $MIMO_PULL_READ_TIMEOUT / $MIMO_PULL_MIN_SPEED,
    else 60 s and 1 KiB/s."""
    defaults = TransferLimits()
    if read_timeout is None:
        read_timeout = _env_number(READ_TIMEOUT_ENV, defaults.read_timeout)
    if min_speed is None:
        min_speed = _env_number(MIN_SPEED_ENV, defaults.min_speed)
    if not (math.isfinite(read_timeout) and read_timeout > 0):
        raise MimoError(f"--read-timeout must be a number of seconds > 0, not {read_timeout:g}")
    if not (math.isfinite(min_speed) and min_speed >= 0):
        raise MimoError(f"--min-speed must be bytes per second >= 0 (0: no floor), not {min_speed:g}")
    return TransferLimits(read_timeout, min_speed)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise MimoError(f"${name} must be a number, not {text[:40]!r}") from None


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def offline_error(ref: ModelRef, reason: str = "HF_HUB_OFFLINE is set") -> MimoError:
    return MimoError(
        f"{ref.name} ({ref.repo_id}) is not in the local store and the hub cannot be reached ({reason}): "
        f"run `{ref.pull_command}` when online, or pass a model directory"
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Transport failures of whichever HTTP client this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [OSError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        errors += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(errors)


def _hub_error(error: Exception, ref: ModelRef, url: str) -> MimoError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = ref.repo_id
    if isinstance(error, OfflineModeIsEnabled):
        return offline_error(ref)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        return MimoError(f"{repo} is gated: accept its terms at {url}/{repo} and set HF_TOKEN to a token with access")
    if isinstance(error, RevisionNotFoundError):
        return MimoError(f"revision '{ref.revision}' not found in {repo} on {url}")
    if isinstance(error, RepositoryNotFoundError):
        if status == 401:
            return MimoError(
                f"access denied to {repo} on {url} (401): it is private, gated or misspelt; "
                "set HF_TOKEN to a token with access"
            )
        return MimoError(f"{repo} not found on {url} ({status or 404}): check the name")
    if isinstance(error, HfHubHTTPError):
        if status == 401:
            return MimoError(f"{url} rejected the token (401): check HF_TOKEN")
        if status == 403:
            return MimoError(f"access to {repo} forbidden on {url} (403): check the token's permissions")
        if status is not None and status >= 500:
            return MimoError(f"{url} answered {status} for {repo}: the hub is having trouble, try again later")
        return MimoError(f"{url} answered {status} for {repo}")
    if isinstance(error, _connection_errors()):
        return offline_error(ref, f"cannot reach {url}: {error or type(error).__name__}")
    raise error


def matches(path: str, pattern: str) -> bool:
    """huggingface_hub's allow_patterns (fnmatch; a trailing '/' means everything below), except that
    the wildcards of a pattern without '/' never match across '/': '*.json' names top-level files only."""
    if pattern.endswith("/"):
        pattern += "*"
    if "/" not in pattern and "/" in path:
        return False
    return fnmatch.fnmatchcase(path, pattern)


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(matches(path, pattern) for pattern in include):
        return False
    return not any(matches(path, pattern) for pattern in exclude)


def _shown(name: object) -> str:
    text = repr(name)  # escapes control characters: the message stays one line
    return text if len(text) <= 120 else text[:117] + "..."


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value) is not None


def _remote_files(siblings: list, ref: ModelRef, url: str) -> list[RemoteFile]:
    """Every entry of the hub's file list, checked: safe names, sizes and hashes of the right form."""
    refuse = f"refusing to pull {ref.repo_id}: the file list from {url}"
    files = []
    for sibling in siblings:
        name = sibling.rfilename
        if reason := unsafe_reason(name, reserved=(STATE_DIR,)):
            raise MimoError(f"{refuse} names {_shown(name)} ({reason}); nothing was written")
        lfs = sibling.lfs
        if lfs is not None:
            if not (_is_size(lfs.size) and _is_hex(lfs.sha256, 64)):
                raise MimoError(f"{refuse} gives {_shown(name)} an invalid size or sha256; nothing was written")
            files.append(RemoteFile(name, Expected(size=lfs.size, sha256=lfs.sha256.lower())))
        elif sibling.size is not None:
            if not (_is_size(sibling.size) and (sibling.blob_id is None or _is_hex(sibling.blob_id, 40))):
                raise MimoError(f"{refuse} gives {_shown(name)} an invalid size or git hash; nothing was written")
            blob = sibling.blob_id.lower() if sibling.blob_id else None
            files.append(RemoteFile(name, Expected(size=sibling.size, git_sha1=blob)))
        else:
            raise MimoError(f"{url} gave no size for {ref.repo_id}/{name}: cannot verify it")
    names = [f.path for f in files]
    clash = conflicting_names(names)
    if clash is None and (clash := conflicting_names([name + ".part" for name in names])):
        # "a" and "a.part/b": their partial files cannot both exist
        clash = (clash[0].removesuffix(".part"), clash[1].removesuffix(".part"))
    if clash:
        raise MimoError(
            f"{refuse} names both {_shown(clash[0])} and {_shown(clash[1])}, which cannot be stored side by side "
            "(the same name twice, or a file that is also a folder); nothing was written"
        )
    return files


def fetch_plan(
    ref: ModelRef,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    retries: int = 5,
    limits: TransferLimits | None = None,
) -> PullPlan:
    """The files to pull, with sizes and hashes, from the hub's metadata for one commit."""
    if ref.kind != "hub":
        raise MimoError(f"{ref.name} is a {'packaged demo model' if ref.kind == 'demo' else 'local directory'}: nothing to pull")
    url = endpoint()
    if offline():
        raise offline_error(ref)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError

    limits = limits or transfer_limits()
    try:
        with _bounded_answers(limits):
            info = HfApi(endpoint=url, library_name="mimo-local").model_info(
                ref.repo_id, revision=ref.revision or "main", files_metadata=True, timeout=limits.read_timeout
            )
    except _TooLarge:
        raise MimoError(
            f"{url} sent more than {format_bytes(MAX_METADATA_BYTES)} of metadata for {ref.repo_id}: refused"
        ) from None
    except TooSlow as error:
        raise MimoError(f"{url} sent the metadata of {ref.repo_id} too slowly ({error})") from None
    except HFValidationError as error:
        raise MimoError(f"invalid hub repo id {ref.repo_id}: {str(error).splitlines()[0]}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        detail = " ".join(str(error).split())[:200]
        raise MimoError(f"{url} sent malformed metadata for {ref.repo_id} ({type(error).__name__}: {detail})") from None
    except Exception as error:  # noqa: BLE001 - turned into a one-line message or re-raised
        raise _hub_error(error, ref, url) from None
    if not isinstance(info.siblings or [], list) or not (info.sha is None or _is_hex_commit(info.sha)):
        raise MimoError(f"{url} sent malformed metadata for {ref.repo_id} (file list or commit)")
    files = [f for f in _remote_files(info.siblings or [], ref, url) if _selected(f.path, include, exclude)]
    if not files:
        raise MimoError(f"no files of {ref.repo_id} match --include/--exclude")
    return PullPlan(
        ref, url, info.sha or ref.revision or "main", files, tuple(include), tuple(exclude), retries,
        limits=limits,
    )


class _TooLarge(Exception):
    pass


@contextlib.contextmanager
def _bounded_answers(limits: TransferLimits):
    """Within the block, huggingface_hub's answers (which it reads whole into memory) are capped at
    MAX_METADATA_BYTES and abandoned below the speed floor, so a hostile endpoint cannot fill memory
    or trickle forever."""
    import importlib

    from huggingface_hub.utils import get_session

    session = get_session()
    if not hasattr(session, "event_hooks"):  # an older huggingface_hub on requests: nothing to hook into
        yield
        return
    http_client = importlib.import_module(type(session).__module__.split(".")[0])  # httpx2 or httpx

    class Bounded(http_client.SyncByteStream):
        def __init__(self, stream):
            self.stream = stream

        def __iter__(self):
            total, pace = 0, Pace(limits, 0)
            for chunk in self.stream:
                total += len(chunk)
                if total > MAX_METADATA_BYTES:
                    raise _TooLarge()
                pace.check(total)
                yield chunk

        def close(self):
            self.stream.close()

        def __getattr__(self, name):  # e.g. `elapsed` of httpx's own stream wrapper
            return getattr(self.stream, name)

    def bound(response):
        response.stream = Bounded(response.stream)

    hooks = session.event_hooks
    session.event_hooks = {**hooks, "response": [*hooks.get("response", []), bound]}
    try:
        yield
    finally:
        session.event_hooks = hooks


def _is_hex_commit(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{7,64}", value) is not None


# --- downloading ----------------------------------------------------------------------------


def _verified_before(directory: Path, manifest: dict, file: RemoteFile) -> bool:
    """True when a file is on disk and was verified with the same hash by an earlier pull."""
    path = directory / file.path
    record = manifest.get("files", {}).get(file.path)
    if record is None or path.is_symlink() or not path.is_file():
        return False
    stat = path.stat()
    return record == _record(file, stat.st_size, stat.st_mtime_ns)


def _record(file: RemoteFile, size: int, mtime_ns: int) -> dict:
    return {"size": size, "sha256": file.expected.sha256, "git_sha1": file.expected.git_sha1, "mtime_ns": mtime_ns}


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("files", {}), dict) else {}


def _part_path(directory: Path, file: RemoteFile) -> Path:
    return directory / STATE_DIR / "partial" / (file.path + ".part")


def _part_sizes(directory: Path, file: RemoteFile) -> tuple[int, int]:
    """(bytes of `file` a resume can use, bytes of a partial file no resume can use: too long, a link)."""
    try:
        stat = os.lstat(_part_path(directory, file))
    except OSError:
        return 0, 0
    if S_ISREG(stat.st_mode) and stat.st_size <= file.expected.size:
        return stat.st_size, 0
    return 0, stat.st_size


def _to_fetch(directory: Path, todo: list[RemoteFile]) -> int:
    return sum(f.expected.size - _part_sizes(directory, f)[0] for f in todo)


def _check_disk(plan: PullPlan, directory: Path, todo: list[RemoteFile]) -> None:
    need = _to_fetch(directory, todo)
    reclaimed = sum(_part_sizes(directory, f)[1] for f in plan.files)  # dropped before anything is written
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + reclaimed
    if need + DISK_MARGIN > free:
        raise MimoError(
            f"not enough disk space to pull {plan.ref.name}: need {format_bytes(need)}, "
            f"{format_bytes(free)} free in {probe}"
        )


def _drop_unusable_parts(directory: Path, plan: PullPlan, todo: list[RemoteFile]) -> None:
    """Free the space of partial files no resume can use (longer than their file, links, already verified)
    before the pull writes anything, so that a full disk can always be recovered by running it again."""
    for file in plan.files:
        part = _part_path(directory, file)
        if part.is_symlink() or _part_sizes(directory, file)[1] or (file not in todo and part.exists()):
            part.unlink(missing_ok=True)


def _inside(root: Path, path: Path) -> Path:
    """`path` (under `root`), after checking that no symbolic link on the way leads out of `root`."""
    parent = Path(os.path.realpath(path.parent))
    if parent != root and root not in parent.parents:
        raise MimoError(
            f"{path.parent} leads outside {root} (a symbolic link?): refusing to write {path.name} there; "
            "remove the link and pull again"
        )
    return path


class PullLock:
    """One pull per model directory at a time (partial files are appended to); `mimo rm` takes it too."""

    def __init__(self, directory: Path, busy: str):
        self.path, self.busy = directory / STATE_DIR / "lock", busy

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # no O_TRUNC and no following a planted link: the lock file itself is never written
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            import fcntl
        except ImportError:
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise MimoError(self.busy) from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def download(plan: PullPlan) -> Path:
    """Download and verify every file of `plan`, then mark the model complete."""
    ref, directory = plan.ref, plan.ref.path
    # files verified by an earlier pull are kept when their hash is still the hub's
    previous = _read_json(directory / MANIFEST) or _read_json(directory / STATE_DIR / "verified.json")
    todo = [f for f in plan.files if not _verified_before(directory, previous, f)]
    _check_disk(plan, directory, todo)
    root = directory.resolve()  # the model directory may itself be a link (a store on another disk)
    _inside(root, root / STATE_DIR / "lock")
    pending = list(todo)  # emptied as files are verified
    with PullLock(root, f"another `mimo pull {ref.name}` is running"):
        try:
            return _download_locked(plan, root, previous, pending)
        except OSError as error:
            if error.errno not in DISK_FULL_ERRNOS:
                raise
            raise MimoError(
                f"disk full in {root}: {format_bytes(_to_fetch(root, pending))} more needed to finish {ref.name} "
                f"({format_bytes(shutil.disk_usage(root).free)} free); free some space, then run "
                f"`{ref.pull_command}` again to resume"
            ) from None


def _download_locked(plan: PullPlan, root: Path, previous: dict, pending: list[RemoteFile]) -> Path:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    ref = plan.ref
    todo = list(pending)
    _drop_unusable_parts(root, plan, todo)  # before any housekeeping write: a full disk must not block it
    write_json_atomic(root / SOURCE, {"repo_id": ref.repo_id, "revision": ref.revision, "name": ref.name})
    verified = {"commit": plan.commit, "files": {f.path: previous["files"][f.path] for f in plan.files if f not in todo}}
    if todo and (root / MANIFEST).exists():
        os.replace(root / MANIFEST, root / STATE_DIR / "verified.json")
    headers = build_hf_headers(library_name="mimo-local")
    started = time.monotonic()
    with _PullProgress(plan, todo) as progress:
        for file in todo:
            dest, part = _inside(root, root / file.path), _inside(root, _part_path(root, file))
            url = hf_hub_url(ref.repo_id, file.path, revision=plan.commit, endpoint=plan.endpoint)
            progress.begin(file)
            try:
                download_file(
                    url, dest, part, file.expected, headers=headers,
                    retries=plan.retries, backoff=plan.backoff, limits=plan.limits, progress=progress,
                )
            except MimoError as error:
                raise MimoError(f"{error}; run `{ref.pull_command}` again to resume") from None
            progress.end(file)
            stat = dest.stat()
            verified["files"][file.path] = _record(file, stat.st_size, stat.st_mtime_ns)
            pending.remove(file)
            write_json_atomic(root / STATE_DIR / "verified.json", verified)
    manifest = {
        **verified,
        "repo_id": ref.repo_id,
        "revision": ref.revision,
        "name": ref.name,
        "endpoint": plan.endpoint,
        "include": list(plan.include),
        "exclude": list(plan.exclude),
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(root / MANIFEST, manifest)
    (root / STATE_DIR / "verified.json").unlink(missing_ok=True)
    shutil.rmtree(root / STATE_DIR / "partial", ignore_errors=True)
    progress.summary(time.monotonic() - started)
    return plan.ref.path


def pull(
    name: str,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    retries: int = 5,
    limits: TransferLimits | None = None,
) -> Path:
    ref = parse_name(name)
    return download(fetch_plan(ref, include, exclude, retries, limits))


class _PullProgress(Progress):
    """Rich bars on stderr: the whole pull and the current file, with speed and time left."""

    def __init__(self, plan: PullPlan, todo: list[RemoteFile]):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress as Bars,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.plan, self.todo = plan, todo
        self.console = Console(stderr=True)
        self.bars = Bars(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=self.console, disable=not self.console.is_terminal,
        )
        self.finished = sum(f.expected.size for f in plan.files if f not in todo)
        self.fetched = 0
        self.total = self.bars.add_task(f"{plan.ref.name}", total=plan.size, completed=self.finished)
        self.current = None

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def begin(self, file: RemoteFile) -> None:
        from rich.markup import escape

        self.current = self.bars.add_task(f"  {escape(file.path)}", total=file.expected.size)  # a name like "a[/b]" is no markup
        self.current_size = file.expected.size

    def start(self, done: int) -> None:
        self.bars.reset(self.current, total=self.current_size, completed=done)
        self.bars.update(self.total, completed=self.finished + done)

    def advance(self, n: int) -> None:
        self.fetched += n
        self.bars.advance(self.current, n)
        self.bars.advance(self.total, n)

    def end(self, file: RemoteFile) -> None:
        self.finished += file.expected.size
        self.bars.remove_task(self.current)

    def summary(self, seconds: float) -> None:
        speed = self.fetched / seconds if seconds > 0 else 0.0
        self.console.print(
            f"pulled {self.plan.ref.name} ({self.plan.ref.repo_id} @ {self.plan.commit[:12]}): {len(self.plan.files)} files, "
            f"{self.plan.size_text}, fetched {format_bytes(self.fetched)} in {seconds:.1f}s "
            f"({format_bytes(speed)}/s) -> {self.plan.ref.path}",
            highlight=False, soft_wrap=True, markup=False,
        )
