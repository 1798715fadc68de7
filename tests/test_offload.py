"""Expert offload execution on CPU: a MoE split into two expert groups (separate tensors) computes the
same logits as the unsplit model, through the C kernel and through the torch path CUDA groups take;
router statistics; planned vs measured memory; CUDA OOM reported with the plan's numbers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.kernels import cpu as cpu_kernels
from mimo_local.loader import load_model
from mimo_local.models.layers import MoE
from mimo_local.offload.hotness import load_stats
from mimo_local.offload.placement import Placement
from mimo_local.offload.plan import PlanRequest, make_plan

runner = CliRunner()


class TwoGroupsOnCpu(Placement):
    """Both groups on the CPU but in separate tensors: odd experts in one, even ones in the other."""

    def split_experts(self, model):
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.place([1 - e % 2 for e in range(layer.mlp.spec.num_experts)])


def logits_for(model, ids, decode_steps=4):
    """Prefill logits of every position, then greedy decode steps one token at a time."""
    cache = model.new_cache(len(ids) + decode_steps)
    out = [model(torch.tensor([ids]), cache, all_logits=True).logits[0]]
    token = out[0][-1].argmax()
    for _ in range(decode_steps):
        step = model(token.view(1, 1), cache).logits[0]
        out.append(step)
        token = step[-1].argmax()
    return torch.cat(out)


@pytest.fixture(scope="module")
def v2(checkpoints):
    return checkpoints("mimo_v2_flash")


def test_split_experts_give_the_unsplit_logits(v2, monkeypatch):
    ids = list(range(5, 45))
    whole = load_model(v2, torch.float32)
    split = load_model(v2, torch.float32, placement=TwoGroupsOnCpu(main="cpu"))
    moe = split.layers[1].mlp
    assert len(moe.groups) == 2 and moe.groups[0].experts == [1, 3, 5, 7]
    assert moe.groups[0].gate_up_proj.data_ptr() != moe.groups[1].gate_up_proj.data_ptr()
    expert_3 = whole.layers[1].mlp.groups[0].gate_up_proj[3]
    assert torch.equal(moe.groups[0].gate_up_proj[1], expert_3)
    reference = logits_for(whole, ids)
    assert torch.allclose(logits_for(split, ids), reference, atol=1e-5, rtol=0)
    # The path a CUDA group takes (torch only, tokens gathered per expert), here on the CPU.
    monkeypatch.setattr(cpu_kernels, "moe_supports", lambda x, gate_up: False)
    assert torch.allclose(logits_for(split, ids), reference, atol=1e-5, rtol=0)


def test_placement_without_mtp_skips_the_mtp_layers(v2):
    model = load_model(v2, torch.float32, placement=Placement(main="cpu", mtp=False))
    assert len(model.mtp_layers) == 0


def test_split_groups_keep_the_model_dtype(v2):
    split = load_model(v2, torch.bfloat16, placement=TwoGroupsOnCpu(main="cpu"))
    whole = load_model(v2, torch.bfloat16)
    assert {g.gate_up_proj.dtype for g in split.layers[1].mlp.groups} == {torch.bfloat16}
    ids = list(range(5, 30))
    assert torch.equal(logits_for(split, ids).argmax(-1), logits_for(whole, ids).argmax(-1))


def test_profile_experts_counts_tokens_times_top_k(v2, tmp_path):
    model_dir = shutil.copytree(v2, tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = runner.invoke(app, ["profile-experts", str(model_dir), "--text", str(text), "--window", "64",
                                 "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "router statistics" in result.stdout and "expert_stats.json" in result.stdout
    data = json.loads((model_dir / "expert_stats.json").read_text())
    from mimo_local.tokenizer import ChatTokenizer

    tokens = len(ChatTokenizer(model_dir).encode(text.read_text()))
    assert sorted(map(int, data["layers"])) == [1, 2, 3, 4, 5]  # the MoE layers of the tiny V2
    for entry in data["layers"].values():
        assert sum(entry["counts"]) == tokens * 2 and entry["tokens"] == tokens
    # The plan puts the most chosen experts on the GPU first.
    stats = load_stats(model_dir)
    hottest = max(((layer, e) for layer, row in stats.counts.items() for e in range(8)),
                  key=lambda le: (stats.share(*le), le[0]))
    one_expert = make_plan(model_dir, PlanRequest(gpu_mem=1, cpu_mem=1 << 34, ctx=64, cpu_moe=True))
    budget = one_expert.used("gpu") + one_expert.inventory.experts[0].nbytes
    placed = make_plan(model_dir, PlanRequest(gpu_mem=budget, cpu_mem=1 << 34, ctx=64))
    on_gpu = [(layer, e) for layer, row in placed.placement.experts.items() for e, d in enumerate(row) if d == "gpu"]
    assert on_gpu == [hottest]


def test_run_adds_its_router_counts_to_the_statistics(v2, tmp_path):
    model_dir = shutil.copytree(v2, tmp_path / "model")
    result = runner.invoke(app, ["run", "--model", str(model_dir), "--device", "cpu", "--temperature", "0", "-n", "5",
                                 "--no-mtp", "--json", "Hello there"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    stats = load_stats(model_dir)
    processed = out["prompt_tokens"] + out["completion_tokens"] - 1  # the last token is never fed back
    assert all(sum(row) == processed * 2 for row in stats.counts.values())


def test_profile_experts_refuses_a_dense_model(checkpoints, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    result = runner.invoke(app, ["profile-experts", str(checkpoints("mimo")), "--text", str(text), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr == "error: this model has no routed experts to profile (a dense MiMo-7B)\n"


def test_cuda_out_of_memory_is_reported_with_the_plan(v2, monkeypatch):
    from mimo_local.engine import Engine

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Engine, "stream", out_of_memory)
    result = runner.invoke(app, ["run", "--model", str(v2), "--device", "cpu", "--no-mtp", "hi"])
    assert result.exit_code == 1
    line = result.stderr
    assert line.startswith("error: CUDA out of memory: the plan puts ") and line.count("\n") == 1
    assert "weights" in line and "KV cache" in line and "--n-cpu-moe" in line


def test_run_refuses_a_plan_that_does_not_fit(v2):
    result = runner.invoke(app, ["run", "--model", str(v2), "--device", "cpu", "--cpu-mem", "1MiB", "hi"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: does not fit: cpu needs ") and result.stderr.count("\n") == 1


MEASURE = """
import ctypes, gc, json, sys, torch
from mimo_local.loader import load_model
from mimo_local.offload.plan import PlanRequest, make_plan

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024

def run(model, ctx):
    cache = model.new_cache(ctx)
    model(torch.arange(ctx - 8)[None] % 1000, cache)  # a prefill (torch GEMMs) ...
    for _ in range(8):
        model(torch.tensor([[7]]), cache)  # ... and decode steps (the C kernels)

ctx = 256
# Copied weights (--no-mmap): all in process memory. Mapped ones count in RSS only once touched
# (experts never routed to, MTP layers never run), so RSS would undercount what the plan reserves.
# Warm-up on the same shapes: torch's and oneDNN's one-time, per-shape state is not the model's.
run(load_model(sys.argv[1], torch.bfloat16, mmap=False), ctx)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart VmHWM from the current RSS
before = status("VmRSS")
plan = make_plan(sys.argv[1], PlanRequest(gpu_mem=0, cpu_mem=1 << 40, ctx=ctx, dtype=torch.bfloat16))
run(load_model(sys.argv[1], torch.bfloat16, placement=plan.placement, mmap=False), ctx)
print(json.dumps({"measured": status("VmHWM") - before, "planned": plan.used("cpu")}))
"""


def test_planned_memory_matches_measured_rss(tmp_path):
    from mimo_local.dev.tiny import make_checkpoint

    shape = dict(vocab_size=16000, hidden_size=256, num_hidden_layers=6, n_routed_experts=32, moe_intermediate_size=512,
                 intermediate_size=1024)
    model_dir = make_checkpoint(tmp_path / "medium-v2", "mimo_v2_flash", shards=2, overrides=shape)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(model_dir)], capture_output=True, text=True,
                         check=True, timeout=300)
    figures = json.loads(out.stdout)
    assert figures["planned"] > 50_000_000
    assert abs(figures["measured"] - figures["planned"]) <= 0.10 * figures["planned"], figures


def test_statistics_of_a_shipped_demo_model_go_to_the_store(tmp_path, monkeypatch):
    """The package folder may be read-only (site-packages): a demo model's router statistics live
    under MIMO_HOME instead of beside its weights."""
    from mimo_local.store.names import DEMO_DIR
    from mimo_local.offload.hotness import stats_path

    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    assert stats_path(DEMO_DIR / "mimo-nano-moe") == tmp_path / "expert_stats" / "mimo-nano-moe.json"
    assert stats_path(tmp_path / "my-model") == (tmp_path / "my-model" / "expert_stats.json").resolve()
