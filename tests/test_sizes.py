"""Memory sizes as people write them: every unit a power of 1024, B never bits, a unit required."""

import pytest
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.errors import MimoError
from mimo_local.sizes import parse_size

GIB, MIB = 1 << 30, 1 << 20


@pytest.mark.parametrize("text, expected", [
    ("24G", 24 * GIB), ("24GB", 24 * GIB), ("24gb", 24 * GIB), ("24GiB", 24 * GIB), ("24gib", 24 * GIB),
    ("24 GiB", 24 * GIB), (" 24g ", 24 * GIB), ("1.5T", 1536 * GIB), ("1TiB", 1024 * GIB), ("1tb", 1024 * GIB),
    ("1500MiB", 1500 * MIB), ("512M", 512 * MIB), ("512mb", 512 * MIB), ("64K", 64 << 10), ("64KiB", 64 << 10),
    ("0.5G", 512 * MIB), (".5G", 512 * MIB), ("4096B", 4096), ("4096b", 4096),
    ("0", 0), ("0G", 0), ("0.0", 0),
])
def test_sizes_parse_as_people_write_them(text, expected):
    assert parse_size(text, "--gpu-mem") == expected


@pytest.mark.parametrize("text, message", [
    ("24", "a size needs a unit"),
    ("1.5", "a size needs a unit"),
    ("lots", "not a size"),
    ("24X", "not a size"),
    ("-1G", "not a size"),
    ("24iB", "not a size"),
    ("G", "not a size"),
    ("", "not a size"),
    ("24 G B", "not a size"),
])
def test_bad_sizes_are_one_line_errors(text, message):
    with pytest.raises(MimoError, match=message) as caught:
        parse_size(text, "--cpu-mem")
    assert str(caught.value).startswith(f"--cpu-mem {text}: ") and "\n" not in str(caught.value)


runner = CliRunner()


def test_plan_reads_budgets_in_binary_units(tmp_path):
    config = "tests/data/mimo-7b-rl.config.json"
    result = runner.invoke(app, ["plan", config, "--gpu-mem", "0", "--cpu-mem", "24gb", "--ctx", "1024", "--json"])
    assert result.exit_code == 0, result.output
    assert '"cpu": 25769803776' in result.stdout  # 24 x 2^30, not 24e9 bytes nor 24e9 bits
    bare = runner.invoke(app, ["plan", config, "--gpu-mem", "24"])
    assert bare.exit_code == 1
    assert bare.stderr == "error: --gpu-mem 24: a size needs a unit (like 24G, 24GiB, 1.5T or 512M; units are powers of 1024; 0 for none)\n"


def test_help_says_what_the_units_mean():
    result = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    assert "power of 1024" in result.stdout and "2^30" in result.stdout


@pytest.mark.parametrize("text, seconds", [
    ("5m", 300), ("30s", 30), ("30", 30), ("1.5h", 5400), ("250ms", 0.25), (" 2M ", 120), ("0", 0), (".5s", 0.5),
])
def test_durations_parse_as_ollama_takes_them(text, seconds):
    from mimo_local.sizes import parse_duration

    assert parse_duration(text, "--keep-alive") == seconds


@pytest.mark.parametrize("text", ["5x", "-1m", "m", "five minutes", ""])
def test_a_bad_duration_names_the_flag(text):
    from mimo_local.sizes import parse_duration

    with pytest.raises(MimoError, match="--keep-alive .*not a duration"):
        parse_duration(text, "--keep-alive")
