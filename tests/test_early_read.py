"""The disk is asked for the weights a start will map before torch is imported (early_read.py)."""

import json
import os
import shutil
import subprocess
import sys

from mimo_local import early_read

# Two `mimo run`s in one fresh interpreter: which start found a record, whether torch was imported
# when the first one was asked, and the byte ranges handed to the kernel.
CODE = """
import json, os, sys
from mimo_local import early_read
seen, advised = [], []
real_start, real_advise = early_read.start, os.posix_fadvise
def start(model_dir, options):
    torch_imported = 'torch' in sys.modules
    thread = real_start(model_dir, options)
    if thread is not None:
        thread.join()
    seen.append([torch_imported, thread is not None])
    return thread
def advise(descriptor, offset, length, advice):
    if advice == os.POSIX_FADV_WILLNEED:
        advised.append([os.readlink(f'/proc/self/fd/{descriptor}'), offset, offset + length])
    return real_advise(descriptor, offset, length, advice)
early_read.start, os.posix_fadvise = start, advise
from typer.testing import CliRunner
from mimo_local.cli import app
for _ in range(2):
    result = CliRunner().invoke(app, ['run', '-m', sys.argv[1], '-n', '2', '--raw', 'hi'])
    assert result.exit_code == 0, result.output
print(json.dumps({'seen': seen, 'advised': advised}))
"""


def merged(ranges):
    out = []
    for begin, end in sorted(ranges):
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return out


def test_a_start_asks_the_disk_for_what_the_last_start_mapped_before_importing_torch(checkpoints, tmp_path):
    model_dir = tmp_path / "mimo"
    shutil.copytree(checkpoints("mimo"), model_dir, ignore=shutil.ignore_patterns(early_read.FOLDER))
    result = subprocess.run([sys.executable, "-c", CODE, str(model_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["seen"] == [[False, False], [True, True]]  # the first start: no record yet, torch not imported
    records = list((model_dir / early_read.FOLDER).glob("read-spans-*.json"))
    assert len(records) == 1
    spans = {name: entry["spans"] for name, entry in json.loads(records[0].read_text()).items()}
    assert any(name.endswith(".safetensors") and early_read.FOLDER not in name for name in spans)  # mapped in place
    assert any(early_read.FOLDER in name for name in spans)  # and the runtime layout
    advised = {}
    for name, begin, end in report["advised"]:
        advised.setdefault(name, []).append([begin, end])
    assert {name: merged(ranges) for name, ranges in advised.items()} == {
        os.path.realpath(name): merged(ranges) for name, ranges in spans.items()}


def test_a_changed_file_or_too_little_memory_reads_nothing_ahead(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(1 << 16))
    early_read.record(tmp_path, "options", {weights: [(0, 8192), (16384, 32768)]})
    assert early_read.recorded(tmp_path, "options") == {weights: [(0, 8192), (16384, 32768)]}
    assert early_read.recorded(tmp_path, "other options") == {}
    monkeypatch.setattr(early_read, "available_memory", lambda: 20000)  # 24 KiB to read: over 80% of it
    assert early_read.start(tmp_path, "options") is None
    monkeypatch.setattr(early_read, "available_memory", lambda: 1 << 30)
    thread = early_read.start(tmp_path, "options")
    assert thread is not None
    thread.join()
    with open(weights, "ab") as handle:
        handle.write(b"\0")
    assert early_read.recorded(tmp_path, "options") == {}
    assert early_read.start(tmp_path, "options") is None
