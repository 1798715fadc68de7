"""`mimo pull`: read a repository's file list through huggingface_hub, then download and verify it.

The manifest (`.mimo/manifest.json`) is written last and atomically: a model directory counts as
complete only once every file in it has been verified.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .download import Expected, Progress, download_file
from .errors import MimoError
from .hub import MANIFEST, SOURCE, STATE_DIR, ModelRef, parse_name, write_json_atomic

DEFAULT_ENDPOINT = "https://huggingface.co"
DISK_MARGIN = 256 << 20  # keep this much free after a pull
METADATA_TIMEOUT = 30.0


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


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatch(path, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatch(path, pattern) for pattern in exclude)


def fetch_plan(
    ref: ModelRef, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), retries: int = 5
) -> PullPlan:
    """The files to pull, with sizes and hashes, from the hub's metadata for one commit."""
    if ref.kind != "hub":
        raise MimoError(f"{ref.name} is a {'packaged demo model' if ref.kind == 'demo' else 'local directory'}: nothing to pull")
    url = endpoint()
    if offline():
        raise offline_error(ref)
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=url, library_name="mimo-local").model_info(
            ref.repo_id, revision=ref.revision or "main", files_metadata=True, timeout=METADATA_TIMEOUT
        )
    except Exception as error:  # noqa: BLE001 - turned into a one-line message or re-raised
        raise _hub_error(error, ref, url) from None
    files = []
    for sibling in info.siblings or []:
        if not _selected(sibling.rfilename, include, exclude):
            continue
        if sibling.lfs is not None:
            expected = Expected(size=sibling.lfs.size, sha256=sibling.lfs.sha256)
        elif sibling.size is not None:
            expected = Expected(size=sibling.size, git_sha1=sibling.blob_id)
        else:
            raise MimoError(f"{url} gave no size for {ref.repo_id}/{sibling.rfilename}: cannot verify it")
        files.append(RemoteFile(sibling.rfilename, expected))
    if not files:
        raise MimoError(f"no files of {ref.repo_id} match --include/--exclude")
    return PullPlan(ref, url, info.sha or ref.revision or "main", files, tuple(include), tuple(exclude), retries)


# --- downloading ----------------------------------------------------------------------------


def _verified_before(directory: Path, manifest: dict, file: RemoteFile) -> bool:
    """True when a file is on disk and was verified with the same hash by an earlier pull."""
    path = directory / file.path
    record = manifest.get("files", {}).get(file.path)
    if not path.is_file() or record is None:
        return False
    stat = path.stat()
    return record == _record(file, stat.st_size, stat.st_mtime_ns)


def _record(file: RemoteFile, size: int, mtime_ns: int) -> dict:
    return {"size": size, "sha256": file.expected.sha256, "git_sha1": file.expected.git_sha1, "mtime_ns": mtime_ns}


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _check_disk(plan: PullPlan, directory: Path, todo: list[RemoteFile]) -> None:
    have = sum(_part_path(directory, f).stat().st_size for f in todo if _part_path(directory, f).exists())
    need = sum(f.expected.size for f in todo) - have
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN > free:
        raise MimoError(
            f"not enough disk space to pull {plan.ref.name}: need {format_bytes(need)}, "
            f"{format_bytes(free)} free in {probe}"
        )


def _part_path(directory: Path, file: RemoteFile) -> Path:
    return directory / STATE_DIR / "partial" / (file.path + ".part")


class _Lock:
    """One pull per model directory at a time (partial files are appended to)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        try:
            import fcntl
        except ImportError:
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise MimoError(f"another `mimo pull {self.name}` is running") from None
        return self

    def __exit__(self, *exc):
        self.file.close()


def download(plan: PullPlan) -> Path:
    """Download and verify every file of `plan`, then mark the model complete."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    ref, directory = plan.ref, plan.ref.path
    # files verified by an earlier pull are kept when their hash is still the hub's
    previous = _read_json(directory / MANIFEST) or _read_json(directory / STATE_DIR / "verified.json")
    todo = [f for f in plan.files if not _verified_before(directory, previous, f)]
    _check_disk(plan, directory, todo)
    with _Lock(directory / STATE_DIR / "lock", ref.name):
        write_json_atomic(directory / SOURCE, {"repo_id": ref.repo_id, "revision": ref.revision, "name": ref.name})
        verified = {"commit": plan.commit, "files": {f.path: previous["files"][f.path] for f in plan.files if f not in todo}}
        if todo and (directory / MANIFEST).exists():
            os.replace(directory / MANIFEST, directory / STATE_DIR / "verified.json")
        headers = build_hf_headers(library_name="mimo-local")
        started = time.monotonic()
        with _PullProgress(plan, todo) as progress:
            for file in todo:
                url = hf_hub_url(ref.repo_id, file.path, revision=plan.commit, endpoint=plan.endpoint)
                progress.begin(file)
                try:
                    download_file(
                        url, directory / file.path, _part_path(directory, file), file.expected, headers=headers,
                        retries=plan.retries, backoff=plan.backoff, progress=progress,
                    )
                except MimoError as error:
                    raise MimoError(f"{error}; run `{ref.pull_command}` again to resume") from None
                progress.end(file)
                stat = (directory / file.path).stat()
                verified["files"][file.path] = _record(file, stat.st_size, stat.st_mtime_ns)
                write_json_atomic(directory / STATE_DIR / "verified.json", verified)
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
        write_json_atomic(directory / MANIFEST, manifest)
        (directory / STATE_DIR / "verified.json").unlink(missing_ok=True)
        shutil.rmtree(directory / STATE_DIR / "partial", ignore_errors=True)
    progress.summary(time.monotonic() - started)
    return directory


def pull(name: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), retries: int = 5) -> Path:
    ref = parse_name(name)
    return download(fetch_plan(ref, include, exclude, retries))


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
        self.current = self.bars.add_task(f"  {file.path}", total=file.expected.size)
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
            highlight=False, soft_wrap=True,
        )
