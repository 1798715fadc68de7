"""`mimo run --keep-alive`: one background `mimo serve` per model and load flags, found again by later
calls (which import no torch), gone once idle; `mimo ps` and `mimo stop`. Real processes, real HTTP."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mimo_local.serve import keep_alive
from mimo_local.store.resolve import resolve_model

PROMPT = "Tell me about Emma."
LOAD_FLAGS = ["-m", "mimo-nano", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    yield tmp_path
    for server in keep_alive.running_servers():
        keep_alive.stop(server)


def mimo(*args, env_extra=None, background=False):
    command = [sys.executable, "-m", "mimo_local.cli", *args]
    env = {**os.environ, **(env_extra or {})}
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def answer(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_kept_server_answers_as_a_local_run_then_exits_when_idle(home):
    greedy = ["run", *LOAD_FLAGS, "--temperature", "0", "-n", "16", "--json", PROMPT]
    local = answer(mimo(*greedy))
    first = [mimo(*greedy, "--keep-alive", "6s", background=True) for _ in range(2)]  # at once: one server
    for process in first:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1])["token_ids"] == local["token_ids"]
    servers = keep_alive.running_servers()
    assert len(servers) == 1
    again = mimo(*greedy, "--keep-alive", "6s", env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert answer(again)["token_ids"] == local["token_ids"]
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "mimo_local.serve.keep_alive" in imported and "torch" not in imported
    assert keep_alive.running_servers() == servers  # the same one
    assert oct((home / "servers").stat().st_mode)[-3:] == "700"  # its record holds the key

    deadline = time.monotonic() + 60
    while pid_alive(servers[0].pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(servers[0].pid)
    assert "no request for 6 s (--idle-timeout): exiting" in servers[0].log_path.read_text()
    assert keep_alive.running_servers() == [] and not list((home / "servers").glob("*.json"))


def test_other_load_flags_get_their_own_server_and_mimo_stop_ends_them(home):
    assert "no model is kept loaded" in mimo("ps").stderr
    answer(mimo("run", *LOAD_FLAGS, "-n", "4", "--json", "--keep-alive", "1h", PROMPT))
    answer(mimo("run", *LOAD_FLAGS, "--no-mtp", "-n", "4", "--json", "--keep-alive", "1h", PROMPT))
    servers = keep_alive.running_servers()
    assert len(servers) == 2 and {"--no-mtp" in server.options for server in servers} == {True, False}
    listed = mimo("ps")
    assert listed.returncode == 0 and listed.stdout.count("mimo-nano") == 2 and "1.0 h" in listed.stdout

    assert mimo("stop").returncode == 1
    unknown = mimo("stop", "mimo-nano-moe")
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: mimo-nano-moe is not kept loaded (`mimo ps` lists what is)"
    stopped = mimo("stop", "mimo-nano")
    assert stopped.returncode == 0 and stopped.stderr.count("stopped mimo-nano") == 2
    assert not any(pid_alive(server.pid) for server in servers) and keep_alive.running_servers() == []


def test_a_model_that_fails_to_load_is_a_one_line_error(home, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(resolve_model("mimo-nano"), broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = mimo("run", "-m", str(broken), "--keep-alive", "1m", PROMPT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: the background server for broken did not start:")
    assert "safetensors" in result.stderr and "Traceback" not in result.stderr
    assert keep_alive.running_servers() == []


@pytest.mark.parametrize("flags, message", [
    (["--keep-alive", "5x"], "--keep-alive 5x: not a duration"),
    (["--keep-alive", "5m", "--draft-vocab", "64"], "--draft-vocab cannot go with --keep-alive"),
])
def test_bad_keep_alive_flags_are_one_line_errors(home, flags, message):
    result = mimo("run", *LOAD_FLAGS, *flags, PROMPT)
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
