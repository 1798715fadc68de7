"""Memory-mapped weights (mapped_weights.py): the same logits as copied weights, a runtime-layout
file written once and rebuilt when the source changes, and a clear exit when a mapped file is cut."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mimo_local import early_read, mapped_weights
from mimo_local.checkpoint import Checkpoint
from mimo_local.cli import app
from mimo_local.loader import load_model

IDS = torch.tensor([[3, 17, 250, 9, 41, 7]])


def logits(model) -> torch.Tensor:
    return model(IDS, model.new_cache(16), all_logits=True).logits


def layout_files(model_dir):
    return sorted((model_dir / early_read.FOLDER).glob("*.safetensors"))


def mapped_storage(model) -> set[int]:
    """data_ptr of every parameter and buffer that lies inside one of the model's file mappings."""
    regions = []
    for mapped in model.mapped_files.maps.values():
        base = torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()
        regions.append((base, base + len(mapped)))
    return {id(t) for t in [*model.parameters(), *model.buffers()]
            if t.numel() and any(begin <= t.data_ptr() < end for begin, end in regions)}


@pytest.fixture
def fresh(checkpoints, tmp_path):
    """A private copy of a tiny checkpoint (the tests write its runtime layout and touch its files)."""
    def copy(preset: str, fp8: bool = False):
        target = tmp_path / f"{preset}-{fp8}"
        shutil.copytree(checkpoints(preset, fp8=fp8), target, ignore=shutil.ignore_patterns(early_read.FOLDER))
        return target
    return copy


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("preset,fp8,quant", [("mimo", False, None), ("mimo_v2_flash", False, None),
                                              ("mimo_v2_flash", True, None), ("mimo", False, "int8"),
                                              ("mimo_v2_flash", False, "v2flash-mixed"), ("mimo", False, "int4-g128"),
                                              ("mimo_v2.5", False, None), ("mimo_v2.6", False, None)])
def test_mapped_equals_copied(fresh, preset, fp8, quant):
    model_dir = fresh(preset, fp8)
    copied = load_model(model_dir, torch.bfloat16, quant=quant, mmap=False)
    assert not layout_files(model_dir)
    first = load_model(model_dir, torch.bfloat16, quant=quant)  # converts, writes the layout, maps it
    assert len(layout_files(model_dir)) == 1
    warm = load_model(model_dir, torch.bfloat16, quant=quant)
    expected = logits(copied)
    assert torch.equal(logits(first), expected)
    assert torch.equal(logits(warm), expected)
    tensors = [t for t in [*warm.parameters(), *warm.buffers()] if t.numel()]
    inv_freq = {id(m.inv_freq) for m in warm.modules() if hasattr(m, "inv_freq")}
    assert {id(t) for t in tensors} - inv_freq == mapped_storage(warm)  # every weight is mapped, none copied


def test_warm_start_reads_nothing(fresh, monkeypatch):
    model_dir = fresh("mimo")
    expected = logits(load_model(model_dir, torch.bfloat16))

    def no_reads(*args, **kwargs):
        raise AssertionError("a warm start read a tensor")

    monkeypatch.setattr(Checkpoint, "read_into", no_reads)
    monkeypatch.setattr(Checkpoint, "read", no_reads)
    assert torch.equal(logits(load_model(model_dir, torch.bfloat16)), expected)


def test_tied_embeddings_stay_one_parameter(fresh):
    model_dir = fresh("mimo")
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true'))
    copied = load_model(model_dir, torch.float32, mmap=False)
    load_model(model_dir, torch.float32)
    warm = load_model(model_dir, torch.float32)
    assert warm.lm_head.weight is warm.embed_tokens.weight
    assert torch.equal(logits(warm), logits(copied))


def test_layout_rebuilt_when_the_source_changes(fresh):
    model_dir = fresh("mimo")
    load_model(model_dir, torch.bfloat16)
    load_model(model_dir, torch.bfloat16, quant="int8")  # another variant: kept beside the first
    before = layout_files(model_dir)
    assert len(before) == 2
    shard = sorted(model_dir.glob("model-*.safetensors"))[0]
    checkpoint = Checkpoint(model_dir)
    entry = checkpoint.entries["model.layers.0.self_attn.q_proj.weight"]
    with open(shard, "r+b") as handle:  # new weights in place: a changed source
        handle.seek(entry.offset)
        handle.write(torch.zeros(entry.shape, dtype=entry.dtype).view(torch.uint8).numpy().tobytes())
    reloaded = load_model(model_dir, torch.bfloat16)
    after = layout_files(model_dir)
    assert len(after) == 2 and set(after) != set(before)  # the bf16 variant was replaced, the int8 one kept
    assert torch.equal(logits(reloaded), logits(load_model(model_dir, torch.bfloat16, mmap=False)))
    assert torch.count_nonzero(reloaded.layers[0].self_attn.qkv_proj.weight[:entry.shape[0]]) == 0


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other-model"])
def test_damaged_layout_is_rebuilt(fresh, checkpoints, damage):
    model_dir = fresh("mimo")
    expected = logits(load_model(model_dir, torch.bfloat16, mmap=False))
    load_model(model_dir, torch.bfloat16)
    (layout,) = layout_files(model_dir)
    if damage == "truncate":
        os.truncate(layout, layout.stat().st_size // 2)
    elif damage == "garbage":
        layout.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    else:  # a layout of another model under this name
        other = fresh("mimo_v2_flash")
        load_model(other, torch.bfloat16)
        shutil.copy(layout_files(other)[0], layout)
    assert torch.equal(logits(load_model(model_dir, torch.bfloat16)), expected)


def test_no_room_for_the_layout_loads_in_memory(fresh, monkeypatch, capsys):
    model_dir = fresh("mimo")
    monkeypatch.setattr(mapped_weights.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1000))
    model = load_model(model_dir, torch.bfloat16)
    assert "not caching the runtime layout" in capsys.readouterr().err
    assert not layout_files(model_dir)
    assert torch.equal(logits(model), logits(load_model(model_dir, torch.bfloat16, mmap=False)))


def test_read_only_model_folder_caches_under_the_user_cache(fresh, monkeypatch, tmp_path):
    model_dir = fresh("mimo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(mapped_weights.os, "access", lambda path, mode: False)
    load_model(model_dir, torch.bfloat16)
    assert not layout_files(model_dir)
    assert len(list((tmp_path / "cache" / "mimo-local" / "runtime").glob("*/*.safetensors"))) == 1


CUT_WHILE_RUNNING = """
import os, sys, torch
from mimo_local.loader import load_model
model = load_model(sys.argv[1], torch.bfloat16)
for path in model.mapped_files.paths():
    os.truncate(path, 4096)
model(torch.tensor([[1, 2, 3]]), model.new_cache(8))
print("not reached")
"""


def test_truncated_mapped_file_exits_with_a_message(fresh):
    model_dir = fresh("mimo")
    load_model(model_dir, torch.bfloat16)  # the layout exists: the child only maps
    result = subprocess.run([sys.executable, "-c", CUT_WHILE_RUNNING, str(model_dir)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert "was truncated or rewritten while in use" in result.stderr
    assert "not reached" not in result.stdout and "Traceback" not in result.stderr


def test_mlock_locks_the_mapped_weights(fresh):
    model_dir = fresh("mimo")
    load_model(model_dir, torch.bfloat16)
    locked_before = _locked_bytes()
    model = load_model(model_dir, torch.bfloat16, mlock=True)
    weights = sum(t.nbytes for t in model.parameters())
    assert _locked_bytes() - locked_before >= weights


def _locked_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmLck"))


def test_cli_flags(fresh):
    model_dir = fresh("mimo")
    runner = CliRunner()
    outputs = []
    for flags in ([], ["--no-mmap"], ["--mlock"]):
        result = runner.invoke(app, ["run", "-m", str(model_dir), "-n", "6", "--temperature", "0", "--no-mtp", "--raw",
                                     *flags, "hello"])
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(layout_files(model_dir)) == 1


def test_cold_start_reads_the_weights_ahead(fresh):
    model_dir = fresh("mimo")
    load_model(model_dir, torch.bfloat16)
    files = load_model(model_dir, torch.bfloat16).mapped_files
    for path in files.paths():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())  # written just now: only clean pages can be dropped
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert files.resident_fraction() < 0.5
    model = load_model(model_dir, torch.bfloat16)  # cold: read ahead before the first step
    assert model.mapped_files.resident_fraction() == 1.0


def test_a_cpu_start_leaves_the_offload_machinery_unimported(fresh):
    """accelerate costs 0.1-0.2 s of every start to import: only offloading needs it."""
    model_dir = fresh("mimo")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom mimo_local.cli import app\n"
            f"result = CliRunner().invoke(app, ['run', '-m', {str(model_dir)!r}, '-n', '2', '--raw', 'hi'])\n"
            "assert result.exit_code == 0, result.output\nprint('accelerate' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "False"
