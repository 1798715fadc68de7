"""`mimo plan`: arithmetic on the real MiMo-7B and V2-Flash configs (built on meta, no weights),
placement policy, advice when a plan does not fit, and the CLI."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import compute_module_sizes
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.errors import MimoError
from mimo_local.offload.hotness import ExpertStats
from mimo_local.models import build_meta_model
from mimo_local.offload.inventory import read_model_source, take_inventory
from mimo_local.offload.plan import PlanRequest, make_plan, parse_overrides
from mimo_local.quant.recipes import load_recipe

DATA = Path(__file__).parent / "data"
V2 = DATA / "mimo-v2-flash.config.json"
M7B = DATA / "mimo-7b-rl.config.json"
GIB = 1 << 30


def plan(source=V2, **fields):
    fields.setdefault("gpu_mem", 24 * GIB)
    fields.setdefault("cpu_mem", 512 * GIB)
    return make_plan(source, PlanRequest(**fields))


def test_v2_flash_parameters_and_kv_cache():
    result = plan(ctx=32768)
    # 309B total, ~15B active: 47 MoE layers x 256 experts x 3 x 2048 x 4096 expert weights
    assert 308.5e9 < result.inventory.total_params < 309.5e9
    assert 15.0e9 < result.inventory.active_params_per_token < 16.0e9
    expert_params = 47 * 256 * 3 * 2048 * 4096
    assert sum(u.params for u in result.inventory.experts) == expert_params
    # Growing KV: 9 global layers x 4 kv heads x (192 + 128) x 2 B = 22.5 KiB per token
    assert result.kv_bytes_per_token == 9 * 4 * (192 + 128) * 2 == 22.5 * 1024
    # Fixed: 39 sliding layers + 3 MTP layers (sliding), window 128 + 8 spare slots, 8 kv heads
    assert result.kv_fixed_bytes == (39 + 3) * (128 + 8) * 8 * (192 + 128) * 2
    longer = plan(ctx=65536)
    assert longer.kv["gpu"] - result.kv["gpu"] == 32768 * 22.5 * 1024
    assert result.to_json()["weight_bytes"]["cpu"]["experts"] + result.weights["gpu"]["experts"] == expert_params * 2


def test_mimo_7b_parameters_and_kv_cache():
    result = plan(M7B, ctx=4096, mtp=False)
    hidden, layers, inter, vocab, kv_dim = 4096, 36, 11008, 151680, 8 * 128
    attention = hidden * (hidden + 2 * kv_dim) + (hidden + 2 * kv_dim) + hidden * hidden
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    assert result.inventory.total_params == layers * per_layer + 2 * vocab * hidden + hidden
    assert result.inventory.active_params_per_token == result.inventory.total_params
    assert result.kv_bytes_per_token == 36 * 8 * 256 * 2 and result.kv_fixed_bytes == 0
    assert result.mtp_layers == 0 and result.experts_total == 0
    with_mtp = plan(M7B, ctx=4096)
    assert with_mtp.mtp_layers == 1 and with_mtp.kv_bytes_per_token == 37 * 8 * 256 * 2


def test_unquantized_bytes_agree_with_accelerate_module_sizes():
    config = read_model_source(V2).config
    inventory = take_inventory(config, 3, torch.bfloat16)
    model = build_meta_model(config, 3, torch.bfloat16)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE tables, not weights
    assert sum(u.nbytes for u in inventory.units) == compute_module_sizes(model)[""] - buffers


def test_recipe_bytes_follow_the_runtime_layouts():
    result = plan(quant="v2flash-mixed", ctx=4096)
    int4_expert = 3 * (2048 * 4096 // 2 + 2 * 2048 * (4096 // 128) * 4)  # packed + fp32 scale and zero per group
    assert result.weights["gpu"]["experts"] + result.weights["cpu"]["experts"] == 47 * 256 * int4_expert
    assert load_recipe("v2flash-mixed").scheme_for("model.layers.0.self_attn.q_proj.weight").bits == 8
    # attention weights int8: one byte each plus a float32 scale per row; o_proj too
    attention = plan(quant="v2flash-mixed", ctx=4096).weights["gpu"]["attention"]
    assert attention < plan(ctx=4096).weights["gpu"]["attention"] * 0.55


def test_policy_fills_the_gpu_with_the_hottest_experts():
    config = read_model_source(V2).config
    counts = {layer: [0] * 256 for layer in range(1, 48)}
    counts[30][7] = 1000  # a few very hot experts in the middle of the model
    counts[12][200] = 900
    stats = ExpertStats(256, 8, counts)
    budget = plan(ctx=4096, quant="int4-g128", gpu_mem=0, cpu_mem=512 * GIB)
    non_experts = plan(ctx=4096, quant="int4-g128", cpu_moe=True)
    room_for_two = non_experts.used("gpu") + 2 * budget.inventory.experts[0].nbytes + 1000
    result = make_plan(V2, PlanRequest(gpu_mem=room_for_two, cpu_mem=512 * GIB, ctx=4096, quant="int4-g128"), stats)
    on_gpu = [(layer, e) for layer, row in result.placement.experts.items() for e, d in enumerate(row) if d == "gpu"]
    assert sorted(on_gpu) == [(12, 200), (30, 7)]
    assert result.fits and result.used("gpu") <= room_for_two


def test_cpu_moe_n_cpu_moe_and_override_tensor():
    assert plan(cpu_moe=True, quant="int4-g128", ctx=4096).experts_on_gpu == 0
    result = plan(n_cpu_moe=10, quant="int4-g128", ctx=4096, gpu_mem=80 * GIB)
    first = [layer for layer in range(1, 11)]
    assert all(d == "cpu" for layer in first for d in result.placement.experts[layer])
    assert any(d == "gpu" for d in result.placement.experts[47])
    moved = plan(ctx=4096, quant="int4-g128", overrides=parse_overrides([r"^lm_head=cpu", r"layers\.47\.mlp\.experts\.=cpu"]))
    assert moved.placement.modules == {"lm_head": "cpu"}
    assert moved.weights["cpu"]["lm_head"] == 152576 * (4096 + 4)  # int8 with one float32 scale per row
    assert set(moved.placement.experts[47]) == {"cpu"}
    with pytest.raises(MimoError, match="norms and sinks cannot move"):
        plan(ctx=4096, overrides=parse_overrides([r"input_layernorm=cpu"]))
    with pytest.raises(MimoError, match="GPU budget is 0"):
        plan(ctx=4096, gpu_mem=0, overrides=parse_overrides([r"lm_head=gpu"]))


def test_does_not_fit_says_what_to_change():
    gpu_short = plan(M7B, ctx=32768, gpu_mem=17 * GIB, cpu_mem=8 * GIB)
    assert not gpu_short.fits
    verdict = gpu_short.verdict()
    assert re.search(r"gpu needs 19\.\d\d GiB of 17\.00 GiB \(\d\.\d\d GiB over\)", verdict)
    assert "--ctx 15872" in verdict and "--quant int4-g128" in verdict
    experts = plan(ctx=4096, gpu_mem=24 * GIB, cpu_mem=200 * GIB)
    assert not experts.fits and "a 4-bit recipe" in experts.verdict()
    ok = plan(ctx=4096, gpu_mem=24 * GIB, cpu_mem=200 * GIB, quant="int4-g128")
    assert ok.fits and ok.verdict().startswith("fits: gpu")


def test_real_v2_flash_plans_quickly():
    started = time.perf_counter()
    plan(ctx=262144, quant="int4-g128")
    assert time.perf_counter() - started < 15


runner = CliRunner()


def test_cli_plan_json():
    result = runner.invoke(app, ["plan", str(V2), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--ctx", "32768",
                                 "--quant", "int4-g128", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"total_params", "active_params_per_token", "weight_bytes", "kv_bytes_per_token", "kv_fixed_bytes",
            "fits"} <= set(data)
    assert data["fits"] is True and data["kv_bytes_per_token"] == 23040
    assert set(data["weight_bytes"]) == {"gpu", "cpu"}
    assert {"embeddings", "attention", "dense_ffn", "experts", "mtp", "lm_head", "norms", "total"} <= set(
        data["weight_bytes"]["gpu"])


def test_cli_plan_table_and_exit_code_when_it_does_not_fit():
    result = runner.invoke(app, ["plan", str(M7B), "--gpu-mem", "8GiB", "--cpu-mem", "4GiB", "--ctx", "4096"])
    assert result.exit_code == 1
    assert "memory plan" in result.stdout and "KV cache (148.0 KiB/token)" in result.stdout
    assert "does not fit: gpu needs" in result.stdout
    fits = runner.invoke(app, ["plan", str(M7B), "--gpu-mem", "24GiB", "--cpu-mem", "4GiB", "--no-mtp"])
    assert fits.exit_code == 0 and "fits: gpu" in fits.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpu-mem", "lots"], "error: --gpu-mem lots: not a size"),
    (["--override-tensor", "lm_head=tpu"], "error: --override-tensor: unknown device 'tpu'"),
    (["--quant", "int3"], "error: unknown recipe 'int3'"),
    (["--ctx", "999999"], "error: --ctx 999999 is beyond the model's 262144 positions"),
])
def test_cli_plan_errors_are_one_line(args, message):
    result = runner.invoke(app, ["plan", str(V2), *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def test_cli_plan_missing_model():
    result = runner.invoke(app, ["plan", "/nonexistent/model"])
    assert result.exit_code == 1 and result.stderr == "error: model directory not found: /nonexistent/model\n"
