"""Real `mimo` invocations in a subprocess: output streams, --json, stdin, exit codes."""

import json
import os
import subprocess
import sys

import pytest


MIMO = [sys.executable, "-m", "mimo_local.cli"]


def mimo(*args, stdin=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "mimo_local.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("mimo_v2_flash", fp8=True)


def test_run_json_greedy_is_deterministic(model):
    first = mimo("run", "--model", model, "--temperature", "0", "-n", "12", "--json", "Hello")
    second = mimo("run", "--model", model, "--temperature", "0", "-n", "12", "--json", "Hello")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert set(result) >= {"text", "token_ids", "prompt_tokens", "completion_tokens", "prefill_tokens_per_s",
                           "decode_tokens_per_s", "finish_reason"}
    assert result["completion_tokens"] == len(result["token_ids"]) <= 12
    assert result == {**json.loads(second.stdout), "prefill_tokens_per_s": result["prefill_tokens_per_s"],
                      "decode_tokens_per_s": result["decode_tokens_per_s"]}
    assert first.stderr == ""


def test_text_goes_to_stdout_and_stats_to_stderr(model):
    json_run = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "8", "--json", "Hi").stdout)
    text_run = mimo("run", "-m", model, "--temperature", "0", "-n", "8", "Hi")
    assert text_run.returncode == 0
    assert text_run.stdout == json_run["text"] + "\n"
    assert "tok/s" in text_run.stderr and "MiMo-V2-Flash" in text_run.stderr


def test_prompt_from_stdin_and_dash(model):
    argument = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "6", "--json", "Tell me").stdout)
    piped = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "6", "--json", stdin="Tell me").stdout)
    dash = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "6", "--json", "-", stdin="Tell me").stdout)
    assert argument["token_ids"] == piped["token_ids"] == dash["token_ids"]


def test_raw_and_system_change_the_prompt(model):
    chat = json.loads(mimo("run", "-m", model, "-n", "1", "--json", "Hi").stdout)
    raw = json.loads(mimo("run", "-m", model, "-n", "1", "--json", "--raw", "Hi").stdout)
    system = json.loads(mimo("run", "-m", model, "-n", "1", "--json", "--system", "Be brief", "Hi").stdout)
    assert raw["prompt_tokens"] < chat["prompt_tokens"] < system["prompt_tokens"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "model directory not found"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_bad_input_is_one_line_exit_1(model, args, message):
    result = mimo("run", "--model", model, *args, "Hi")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_corrupt_checkpoint_is_one_line_exit_1(model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = mimo("run", "--model", broken, "Hi")
    assert result.returncode == 1 and "truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2(model):
    assert mimo("run", "Hi", "--model").returncode == 2  # --model without a value (no --model runs the default)
    assert mimo("run", "--model", model, "--max-tokens", "many", "Hi").returncode == 2


def test_closed_pipe_is_quiet(model):
    pipeline = f"{sys.executable} -m mimo_local.cli run -m {model} -n 300 --temperature 0 Hello | head -c 5"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=120)
    assert len(result.stdout.encode()) <= 5
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_make_tiny_writes_a_runnable_checkpoint(tmp_path):
    out = tmp_path / "made"
    made = mimo("dev", "make-tiny", out, "--preset", "mimo", "--shards", "1")
    assert made.returncode == 0 and (out / "model.safetensors").exists()
    assert mimo("run", "-m", out, "-n", "3", "Hi").returncode == 0


def test_mtp_is_on_by_default_and_lossless(model):
    on = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "20", "--json", "Hello").stdout)
    off = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "20", "--json", "--no-mtp", "Hello").stdout)
    two = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "20", "--json", "--draft-tokens", "2",
                          "Hello").stdout)
    whole = json.loads(mimo("run", "-m", model, "--temperature", "0", "-n", "20", "--json", "--draft-vocab", "0",
                            "Hello").stdout)
    assert on["token_ids"] == off["token_ids"] == two["token_ids"] == whole["token_ids"]
    assert mimo("run", "-m", model, "--draft-vocab", "-1", "Hello").returncode == 1
    assert "mean_accepted_length" not in off
    assert on["mtp_draft_tokens"] % 3 == 0  # V2-Flash: one draft per MTP layer by default
    assert two["mtp_draft_tokens"] % 2 == 0 and 1.0 <= two["mean_accepted_length"] <= 3.0
    assert {"mtp_accepted_tokens", "decode_tokens_per_s"} <= set(on)


def test_mtp_on_a_checkpoint_without_mtp_layers(tmp_path):
    from mimo_local.dev.tiny import make_checkpoint

    plain = make_checkpoint(tmp_path / "no-mtp", "mimo", shards=1, overrides={"mtp_layers": 0})
    result = mimo("run", "-m", plain, "--mtp", "Hi")
    assert result.returncode == 1 and "has no MTP layers" in result.stderr
    assert mimo("run", "-m", plain, "-n", "3", "Hi").returncode == 0


def test_bench_reports_prompt_and_generation_speed(model):
    result = mimo("bench", "-m", model, "-p", "16", "-n", "8", "-r", "2", "--no-mtp", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [entry["test"] for entry in report["results"]] == ["pp16", "tg8"]
    assert all(len(entry["runs"]) == 2 and entry["tokens_per_s"] > 0 for entry in report["results"])
    assert set(report["weights"]) == {"cpu"} and report["decoding"] == "no MTP"
    assert report["backend"].startswith("cpu, ") and report["backend"].endswith(" threads")
    assert all(isinstance(entry["unreliable"], bool) for entry in report["results"])
    speculative = json.loads(mimo("bench", "-m", model, "-p", "16", "-n", "8", "-r", "1", "--json").stdout)
    assert 1.0 <= speculative["results"][1]["mean_accepted_length"] <= 4.0  # V2-Flash: up to 3 drafts + 1
    table = mimo("bench", "-m", model, "-p", "16", "-n", "8", "-r", "1", "--cpu-moe")
    assert table.returncode == 0 and "pp16" in table.stdout and "tg8" in table.stdout
    for bad in (("-p", "0"), ("-n", "300000")):
        refused = mimo("bench", "-m", model, *bad)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_bench_flags_runs_that_disagree():
    from mimo_local.bench import BenchResult

    assert not BenchResult("tg8", [100.0, 104.0, 98.0]).unreliable
    assert BenchResult("tg8", [100.0, 40.0, 98.0]).unreliable
    assert not BenchResult("tg8", [100.0]).unreliable


def test_ignore_eos_generates_up_to_max_tokens(scripted_chat):
    # The scripted checkpoint ends its answer with end-of-text whatever the CPU's rounding.
    args = ("run", "-m", str(scripted_chat), "--temperature", "0", "-n", "400", "--no-mtp", "--json", "Hello")
    stopped, full = json.loads(mimo(*args).stdout), json.loads(mimo(*args, "--ignore-eos").stdout)
    assert stopped["finish_reason"] == "stop" and stopped["completion_tokens"] < 400
    assert full["finish_reason"] == "length" and full["completion_tokens"] == 400
    assert full["token_ids"][: len(stopped["token_ids"])] == stopped["token_ids"]


def test_ctrl_c_stops_cleanly(model):
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "mimo_local.cli", "run", "-m", str(model), "-n", "20000", "--ignore-eos", "--no-mtp",
         "Hello"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # as a terminal starts it: a test run launched in the background (`cmd &` without job control)
        # inherits SIGINT ignored, and Python then leaves it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout.read(1)  # generation has started
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (len(stdout), stderr.decode()[-2000:])
    assert b"Traceback" not in stderr and b"interrupted" in stderr


@pytest.mark.parametrize("args, stdin, message", [
    (["run", "-n", "2"], b"caf\xe9", "error: the prompt is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["run", "-n", "2", "--temperature", "inf", "hi"], None, "error: sampling settings must be finite numbers"),
    (["run", "-n", "2", "--raw", "--system", "X", "hi"], None, "error: --raw sends the prompt as it is"),
    (["dev", "make-tiny", "/etc/passwd/x"], None, "error: /etc/passwd/x.partial: Not a directory"),
    (["dev", "make-tiny", "/tmp/never-written", "--shards", "0"], None, "error: --shards must be at least 1"),
])
def test_newcomer_mistakes_get_one_line_errors(args, stdin, message):
    result = subprocess.run(MIMO + args, input=stdin, capture_output=True, timeout=300)
    stderr = result.stderr.decode()
    lines = stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(message), stderr


def test_version_and_a_default_model_not_downloaded(tmp_path):
    from importlib.metadata import version

    assert subprocess.run(MIMO + ["--version"], capture_output=True, text=True).stdout == \
        f"mimo-local {version('mimo-local')}\n"
    env = {**os.environ, "MIMO_HOME": str(tmp_path)}
    result = subprocess.run(MIMO + ["config", "default-model", "mimo-7b-rl"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout == "mimo-7b-rl\n"
    assert "warning: mimo-7b-rl is not downloaded yet" in result.stderr


def test_piped_tables_are_not_cut_at_80_columns(tmp_path):
    """stdout a pipe and no COLUMNS (a file, grep, less): rows as wide as they are, not cut or wrapped."""
    from mimo_local.store.names import DEMO_DIR

    env = {**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, "MIMO_HOME": str(tmp_path)}
    listed = subprocess.run(MIMO + ["list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "mimo-nano-moe (demo)" in line)
    assert len(row) > 80 and f"│ {DEMO_DIR / 'mimo-nano-moe'} │" in row
    planned = subprocess.run(MIMO + ["plan", "mimo-nano-moe"], capture_output=True, text=True, env=env, timeout=120)
    assert planned.returncode == 0, planned.stderr
    summary = next(line for line in planned.stdout.splitlines() if line.startswith("MiMo-V2-Flash: "))
    assert len(summary) > 80 and summary.endswith("| context 32,768 tokens")


def test_bench_marks_a_spread_out_run_unreliable(monkeypatch):
    """Runs that disagree by more than 10% of their mean: "(unreliable)" on that row, and one warning line."""
    from typer.testing import CliRunner

    from mimo_local import bench
    from mimo_local.cli import app

    def measure(engine, prompt_tokens, gen_tokens, repetitions, speculation, on_run):
        return [bench.BenchResult(f"pp{prompt_tokens}", [100.0, 40.0, 98.0]),
                bench.BenchResult(f"tg{gen_tokens}", [50.0, 51.0, 49.0])]

    monkeypatch.setattr(bench, "measure", measure)
    result = CliRunner().invoke(app, ["bench", "-m", "mimo-nano", "-p", "16", "-n", "8", "-r", "3", "--no-mtp"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert "79.33 ± 34.08 (unreliable)" in rows["pp16"]
    assert "50.00 ± 1.00" in rows["tg8"] and "unreliable" not in rows["tg8"]
    assert result.stderr.splitlines() == [
        "unreliable: the runs differ by more than 10% of their mean (another program is probably using a core); "
        "close it or raise --repetitions"]
