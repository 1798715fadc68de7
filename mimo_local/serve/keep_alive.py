"""`mimo run --keep-alive 5m`: the model stays loaded between calls, as ollama keeps it.

The first call starts a `mimo serve` in the background for the model and its load options (a
random loopback port, a random API key, `--idle-timeout` the keep-alive) and sends the prompt to
it; later calls with the same model and options find it and send theirs, without importing torch
or loading anything. The server exits by itself once idle for the keep-alive (`mimo stop` ends it
sooner, `mimo ps` lists them). Each server has a record in the store's `servers` folder (mode
0700: it holds the key); a record whose server is gone is dropped when next read. No torch here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx

from ..errors import MimoError
from ..jsonfile import write_json_atomic
from ..store.names import home

LOAD_POLL_SECONDS = 0.1
PROBE_TIMEOUT_SECONDS = 2


@dataclass
class KeptServer:
    key: str
    model: str  # the model directory, as the server was given it
    pid: int
    url: str
    api_key: str
    options: list[str]  # its load options (`mimo serve` flags)
    keep_alive: float  # seconds idle before it exits
    started: float  # time.time()

    @property
    def log_path(self) -> Path:
        return servers_folder() / f"{self.key}.log"


def servers_folder() -> Path:
    return home() / "servers"


def server_key(model_dir: Path, options: list[str]) -> str:
    return hashlib.sha256(json.dumps([str(Path(model_dir).resolve()), options]).encode()).hexdigest()[:16]


def find_or_start(model_dir: Path, options: list[str], keep_alive: float,
                  on_wait: Callable[[str], None] = lambda message: None) -> KeptServer:
    """The running server for this model and these `mimo serve` options, started when there is none
    (and waited for until its model is loaded: `on_wait` is told once)."""
    key = server_key(model_dir, options)
    with _locked(key):  # two calls at once start one server
        running = _alive(_read(servers_folder() / f"{key}.json"))
        if running is not None:
            return running
        return _start(key, Path(model_dir).resolve(), options, keep_alive, on_wait)


def running_servers() -> list[KeptServer]:
    """Every kept server that still answers (records of the others are removed)."""
    folder = servers_folder()
    found = (_alive(_read(path)) for path in sorted(folder.glob("*.json"))) if folder.is_dir() else ()
    return [server for server in found if server is not None]


def table(servers: list[KeptServer]):
    from rich.table import Table

    view = Table("model", "pid", "url", "up", "exits when idle for", "flags", title="kept loaded (mimo ps)")
    now = time.time()
    for server in servers:
        view.add_row(Path(server.model).name, str(server.pid), server.url, _seconds_text(now - server.started),
                     _seconds_text(server.keep_alive), " ".join(server.options))
    return view


def _seconds_text(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def stop(server: KeptServer, timeout: float = 30) -> None:
    """SIGTERM (the server finishes what it is answering), then wait for it to go."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (servers_folder() / f"{server.key}.json").unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    folder = servers_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> KeptServer | None:
    try:
        return KeptServer(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)  # unreadable: a server nobody can use
        return None


def _alive(server: KeptServer | None) -> KeptServer | None:
    """The server if its process lives and it answers with its key; its record is dropped otherwise."""
    if server is None:
        return None
    if _pid_alive(server.pid):
        try:
            # /metrics: it takes the key, and a probe does not count as use (the idle timer goes on)
            answer = httpx.get(f"{server.url}/metrics", headers=_auth(server), timeout=PROBE_TIMEOUT_SECONDS)
            if answer.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
    if not _pid_alive(server.pid):
        (servers_folder() / f"{server.key}.json").unlink(missing_ok=True)
    return None


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaps it where it is our child (started by this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _auth(server: KeptServer) -> dict:
    return {"Authorization": f"Bearer {server.api_key}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(key: str, model_dir: Path, options: list[str], keep_alive: float, on_wait) -> KeptServer:
    port, api_key = _free_port(), secrets.token_urlsafe(24)
    command = [sys.executable, "-m", "mimo_local.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--idle-timeout", f"{keep_alive}s", *options]
    folder = servers_folder()
    with open(folder / f"{key}.log", "w") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MIMO_API_KEY": api_key}, start_new_session=True)
    server = KeptServer(key, str(model_dir), process.pid, f"http://127.0.0.1:{port}", api_key, options, keep_alive,
                        time.time())
    write_json_atomic(folder / f"{key}.json", asdict(server))
    on_wait(f"loading {model_dir.name} in a background server (kept {keep_alive:g} s after its last use)")
    while process.poll() is None:
        try:
            if httpx.get(f"{server.url}/health", timeout=PROBE_TIMEOUT_SECONDS).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(LOAD_POLL_SECONDS)
    (folder / f"{key}.json").unlink(missing_ok=True)
    raise MimoError(f"the background server for {model_dir.name} did not start: {_last_error(server.log_path)}")


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
    return (errors or lines or [f"no output (see {log_path})"])[-1]
