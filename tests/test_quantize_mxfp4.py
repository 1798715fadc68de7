"""`mimo quantize` of a checkpoint whose routed experts are MXFP4 (the `mimo_v2.6` tiny preset): the
experts are copied as stored, the recipe quantizes the rest, and the output runs."""

import json

import kernel_builds
from near_greedy import assert_near_greedy
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimo_local.checkpoint import Checkpoint
from mimo_local.cli import app
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.loader import load_model
from mimo_local.offload.schemes import runtime_bytes
from mimo_local.quant.linear import QuantLinear
from mimo_local.quant.stored import StoredQuantization

# int8 like the shipped recipe, but never the experts: the V2-Flash-layout twin's experts are the
# MXFP4 values in float32, so they must stay as they are for the two outputs to hold the same weights
INT8_BUT_EXPERTS = """
name: int8-but-experts
rules:
  - match: '^lm_head\\.weight$'
    scheme: int8
    optional: true
  - match: '^(?!.*\\.experts\\.).*_proj\\.weight$'
    scheme: int8
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def v26(tmp_path_factory):
    root = tmp_path_factory.mktemp("v26q")
    return make_checkpoint(root / "hub", "mimo_v2.6"), make_checkpoint(root / "twin", "mimo_v2.6", twin=True)


def stored(directory):
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def logits(model_dir):
    model = load_model(model_dir)
    ids = torch.arange(3, 40)[None]
    return model(ids, model.new_cache(64), all_logits=True).logits[0]


@pytest.mark.parametrize("recipe", ["int8", "int4-g128"])
def test_mxfp4_experts_are_kept_as_stored_and_the_rest_quantized(v26, tmp_path, recipe):
    hub, _ = v26
    out = tmp_path / "out"
    result = invoke("quantize", hub, "--recipe", recipe, "--out", out, "--no-eval")
    assert result.exit_code == 0, result.output
    assert "120 MXFP4 expert weights kept as stored" in result.output  # 5 MoE layers x 8 experts x 3
    source, written = Checkpoint(hub), stored(out)
    experts = [n for n, e in source.entries.items() if ".experts." in n and e.dtype == torch.uint8]
    assert len(experts) == 2 * 120  # each weight and its E8M0 scales
    for name in experts:
        assert torch.equal(written[name], source.read(name)), name
    assert "model.layers.1.self_attn.qkv_proj.qweight" in written
    assert not any(".experts." in name and name.endswith(".qweight") for name in written)
    model = load_model(out)
    assert model.layers[1].mlp.groups[0].down_proj.kind == "mxfp4"
    assert isinstance(model.layers[1].self_attn.qkv_proj, QuantLinear)
    run = invoke("run", "-m", out, "--temperature", "0", "-n", "8", "--json", "--no-mtp", "Hello")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["completion_tokens"] >= 1


def test_output_computes_like_the_same_quantization_of_the_float_twin(v26, tmp_path):
    """The twin holds the same weights in the V2-Flash layout with the experts dequantized: quantized
    alike (int8 rows, experts untouched), both outputs give the same logits on torch's float matmuls
    (the MXFP4 kernels round activations to int8, which the twin's float experts do not: its effect
    is bounded in tests/test_mxfp4_kernels.py) and greedy ids the twin scores within the MXFP4 rounding of its best (near_greedy.py)."""
    hub, twin = v26
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(INT8_BUT_EXPERTS)
    for source, out in ((hub, tmp_path / "hub-q"), (twin, tmp_path / "twin-q")):
        result = invoke("quantize", source, "--recipe", recipe, "--out", out, "--no-eval")
        assert result.exit_code == 0, result.output
    with kernel_builds.kernels(enabled=False):
        torch.testing.assert_close(logits(tmp_path / "hub-q"), logits(tmp_path / "twin-q"), atol=2e-4, rtol=1e-4)
    run = invoke("run", "-m", tmp_path / "hub-q", "--temperature", "0", "-n", "12", "--json", "--no-mtp", "Hello")
    assert run.exit_code == 0, run.output
    tokens = json.loads(run.stdout)["token_ids"]
    assert len(tokens) == 12
    assert_near_greedy(tmp_path / "twin-q", "Hello", tokens)


def test_keeping_the_experts_is_no_worse_than_requantizing_them(v26, tmp_path):
    """Against each one's unquantized source: the int8 recipe with the MXFP4 experts kept, and int8
    of every weight, experts too, of the float twin. Keeping them adds no error and saves space."""
    hub, twin = v26
    out = tmp_path / "out"
    assert invoke("quantize", hub, "--recipe", "int8", "--out", out, "--no-eval").exit_code == 0
    reports = [invoke("eval", *args, "--tokens", "256", "--json") for args in ((out,), (twin, "--quant", "int8"))]
    assert all(report.exit_code == 0 for report in reports), [report.output for report in reports]
    kept, requantized = (json.loads(report.output) for report in reports)
    assert kept["reference"] == hub.name and kept["top1_agreement"] > 0.9
    assert kept["mean_kld"] < requantized["mean_kld"] < 0.01, (kept, requantized)


def test_plan_counts_the_kept_experts_at_mxfp4_size(v26, tmp_path):
    """`mimo plan` / placement read the output's stored quantization: a kept expert weighs 4.25 bits."""
    hub, _ = v26
    out = tmp_path / "out"
    assert invoke("quantize", hub, "--recipe", "int8", "--out", out, "--no-eval").exit_code == 0
    raw = json.loads((out / "config.json").read_text())
    expert, attention = "model.layers.1.mlp.experts.0.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    shapes = {expert: (64, 32), attention: tuple(Checkpoint(hub).entries[attention].shape)}
    plan = StoredQuantization(raw, Checkpoint(out).entries).plan(shapes, set(shapes))
    assert (plan[expert].name, plan[expert].blocksize) == ("mxfp4", 32)
    assert runtime_bytes(plan[expert], shapes[expert], 2) == 64 * (32 // 2 + 32 // 32)
    assert plan[attention].name == "gptq" and plan[attention].bits == 8
