"""The planner counts what a checkpoint really holds: a quantized output as its GPTQ / bitsandbytes
tensors (or, from config.json alone, its quantization_config), FP8 as the bf16 it becomes; --quant
on a quantized model is refused; the advice of a plan that does not fit works for that model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.errors import MimoError
from mimo_local.store.resolve import resolve_model
from mimo_local.loader import load_model
from mimo_local.offload.plan import PlanRequest, make_plan
from mimo_local.quant.convert import quantize_checkpoint
from mimo_local.quant.linear import QuantLinear

from test_plan import V2

runner = CliRunner()
GIB = 1 << 30
BIG = 1 << 40


def loaded_weight_bytes(model) -> int:
    """What a loaded model holds in weights: its parameters and the quantized layers' buffers."""
    total = sum(p.nbytes for p in model.parameters())
    return total + sum(b.nbytes for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers())


def run_plan(source, **fields):
    fields = {"gpu_mem": 0, "cpu_mem": BIG, "ctx": 256, **fields}
    return make_plan(source, PlanRequest(**fields))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """mimo-nano-moe (the V2-Flash architecture) quantized with each recipe family."""
    root = tmp_path_factory.mktemp("quantized")
    source = resolve_model("mimo-nano-moe")
    return source, {recipe: quantize_checkpoint(source, recipe, root / recipe).out
                    for recipe in ("int4-g128", "int8", "v2flash-mixed", "nf4")}


@pytest.mark.parametrize("recipe", ["int4-g128", "int8", "v2flash-mixed", "nf4"])
def test_quantized_output_is_planned_at_the_bytes_it_loads_into(outputs, recipe):
    source, out = outputs[0], outputs[1][recipe]
    planned = run_plan(out)
    model = load_model(out, torch.bfloat16, "cpu")
    measured = loaded_weight_bytes(model)
    assert abs(planned.weight_bytes - measured) <= 0.10 * measured, (planned.weight_bytes, measured)
    assert planned.weight_bytes < 0.7 * run_plan(source).weight_bytes  # not the bf16 size
    # the same bytes as --quant RECIPE on the source (both are the runtime layouts)
    assert planned.weight_bytes == run_plan(source, quant=recipe).weight_bytes
    assert planned.to_json()["weights_format"].startswith("gptq" if recipe != "nf4" else "bitsandbytes nf4")


def test_a_quantized_output_runs_in_a_budget_its_source_does_not_fit(outputs):
    source, out = outputs[0], outputs[1]["int4-g128"]
    ctx = len("hi") + 64 + 8 + 8  # what `mimo run -n 8 "hi"` sizes its cache for
    quantized = run_plan(out, ctx=ctx, clamp_ctx=True).used("cpu")
    original = run_plan(source, ctx=ctx, clamp_ctx=True).used("cpu")
    budget = f"{(quantized + original) // 2 // 1024}KiB"
    refused = runner.invoke(app, ["run", "-m", str(source), "--cpu-mem", budget, "-n", "8", "hi"])
    assert refused.exit_code == 1 and "does not fit" in refused.stderr
    assert "--quant int4-g128" in refused.stderr  # the advice, checked below to work
    for args in (["-m", str(out)], ["-m", str(source), "--quant", "int4-g128"]):
        result = runner.invoke(app, ["run", *args, "--cpu-mem", budget, "-n", "8", "--json", "hi"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["completion_tokens"] >= 1


def test_advice_for_a_quantized_output_never_suggests_quant(outputs):
    out = outputs[1]["int4-g128"]
    result = runner.invoke(app, ["run", "-m", str(out), "--cpu-mem", "1MiB", "-n", "8", "hi"])
    assert result.exit_code == 1 and "does not fit" in result.stderr
    assert "--quant" not in result.stderr and "4-bit recipe" not in result.stderr


@pytest.mark.parametrize("command", ["plan", "run"])
def test_quant_on_a_quantized_model_is_a_one_line_error(outputs, command):
    out = outputs[1]["int4-g128"]
    args = [str(out)] if command == "plan" else ["-m", str(out), "hi"]
    result = runner.invoke(app, [command, *args, "--quant", "int8"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: int4-g128 is already quantized (gptq 4-bit")
    assert "load it without --quant" in result.stderr and result.stderr.count("\n") == 1


def test_nano_moe_advice_works(outputs):
    """mimo-nano-moe in a budget only 4 bits fit: the advice names --quant int4-g128, which runs."""
    source = outputs[0]
    ctx = len("hi") + 64 + 8 + 8
    four_bit = run_plan(source, ctx=ctx, clamp_ctx=True, quant="int4-g128").used("cpu")
    budget = f"{four_bit // 1024 + 64}KiB"
    result = runner.invoke(app, ["run", "-m", str(source), "--cpu-mem", budget, "-n", "8", "hi"])
    assert "try a 4-bit recipe (--quant int4-g128)" in result.stderr
    result = runner.invoke(app, ["run", "-m", str(source), "--cpu-mem", budget, "--quant", "int4-g128", "-n", "8", "hi"])
    assert result.exit_code == 0, result.output
    nothing = runner.invoke(app, ["run", "-m", str(source), "--cpu-mem", "1MiB", "-n", "8", "hi"])
    assert nothing.exit_code == 1 and "try" not in nothing.stderr  # nothing would fit: no advice


@pytest.fixture(scope="module")
def v2flash_mixed_config(tmp_path_factory):
    """The quantization_config `mimo quantize --recipe v2flash-mixed` writes for a V2-Flash model
    (from a small V2-Flash whose experts are multiples of 128, so no group is adjusted)."""
    root = tmp_path_factory.mktemp("v2mixed")
    source = make_checkpoint(root / "source", "mimo_v2_flash", overrides={"hidden_size": 128, "moe_intermediate_size": 128})
    out = quantize_checkpoint(source, "v2flash-mixed", root / "out").out
    return json.loads((out / "config.json").read_text())["quantization_config"]


def test_real_v2_flash_with_the_gptq_config_of_a_v2flash_mixed_output(v2flash_mixed_config, tmp_path):
    raw = json.loads(V2.read_text())
    raw["quantization_config"] = v2flash_mixed_config
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    result = runner.invoke(app, ["plan", str(config), "--gpu-mem", "0", "--cpu-mem", "512GiB", "--ctx", "4096", "--json"])
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)
    weights = stored["weight_bytes"]["cpu"]
    int4_expert = 3 * (2048 * 4096 // 2 + 2 * 2048 * (4096 // 128) * 4)  # packed + fp32 scale and zero per group
    assert weights["experts"] == 47 * 256 * int4_expert
    recipe = run_plan(V2, ctx=4096, quant="v2flash-mixed")
    assert weights == {**recipe.weights["cpu"], "total": recipe.weight_bytes}  # int8 attention, kept embeddings...
    assert stored["weights_format"].startswith("gptq 4-bit g128")
    assert weights["total"] < 0.3 * run_plan(V2, ctx=4096).weight_bytes
    refused = runner.invoke(app, ["plan", str(config), "--quant", "int4-g128"])
    assert refused.exit_code == 1 and "already quantized" in refused.stderr


def test_real_v2_flash_fp8_is_planned_as_the_bf16_it_loads_into():
    assert json.loads(V2.read_text())["quantization_config"]["quant_method"] == "fp8"
    plan = run_plan(V2, ctx=4096)
    params = plan.inventory.total_params + plan.inventory.mtp_params
    router = plan.weights["cpu"]["router"]  # routers compute in float32: 4 bytes per parameter
    assert plan.weight_bytes == 2 * params + router // 2  # 2 bytes per parameter (bf16) everywhere else
    assert plan.weights_format == "fp8 -> bfloat16 (dequantized on load)"
    assert run_plan(V2, ctx=4096, quant="int4-g128").weight_bytes < 0.3 * plan.weight_bytes


def test_quant_on_a_bare_gptq_config_is_refused(tmp_path):
    raw = json.loads(V2.read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    with pytest.raises(MimoError, match="already quantized"):
        run_plan(config, quant="int8")


def test_advice_names_only_flags_the_front_end_has():
    from test_plan import M7B

    chat = run_plan(M7B, ctx=32768, gpu_mem=17 * GIB, cpu_mem=8 * GIB)
    assert "--ctx 15872" in chat.verdict()
    run = run_plan(M7B, ctx=32768, gpu_mem=17 * GIB, cpu_mem=8 * GIB, ctx_flag=None)  # `mimo run` has no --ctx
    assert "--ctx" not in run.verdict() and "--quant int4-g128" in run.verdict()


@pytest.mark.parametrize("recipe", ["int4-g128", "int8"])
def test_quantized_load_and_run_stay_within_the_plan(tmp_path, recipe):
    """RSS growth of loading a quantized output and running it (peak, loading transients included)
    against the plan: GPTQ words are unpacked one shift at a time, so no int64 copy of the
    largest tensor (here the int8 lm_head) appears on the way."""
    import subprocess
    import sys

    from test_offload import MEASURE

    shape = dict(vocab_size=16000, hidden_size=256, num_hidden_layers=6, n_routed_experts=32, moe_intermediate_size=512,
                 intermediate_size=1024)
    source = make_checkpoint(tmp_path / "medium-v2", "mimo_v2_flash", shards=2, overrides=shape)
    out = quantize_checkpoint(source, recipe, tmp_path / recipe).out
    measured = subprocess.run([sys.executable, "-c", MEASURE, str(out)], capture_output=True, text=True, check=True,
                              timeout=300)
    figures = json.loads(measured.stdout)
    assert figures["planned"] > 40_000_000
    assert abs(figures["measured"] - figures["planned"]) <= 0.10 * figures["planned"], figures


def test_an_unfinished_output_is_named_so_by_the_plan(outputs, tmp_path):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(outputs[1]["int8"], unfinished)
    (unfinished / "quant-manifest.json").unlink()
    (unfinished / "model.safetensors.index.json").unlink(missing_ok=True)
    for command in (["plan", str(unfinished)], ["run", "-m", str(unfinished), "hi"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1
        assert "incomplete quantized output" in result.stderr and "rerun `mimo quantize`" in result.stderr


def test_advice_does_not_contradict_other_flags():
    from mimo_local.offload.plan import parse_overrides
    from test_plan import M7B

    free_to_move = run_plan(M7B, ctx=32768, gpu_mem=17 * GIB, cpu_mem=64 * GIB)
    assert "--gpu-mem 0 (all on the CPU)" in free_to_move.verdict()
    pinned = run_plan(M7B, ctx=32768, gpu_mem=17 * GIB, cpu_mem=64 * GIB, overrides=parse_overrides(["lm_head=gpu"]))
    assert not pinned.fits and "--gpu-mem 0" not in pinned.verdict()  # lm_head=gpu needs a GPU


@pytest.mark.parametrize("quantization_config", [
    {"quant_method": "gptq", "bits": "four", "group_size": 128},
    {"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": ["not", "a", "dict"]},
    {"quant_method": "awq", "bits": 4},
])
def test_a_bad_quantization_config_is_a_one_line_error(quantization_config, tmp_path):
    raw = json.loads(V2.read_text())
    raw["quantization_config"] = quantization_config
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    result = runner.invoke(app, ["plan", str(config)])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {config}: ") and result.stderr.count("\n") == 1
