"""`mimo run` with model names: pulls a missing hub model (asked on a terminal, --yes, refused without one)."""

import os
import pty
import select
import subprocess
import sys
import time

from mimo_local.store.names import is_complete, parse_name
from test_hub import REPO, hub, isolated, mimo  # noqa: F401  (fixtures)

MIMO = [sys.executable, "-m", "mimo_local.cli"]


def run(*args):
    return subprocess.run([*MIMO, *map(str, args)], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_run_pulls_a_missing_model_with_yes(hub):
    result = run("run", "-m", "mimo-7b-rl", "--yes", "-n", "4", "--temperature", "0", "Hello")
    assert result.returncode == 0, result.stderr
    assert is_complete(parse_name("mimo-7b-rl").path)
    assert "pulled mimo-7b-rl" in result.stderr and "XiaomiMiMo--MiMo-7B-RL" in result.stderr, result.stderr
    assert set(hub.served) == set(hub.repos[REPO].files)


def test_run_without_terminal_refuses_to_pull(hub):
    result = run("run", "-m", "mimo-7b-rl", "-n", "4", "Hello")
    assert result.returncode == 1
    assert result.stderr == "error: mimo-7b-rl is not downloaded: run `mimo pull mimo-7b-rl` first (or pass --yes)\n"
    assert not hub.requests


def test_run_offline_says_what_is_missing(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("run", "-m", "mimo-7b-rl", "--yes", "Hello")
    assert result.returncode == 1
    assert result.stderr.startswith("error: mimo-7b-rl (XiaomiMiMo/MiMo-7B-RL) is not in the local store")
    assert "run `mimo pull mimo-7b-rl` when online" in result.stderr and len(result.stderr.splitlines()) == 1


def test_run_without_model_uses_the_default_and_names_it(isolated, checkpoints):
    model = checkpoints("mimo")
    assert mimo("config", "default-model", model).exit_code == 0
    result = run("run", "-n", "3", "--temperature", "0", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"model: {model} (default; change with `mimo config default-model NAME`)"
    named = run("run", "-m", model, "-n", "3", "--temperature", "0", "Hello")
    assert named.stdout == result.stdout


def _answer_on_terminal(args, answer: bytes) -> tuple[int, str]:
    """Run mimo on a pseudo-terminal, type `answer` once it asks, and return (exit code, screen text)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([*MIMO, *args], stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    screen, answered, deadline = b"", False, time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            screen += chunk
        if not answered and b"now?" in screen:
            os.write(leader, answer)
            answered = True
        if process.poll() is not None and not ready:
            break
    os.close(leader)
    return process.wait(timeout=60), screen.decode(errors="replace")


def test_run_asks_on_a_terminal(hub):
    code, screen = _answer_on_terminal(["run", "-m", "mimo-7b-rl", "-n", "2", "Hello"], b"n\n")
    assert code == 1 and "is not downloaded. Pull 604.0 KB now?" in screen
    assert "run `mimo pull mimo-7b-rl` to get it" in screen and not hub.served
    code, screen = _answer_on_terminal(["run", "-m", "mimo-7b-rl", "-n", "2", "--temperature", "0", "Hello"], b"y\n")
    assert code == 0, screen
    assert is_complete(parse_name("mimo-7b-rl").path) and "tok/s" in screen
