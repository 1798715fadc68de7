"""`mimo quantize` interrupted at any instant resumes: an interrupt before or after every file
operation of a run (in process), and SIGINT / SIGKILL of the real CLI at points from its first
moments to its last shard, each followed by a rerun whose output is byte-identical to a clean run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimo_local.quant.convert import quantize_checkpoint

RECIPE = "int8"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from mimo_local.dev.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("interrupts") / "source", "mimo", shards=2)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    quantize_checkpoint(source, RECIPE, out)
    return snapshot(out)


class InterruptAt:
    """Raises KeyboardInterrupt just before (or just after) the n-th file operation."""

    WRAPPED = [(os, "replace"), (os, "mkdir"), (shutil, "copyfile"), (Path, "write_text"), (Path, "unlink")]

    def __init__(self, monkeypatch, n: int | None, after: bool):
        self.count, self.n, self.after = 0, n, after
        for owner, name in self.WRAPPED:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name)))

    def wrap(self, function):
        def wrapped(*args, **kwargs):
            self.count += 1
            hit = self.count == self.n
            if hit and not self.after:
                raise KeyboardInterrupt
            result = function(*args, **kwargs)
            if hit:
                raise KeyboardInterrupt
            return result

        return wrapped


def test_an_interrupt_around_every_file_operation_resumes_byte_identical(source, reference, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        counter = InterruptAt(patch, None, False)
        quantize_checkpoint(source, RECIPE, tmp_path / "counted")
    operations = counter.count
    assert operations >= 8  # mkdir, marker, config, tokenizer files, shards, index, manifest
    for n in range(1, operations + 1):
        for after in (False, True):
            out = tmp_path / f"out-{n}-{after}"
            with monkeypatch.context() as patch:
                InterruptAt(patch, n, after)
                with pytest.raises(KeyboardInterrupt):
                    quantize_checkpoint(source, RECIPE, out)
            quantize_checkpoint(source, RECIPE, out)
            assert snapshot(out) == reference, f"interrupted {'after' if after else 'before'} file operation {n}"


def test_a_killed_runs_temporary_files_are_removed_on_resume(source, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        InterruptAt(patch, 6, False)
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(source, RECIPE, out)
    # What SIGKILL leaves mid-write: temp files named after the dead process, which no rerun would reuse.
    (out / ".config.json.999999.tmp").write_text("{")
    (out / "model-00001-of-00002.safetensors.tmp").write_bytes(b"\0" * 10)
    quantize_checkpoint(source, RECIPE, out)
    assert snapshot(out) == reference


def start_quantize(source: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mimo_local.cli", "quantize", str(source), "--recipe", RECIPE, "--out", str(out),
               "--no-eval"]
    # SIGINT at its default: a test run in the background inherits it ignored.
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(process: subprocess.Popen, condition, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition() or process.poll() is not None:
            return condition()
        time.sleep(0.002)
    return False


# (when to interrupt, which signal): seconds after the start, or the appearance of an output file.
POINTS = [
    (0.05, signal.SIGKILL),
    (0.5, signal.SIGINT),
    (1.0, signal.SIGKILL),
    ("", signal.SIGKILL),  # the output directory
    (".quant-progress.json", signal.SIGINT),
    (".quant-progress.json", signal.SIGKILL),
    ("config.json", signal.SIGKILL),
    ("tokenizer.json", signal.SIGINT),
    ("model-00001-of-00002.safetensors", signal.SIGKILL),
    ("model-00002-of-00002.safetensors", signal.SIGINT),
]


@pytest.mark.parametrize("point, sig", POINTS, ids=[f"{p or 'out-dir'}-{s.name}" for p, s in POINTS])
def test_cli_killed_or_interrupted_at_a_point_resumes_byte_identical(source, reference, tmp_path, point, sig):
    out = tmp_path / "out"
    process = start_quantize(source, out)
    try:
        if isinstance(point, float):
            time.sleep(point)
        else:
            wait_for(process, lambda: os.path.lexists(out / point))
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read().decode()
    if isinstance(point, str):  # (a Ctrl-C while Python is still importing is Python's own traceback)
        assert "Traceback" not in stderr, stderr
    quantize_checkpoint(source, RECIPE, out)
    assert snapshot(out) == reference
