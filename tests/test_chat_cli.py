"""`mimo chat` as people run it: through a pipe (plain REPL) and in a real terminal under tmux."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from mimo_local.dev.scripted_chat import ANSWER, THINKING

MIMO = [sys.executable, "-m", "mimo_local.cli"]


def chat_env(tmp_path):
    return {**os.environ, "MIMO_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def test_piped_chat_is_a_plain_repl(scripted_chat, tmp_path):
    lines = "hi\n/think off\nhi again\n/frob\n/save piped\n"
    result = subprocess.run(
        MIMO + ["chat", "--model", str(scripted_chat), "--no-mtp"],
        input=lines, capture_output=True, text=True, env=chat_env(tmp_path), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"<think>{THINKING}</think>{ANSWER}\n{ANSWER}\n"
    assert "\x1b" not in result.stdout + result.stderr
    assert "error: unknown command /frob (try /help)" in result.stderr
    assert (tmp_path / "sessions" / "piped.json").exists()


def test_echo_hi_answers_and_exits_at_eof(scripted_chat, tmp_path):
    result = subprocess.run(
        f"echo hi | {' '.join(MIMO)} chat --model {scripted_chat} --no-think",
        shell=True, capture_output=True, text=True, env=chat_env(tmp_path), timeout=120,
    )
    assert result.returncode == 0 and result.stdout == ANSWER + "\n"


def test_bad_flags_and_models_fail_with_one_line(scripted_chat, tmp_path):
    for args, message in [
        (["--model", str(tmp_path / "none")], "error: model directory not found"),
        (["--model", str(scripted_chat), "--top-p", "0"], "error: top_p must be in (0, 1]"),
        (["--model", str(scripted_chat), "--ctx", "8"], "error: --ctx must be between 16 and"),
        (["--model", str(scripted_chat), "--load", "nothing"], "error: no saved session 'nothing'"),
        (["--model", str(scripted_chat), "--raw", "--system", "X"], "error: --raw sends the prompt as it is"),
        (["--model", str(scripted_chat), "--raw", "--think"], "error: --raw sends the prompt as it is"),
        (["--model", str(scripted_chat), "--stop", ""], "error: stop must be a list of non-empty strings"),
    ]:
        result = subprocess.run(MIMO + ["chat", *args], input="", capture_output=True, text=True,
                                env=chat_env(tmp_path), timeout=120)
        assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
        assert "Traceback" not in result.stderr


def piped_chat(scripted_chat, tmp_path, lines, *flags):
    result = subprocess.run(MIMO + ["chat", "--model", str(scripted_chat), "--no-mtp", *flags], input=lines,
                            capture_output=True, text=True, env=chat_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_stop_strings_end_every_answer_before_them(scripted_chat, tmp_path):
    result = piped_chat(scripted_chat, tmp_path, "hi\nhi again\n", "--stop", "How can", "--stop", "never written")
    cut = ANSWER[: ANSWER.index("How can")]
    assert result.stdout == f"<think>{THINKING}</think>{cut}\n" * 2
    assert result.stderr.count("| stop]") == 2


def test_ignore_eos_goes_on_to_max_tokens(scripted_chat, tmp_path):
    answers_end = piped_chat(scripted_chat, tmp_path, "hi\n", "-n", "60")
    goes_on = piped_chat(scripted_chat, tmp_path, "hi\n", "-n", "60", "--ignore-eos")
    assert answers_end.stdout == f"<think>{THINKING}</think>{ANSWER}\n" and "| stop]" in answers_end.stderr
    assert goes_on.stdout.startswith(answers_end.stdout.rstrip("\n")) and len(goes_on.stdout) > len(answers_end.stdout)
    assert "60 tok" in goes_on.stderr and "| length]" in goes_on.stderr


def test_raw_chat_sends_the_texts_without_the_template(scripted_chat, tmp_path):
    """The scripted model continues `<think>` with its script. Raw, the prompt is that tag alone, so
    the answer is the script after it; through the template the answer would open its own `<think>`.
    The second turn's prompt is the first message, its answer and the new message one after the
    other: all of it but the new `<think>` is in the cache already."""
    result = piped_chat(scripted_chat, tmp_path, "<think>\n<think>\n", "--raw")
    assert result.stdout == f"{THINKING}</think>{ANSWER}\n" * 2
    assert result.stderr.splitlines()[1].startswith("[1 new prompt tok")


def wait_for(session, text, timeout=60.0):
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared on the screen:\n{screen}")


def test_real_terminal_under_tmux(scripted_chat, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for this test (.ci/run installs it)")
    session = f"mimo-chat-test-{os.getpid()}"
    # A running tmux server gives new panes its own environment: pass ours on the command line.
    command = " ".join(["env", f"MIMO_HOME={tmp_path}"] + MIMO + ["chat", "--model", str(scripted_chat)])
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "110", "-y", "30", command], check=True)
    try:
        wait_for(session, "RSS")  # the status line: the app is up
        subprocess.run(["tmux", "send-keys", "-t", session, "hi", "Enter"], check=True)
        screen = wait_for(session, ANSWER)
        assert "thought" in screen and THINKING not in screen  # folded once the answer started
        wait_for(session, "MTP 100% accepted")
        subprocess.run(["tmux", "send-keys", "-t", session, "/save term", "Enter"], check=True)
        wait_for(session, "saved session 'term'")
        subprocess.run(["tmux", "send-keys", "-t", session, "C-d"], check=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "Ctrl+D did not quit"
            time.sleep(0.2)
        assert (tmp_path / "sessions" / "term.json").exists()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_piped_chat_takes_placement_and_quant_flags_and_records_router_statistics(tmp_path):
    """The offload flags work on chat as on run (experts on the CPU), --quant quantizes while
    loading, and the router statistics of the session are saved at exit (into the store for a
    shipped demo model)."""
    env = {**os.environ, "MIMO_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "mimo_local.cli", "chat", "-m", "mimo-nano-moe", "-n", "8", "--seed", "0",
               "--cpu-moe", "--quant", "int8"]
    result = subprocess.run(command, input="Once upon a time\n", capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    stats = json.loads((tmp_path / "expert_stats" / "mimo-nano-moe.json").read_text())
    assert stats["layers"] and all(sum(layer["counts"]) > 0 for layer in stats["layers"].values())
