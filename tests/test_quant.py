"""`mimo quantize` end to end on tiny hub-layout checkpoints: standard layouts checked by an
independent dequantizer, round trip through our loader, transformers' bitsandbytes path, resume,
corruption, recipe errors and the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mimo_local.checkpoint import Checkpoint, write_safetensors
from mimo_local.cli import app
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.errors import MimoError
from mimo_local.loader import load_model
from mimo_local.quant.convert import Interrupted, quantize_checkpoint
from mimo_local.quant.linear import QuantLinear
from mimo_local.quant.quality import evaluate

DENSE = dict(hidden_size=128, intermediate_size=256)
MOE = dict(hidden_size=128, intermediate_size=256, v_head_dim=32, moe_intermediate_size=128)
FAST = dict(calibration_tokens=512, sequence_length=128)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q") / "dense", "mimo", shards=3, overrides=DENSE)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q") / "moe", "mimo_v2_flash", fp8=True, shards=3, overrides=MOE)


def gptq_dequantize_independent(tensors: dict, base: str, bits: int) -> np.ndarray:
    """From the format description alone: qweight int32 [in*bits/32, out] packs inputs (lowest bits
    first), qzeros int32 [groups, out*bits/32] packs zero-1 along outputs, scales [groups, out],
    g_idx [in]. W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1))."""
    qweight = tensors[base + ".qweight"].numpy().view(np.uint32)
    qzeros = tensors[base + ".qzeros"].numpy().view(np.uint32)
    scales = tensors[base + ".scales"].float().numpy()
    g_idx = tensors[base + ".g_idx"].numpy()
    per_word, mask = 32 // bits, (1 << bits) - 1
    in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
    outputs = np.arange(out_features)
    zeros = (qzeros[:, outputs // per_word] >> (bits * (outputs % per_word)).astype(np.uint32)) & mask
    zeros = (zeros.astype(np.int64) + 1) & mask  # [groups, out]
    weight = np.zeros((out_features, in_features), dtype=np.float64)
    for i in range(in_features):
        codes = (qweight[i // per_word] >> np.uint32(bits * (i % per_word))) & mask
        group = g_idx[i]
        weight[:, i] = scales[group] * (codes.astype(np.int64) - zeros[group])
    return weight


def float_reference(source, out, tmp_path):
    """The source checkpoint with every weight replaced by its independent dequantization of `out`."""
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = {}
    for shard in sorted(out.glob("*.safetensors")):
        stored.update(load_file(shard))
    checkpoint = Checkpoint(source)
    tensors = {}
    for name, entry in checkpoint.entries.items():
        if name.endswith("_scale_inv"):
            continue
        base = name[: -len(".weight")]
        if base + ".qweight" in stored:
            bits = 32 * stored[base + ".qweight"].shape[0] // stored[base + ".g_idx"].numel()
            tensors[name] = torch.from_numpy(gptq_dequantize_independent(stored, base, bits)).float()
        elif base + ".SCB" in stored:
            tensors[name] = stored[name].float() * stored[base + ".SCB"][:, None] / 127
        elif base + ".weight.absmax" in stored:
            import bitsandbytes.functional as bnbf

            state = bnbf.QuantState.from_dict(
                {k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(name + ".")}, torch.device("cpu"))
            state.dtype = torch.float32  # bitsandbytes' own dequantization, without rounding to bf16
            tensors[name] = bnbf.dequantize_4bit(stored[name], state).float()
        else:
            tensors[name] = torch.empty(entry.shape, dtype=torch.float32)
            checkpoint.read_into(name, tensors[name])
    directory = tmp_path / "reference"
    directory.mkdir()
    write_safetensors(directory / "model.safetensors", tensors)
    raw = json.loads((source / "config.json").read_text())
    raw.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(raw))
    assert config["quant_method"] in ("gptq", "bitsandbytes")
    return directory


def logits(model_dir, quant=None):
    model = load_model(model_dir, quant=quant)
    ids = torch.arange(3, 40)[None]
    return model(ids, model.new_cache(64), all_logits=True).logits[0]


ACT_ORDER = """
name: gptq-act-order
rules:
  - match: '_proj\\.weight$'
    scheme: gptq
    group_size: 64
    act_order: true
"""


@pytest.mark.parametrize("recipe", ["int4-g128", "int8", "act-order", "nf4", "bnb-int8"])
def test_round_trip_matches_independent_dequantization(dense, tmp_path, recipe):
    if recipe == "act-order":
        recipe = tmp_path / "act.yaml"
        recipe.write_text(ACT_ORDER)
    out = tmp_path / "out"
    result = quantize_checkpoint(dense, recipe, out, **FAST)
    assert result.shards_written == 3 and result.shards_skipped == 0
    model = load_model(out)
    assert isinstance(model.layers[0].self_attn.qkv_proj, QuantLinear)
    if recipe == tmp_path / "act.yaml":
        assert model.layers[0].mlp.down_proj.perm is not None  # act-order loads as an input permutation
    reference = float_reference(dense, out, tmp_path)
    torch.testing.assert_close(logits(out), logits(reference), atol=2e-4, rtol=1e-4)


def test_gptq_layout_and_config(dense, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(dense, "int4-g128", out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}
    stored = load_file(out / "model-00001-of-00003.safetensors")
    base = "model.layers.0.self_attn.q_proj"
    assert stored[base + ".qweight"].dtype == torch.int32 and stored[base + ".qweight"].shape == (128 // 8, 128)
    assert stored[base + ".qzeros"].shape == (1, 128 // 8) and stored[base + ".scales"].dtype == torch.float16
    assert (stored[base + ".qzeros"] == 0x77777777).all()  # symmetric: zero 8 stored as 7 in every nibble
    original = Checkpoint(dense).read(base + ".weight").float()
    weight = torch.from_numpy(gptq_dequantize_independent(stored, base, 4)).float()
    step = stored[base + ".scales"].float().max()
    assert (weight - original).abs().max() <= step / 2 + 1e-3
    assert base + ".weight" not in stored and "model.embed_tokens.weight" in stored  # embeddings kept


def test_gptq_beats_round_to_nearest(dense, tmp_path):
    quantize_checkpoint(dense, "int4-g128", tmp_path / "rtn")
    quantize_checkpoint(dense, "gptq-int4-g128", tmp_path / "gptq", calibration_tokens=2048, sequence_length=256)
    rtn, gptq = evaluate(tmp_path / "rtn", tokens=512), evaluate(tmp_path / "gptq", tokens=512)
    assert rtn.reference == dense.name
    assert gptq.mean_kld < 0.8 * rtn.mean_kld, (gptq.mean_kld, rtn.mean_kld)


def test_nf4_output_loads_in_transformers_bitsandbytes(dense, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    quantize_checkpoint(dense, "nf4", out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    reference = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reference.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = reference(ids).logits[0].float()
    torch.testing.assert_close(logits(out), expected, atol=0.06, rtol=0.02)  # bnb computes in bf16


def test_v2flash_mixed_fp8_source_with_gptq_experts(moe, tmp_path):
    out = tmp_path / "mixed"
    quantize_checkpoint(moe, "v2flash-mixed", out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and any(k.startswith("+:") and v["bits"] == 8 for k, v in config["dynamic"].items())
    model = load_model(out)
    experts = model.layers[1].mlp.groups[0].gate_up_proj
    assert isinstance(experts, QuantLinear) and experts.kind == "int4" and experts.experts == 8
    assert model.layers[1].self_attn.qkv_proj.kind == "int8"
    torch.testing.assert_close(logits(out), logits(float_reference(moe, out, tmp_path)), atol=2e-4, rtol=1e-4)

    recipe = tmp_path / "rare.yaml"  # no expert sees a million tokens: every expert falls back to RTN
    recipe.write_text("rules:\n  - match: 'experts'\n    scheme: gptq\n    group_size: 64\n    min_tokens: 1000000\n"
                      "  - match: 'self_attn\\.[qkv]_proj'\n    scheme: gptq\n    group_size: 64\n")
    result = quantize_checkpoint(moe, recipe, tmp_path / "rare", calibration_tokens=256, sequence_length=64)
    assert len(result.rtn_fallbacks) == 5 * 8 * 3  # 5 MoE layers x 8 experts x gate/up/down
    assert all(".experts." in name for name in result.rtn_fallbacks)
    load_model(tmp_path / "rare")


def test_resume_after_interruption_gives_identical_output(dense, tmp_path):
    quantize_checkpoint(dense, "gptq-int4-g128", tmp_path / "clean", **FAST)

    def stop(shard):
        raise Interrupted(shard)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        quantize_checkpoint(dense, "gptq-int4-g128", out, after_shard=stop, **FAST)
    with pytest.raises(MimoError, match="incomplete quantized output"):
        load_model(out)
    result = quantize_checkpoint(dense, "gptq-int4-g128", out, **FAST)
    assert (result.shards_skipped, result.shards_written) == (1, 2)
    clean = json.loads((tmp_path / "clean" / "quant-manifest.json").read_text())["files"]
    resumed = json.loads((out / "quant-manifest.json").read_text())["files"]
    assert clean == resumed  # the replayed calibration reproduces the uninterrupted run bit for bit
    again = quantize_checkpoint(dense, "gptq-int4-g128", out, **FAST)
    assert (again.shards_skipped, again.shards_written) == (3, 0)


def test_corrupted_shard_is_rejected(dense, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(dense, "int8", out)
    shard = out / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MimoError, match="model-00002-of-00003.safetensors' is corrupt"):
        load_model(out)
    result = CliRunner().invoke(app, ["run", "--model", str(out), "-n", "2", "hello"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "corrupt" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_recipe_errors_come_before_any_work(dense, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: 'proj'\n    scheme: int3\n")
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("rules:\n  - match: 'no_such_proj'\n    scheme: int8\n  - match: 'proj'\n    scheme: int8\n")
    cases = [
        (str(bad), "unknown scheme 'int3'"),
        (str(nothing), "matches no tensor"),
        ("no-such-recipe", "unknown recipe 'no-such-recipe'"),
    ]
    for recipe, message in cases:
        out = tmp_path / "never"
        result = runner.invoke(app, ["quantize", str(dense), "--recipe", recipe, "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    odd = make_checkpoint(tmp_path / "odd", "mimo", overrides={"num_attention_heads": 3, "num_key_value_heads": 1,
                                                                 "hidden_size": 60})  # k_proj: 20 outputs
    with pytest.raises(MimoError, match="GPTQ packing needs out features divisible by 8"):
        quantize_checkpoint(odd, "int8", tmp_path / "never")
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("rules:\n  - match: 'q_proj'\n    scheme: nf4\n  - match: 'proj'\n    scheme: int8\n")
    with pytest.raises(MimoError, match="mixes GPTQ-layout and bitsandbytes"):
        quantize_checkpoint(dense, mixed, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_quantize_eval_and_run_quant(dense, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(dense), "--recipe", "int8", "--out", str(out), "--eval-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert "mean KLD" in result.output and "wrote" in result.output
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "quant-manifest.json"):
        assert (out / name).exists()
    result = runner.invoke(app, ["eval", str(out), "--tokens", "256", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["mean_kld"] < 0.002 and report["top1_agreement"] > 0.9 and report["tokens"] == 255
    result = runner.invoke(app, ["eval", str(dense), "--quant", "nf4", "--tokens", "128", "--json"])
    assert result.exit_code == 0 and 0 < json.loads(result.output)["mean_kld"] < 0.1
    result = runner.invoke(app, ["run", "--model", str(dense), "--quant", "int4-g128", "--temperature", "0", "-n", "4",
                                 "--json", "--raw", "hello"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["completion_tokens"] >= 1
    result = runner.invoke(app, ["run", "--model", str(dense), "--quant", "gptq-int4-g128", "-n", "2", "hello"])
    assert result.exit_code == 1 and "needs calibration" in result.output


def test_output_without_manifest_is_refused_even_without_progress_file(dense, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(dense, "int8", out)
    (out / "quant-manifest.json").unlink()
    (out / ".quant-progress.json").unlink()  # config.json still says it is a mimo quantize output
    with pytest.raises(MimoError, match="incomplete quantized output"):
        load_model(out)


def test_nf4_load_prints_no_bitsandbytes_warning(checkpoints):
    """bitsandbytes' note about its optional `kernels` package (a CPU GEMM mimo never calls) stays quiet."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mimo_local.cli", "run", "-m", str(checkpoints("mimo")), "--quant",
                             "nf4", "-n", "2", "--no-mtp", "--raw", "--temperature", "0", "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kernels" not in result.stderr and "Failed to load" not in result.stderr


def test_eval_and_quantize_name_what_is_wrong_with_a_directory(dense, tmp_path):
    """No config.json, a quantize run stopped before writing it, a config.json or progress file that
    is not JSON: each a one-line error naming the directory or file, exit code 1."""
    runner = CliRunner()

    def error_line(*args) -> str:
        result = runner.invoke(app, [str(arg) for arg in args])
        assert result.exit_code == 1, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_line("eval", empty) == f"error: {empty}: not a model directory (no config.json)"
    stopped_early = tmp_path / "stopped-early"
    stopped_early.mkdir()
    (stopped_early / ".quant-progress.json").write_text('{"fingerprint": "f", "shards": {}}')
    line = error_line("eval", stopped_early)
    assert "incomplete quantized output" in line and "rerun `mimo quantize`" in line

    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"hidden_size": ')
    for args in (["eval", bad_config], ["eval", bad_config, "--quant", "int8"],
                 ["quantize", bad_config, "--recipe", "int8", "--out", tmp_path / "never", "--no-eval"]):
        assert error_line(*args).startswith(f"error: {bad_config / 'config.json'}: not valid JSON"), args

    out = tmp_path / "out"
    out.mkdir()
    (out / ".quant-progress.json").write_text('{"fingerprint": ')
    line = error_line("quantize", dense, "--recipe", "int8", "--out", out, "--no-eval")
    assert line.startswith(f"error: {out / '.quant-progress.json'}: not valid JSON")
    assert f"corrupt: delete {out} and rerun `mimo quantize`" in line and "another quantization" not in line
    (out / ".quant-progress.json").write_text('{"shards": {}}')
    assert f"{out / '.quant-progress.json'}: no fingerprint" in error_line("quantize", dense, "--recipe", "int8",
                                                                        "--out", out, "--no-eval")
    shutil.rmtree(out)  # what the message says to do
    result = runner.invoke(app, ["quantize", str(dense), "--recipe", "int8", "--out", str(out), "--no-eval"])
    assert result.exit_code == 0 and (out / "quant-manifest.json").exists(), result.output
