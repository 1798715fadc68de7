"""MiMo-V2.5, V2.5-Pro and V2.6 (model_type "mimo_v2"): their published configs parse onto the
V2-Flash backbone, `mimo plan` counts them as published (encoders never counted, MXFP4 experts at
4.25 bits), the aliases name their hub repositories. Sources of the configs: tests/data/SOURCES.md."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.config import parse_config
from mimo_local.store.names import parse_name

DATA = Path(__file__).parent / "data"
V25 = DATA / "mimo-v2.5.config.json"
V25_PRO = DATA / "mimo-v2.5-pro.config.json"
V26_FLASH = DATA / "mimo-v2.6-flash-rl.reconstructed.config.json"
V2_FLASH = DATA / "mimo-v2-flash.config.json"


def raw(path: Path) -> dict:
    return json.loads(path.read_text())


def plan_json(path: Path, *extra: str) -> dict:
    result = CliRunner().invoke(app, ["plan", str(path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB",
                                      "--ctx", "32768", "--json", *extra])
    assert result.exit_code in (0, 1), result.output  # 1: does not fit, still a full report
    return json.loads(result.stdout)


def backbone_params(hidden, vocab, layers, global_layers, qkv_rows, heads, ffn, experts, expert_ffn):
    """Written from the published tensor table (SOURCES.md): embed_tokens and lm_head, the final
    norm, per layer two norms, o_proj [hidden, heads x 128], qkv_proj [rows, hidden] (global /
    sliding rows), a sink per head on the sliding layers; layer 0 a dense MLP, the others a router
    [experts, hidden] + its bias and experts x 3 x [expert_ffn, hidden]."""
    sliding = layers - len(global_layers)
    total = 2 * vocab * hidden + hidden + layers * (2 * hidden + hidden * heads * 128)
    total += len(global_layers) * qkv_rows[0] * hidden + sliding * (qkv_rows[1] * hidden + heads)
    total += 3 * ffn * hidden + (layers - 1) * (experts * hidden + experts + experts * 3 * expert_ffn * hidden)
    return total


V25_BACKBONE = backbone_params(4096, 152576, 48, [0, 5, 11, 17, 23, 29, 35, 41, 47], (13568, 14848), 64,
                               16384, 256, 2048)
PRO_BACKBONE = backbone_params(6144, 152576, 70, [0, 7, 15, 23, 31, 39, 47, 55, 62, 69], (27136, 27136), 128,
                               16384, 384, 2048)


def test_backbone_formula_accounts_for_every_published_tensor():
    """The formula above plus the tables' other tensors (FP8 scales, MTP layers, encoders) gives the
    element counts the checkpoints report, so it is the backbone as published."""
    scales = 9 * 108 * 32 + 39 * 116 * 32 + 3 * 128 * 32 + 47 * 256 * 3 * 16 * 32
    mtp = 3 * (4096 * 8192 + 5 * 4096 + 3 * 16384 * 4096 + 64 + 4096 * 8192 + 14848 * 4096 + 3 * 128 * 32 + 116 * 32)
    audio = 6 * (2 * 1024 + 3 * 4096 * 1024 + 4 * 1024 * 1024 + 3 * 1024) + 1024 + 2 * 16384 * 4096
    speech = 20 * 1280 * 1024
    vision_block = 1280 * 2048 + 1280 + 3072 * 1280 + 3072 + 3 * 4608 * 1280 + 2 * 4608 + 1280 + 2 * 1280
    vision = 28 * vision_block + 24 * 32 + 1280 + 5120 * 5120 + 4096 * 5120 + 1280 * 3 * 2 * 16 * 16
    assert V25_BACKBONE + scales + mtp + audio + speech + vision == 310_775_040_000
    pro_scales = 70 * 216 * 48 + 3 * 128 * 48 + 69 * 384 * 3 * 16 * 48
    pro_mtp = 3 * (6144 * 12288 + 5 * 6144 + 3 * 16384 * 6144 + 128 + 6144 * 16384 + 27136 * 6144
                   + 3 * 128 * 48 + 216 * 48)
    assert PRO_BACKBONE + pro_scales + pro_mtp == 1_023_244_718_976


def test_published_v25_config_parses_onto_the_v2_flash_backbone():
    config = parse_config(raw(V25), str(V25))
    assert (config.family, config.model_type, config.display_family) == ("mimo_v2_flash", "mimo_v2", "MiMo-V2.5/V2.6")
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (4096, 48, 152576)
    assert config.max_position_embeddings == 1_048_576
    assert [i for i, s in enumerate(config.layer_is_sliding) if not s] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert (config.global_attention.num_heads, config.global_attention.num_kv_heads) == (64, 4)
    assert (config.sliding_attention.num_kv_heads, config.sliding_attention.sliding_window) == (8, 128)
    assert config.sliding_attention.has_sink and not config.global_attention.has_sink
    assert config.global_attention.rope_dim == 64 and config.global_attention.value_scale == pytest.approx(0.707)
    assert (config.moe.num_experts, config.moe.experts_per_token) == (256, 8)
    assert config.attention_projection_layout == "fused_qkv"
    # V2.5 says neither: three MTP layers (model.mtp.layers.0-2 in its checkpoint), routing in float32
    assert "num_nextn_predict_layers" not in raw(V25) and config.num_mtp_layers == 3
    assert "moe_router_dtype" not in raw(V25) and config.router_dtype == "float32"
    assert config.fp8_block_size == (128, 128) and config.mxfp4_block_size is None
    assert config.ignored_encoders == ("vision", "audio")
    assert config.eos_token_ids == (151645,)


def test_published_v25_pro_config():
    config = parse_config(raw(V25_PRO), str(V25_PRO))
    assert (config.hidden_size, config.num_layers, config.max_position_embeddings) == (6144, 70, 1_048_576)
    assert [i for i, s in enumerate(config.layer_is_sliding) if not s] == [0, 7, 15, 23, 31, 39, 47, 55, 62, 69]
    for spec in (config.global_attention, config.sliding_attention):
        assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim) == (128, 8, 192, 128)
    assert config.global_attention.value_scale == pytest.approx(0.612)
    assert config.moe.num_experts == 384 and config.num_mtp_layers == 3
    assert config.ignored_encoders == ()  # a text-only release


def test_v26_flash_config_declares_mxfp4_experts_and_its_mtp_layers():
    config = parse_config(raw(V26_FLASH), str(V26_FLASH))
    assert config.mxfp4_block_size == 32 and config.fp8_block_size == (128, 128)
    assert config.router_dtype == "bfloat16" and config.num_mtp_layers == 3
    # "sliding_window" alone (no sliding_window_size) gives the window
    assert "sliding_window_size" not in raw(V26_FLASH) and config.sliding_attention.sliding_window == 128
    declared = dict(raw(V26_FLASH), num_nextn_predict_layers=1)
    assert parse_config(declared).num_mtp_layers == 1


@pytest.mark.parametrize(
    "path, published_total, published_active, backbone, kv_per_token",
    [
        # 9 global layers x 4 KV heads x (192 + 128) x 2 bytes; the 39 sliding ones are a fixed ring
        (V25, 310e9, 15e9, V25_BACKBONE, 9 * 4 * (192 + 128) * 2),
        # 10 global layers x 8 KV heads x (192 + 128) x 2 bytes
        (V25_PRO, 1.02e12, 42e9, PRO_BACKBONE, 10 * 8 * (192 + 128) * 2),
        (V26_FLASH, 310e9, 15e9, V25_BACKBONE, 9 * 4 * (192 + 128) * 2),
    ],
    ids=["v2.5", "v2.5-pro", "v2.6-flash"],
)
def test_plan_reports_published_parameters_and_kv_bytes(path, published_total, published_active, backbone,
                                                        kv_per_token):
    report = plan_json(path)
    assert report["family"] == "MiMo-V2.5/V2.6"
    # Published totals are rounded (and V2.5's 310B includes its encoders and MTP layers): within 1%,
    # active within 5%; and exactly the backbone of the published tensor table.
    assert report["total_params"] == backbone
    assert abs(report["total_params"] - published_total) <= 0.01 * published_total
    assert abs(report["active_params_per_token"] - published_active) <= 0.05 * published_active
    assert report["kv_bytes_per_token"] == kv_per_token
    assert report["mtp_layers"] == 3
    # No encoder bytes: every placed byte belongs to a backbone component
    for device in ("gpu", "cpu"):
        parts = report["weight_bytes"][device]
        assert set(parts) == {"embeddings", "attention", "norms", "dense_ffn", "router", "experts", "mtp", "lm_head",
                              "total"}
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_encoders_are_never_counted():
    """The V2.5 config with its vision/audio sub-configs plans exactly as V2-Flash (the same
    backbone), and stays so when the sub-configs are made huge or carry text-like keys."""
    flash, v25 = plan_json(V2_FLASH), plan_json(V25)
    assert v25["total_params"] == flash["total_params"] and v25["weight_bytes"] == flash["weight_bytes"]
    hostile = raw(V25)
    hostile["vision_config"] = dict(hostile["vision_config"], hidden_size=65536, depth=500, num_hidden_layers=3)
    hostile["audio_config"] = {"hidden_size": 1, "vocab_size": 7, "num_attention_heads": 3, "model_type": "mimo"}
    config = parse_config(hostile)
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (4096, 48, 152576)
    assert config.global_attention.num_heads == 64


def test_mxfp4_experts_plan_at_four_and_a_quarter_bits():
    report = plan_json(V26_FLASH)
    experts = sum(report["weight_bytes"][d]["experts"] for d in ("gpu", "cpu"))
    weights = 47 * 256 * 3 * 2048 * 4096
    assert experts == weights * 4.25 / 8
    # = the U8 bytes (packed e2m1 + E8M0 scales) the real V2.6-Flash-RL shards hold (SOURCES.md)
    assert experts == 160_859_947_008
    assert "mxfp4 experts" in report["weights_format"]
    fp8 = plan_json(V25)  # the same backbone with FP8 experts, dequantized to bf16 on load
    assert sum(fp8["weight_bytes"][d]["experts"] for d in ("gpu", "cpu")) == weights * 2
    assert {k: v for k, v in report["weight_bytes"]["gpu"].items() if k not in ("experts", "total")} == \
        {k: v for k, v in fp8["weight_bytes"]["gpu"].items() if k not in ("experts", "total")}


def test_quant_recipe_on_mxfp4_experts_is_refused():
    result = CliRunner().invoke(app, ["plan", str(V26_FLASH), "--gpu-mem", "24GiB", "--quant", "int4-g128"])
    assert result.exit_code == 1
    assert "already quantized (mxfp4 experts)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_projection_layout": "interleaved"}, "'attention_projection_layout' 'interleaved' is not supported"),
        ({"moe_router_dtype": "int8"}, "'moe_router_dtype' 'int8' is not supported"),
        ({"n_shared_experts": 1}, "n_shared_experts 1 is not supported"),
        ({"num_nextn_predict_layers": 99}, "'num_nextn_predict_layers' = 99 is over the limit"),
        ({"quantization_config": {"quant_method": "fp8", "store_dtype": "nvfp4"}}, "store_dtype 'nvfp4' is not supported"),
        ({"quantization_config": {"quant_method": "fp8", "store_dtype": "mxfp4", "mxfp4_block_size": 16}},
         "mxfp4_block_size 16 is not supported"),
    ],
)
def test_bad_v2_keys_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**raw(V25), **change}))
    result = CliRunner().invoke(app, ["plan", str(path), "--gpu-mem", "24GiB"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "alias, repo",
    [
        ("mimo-v2.5", "XiaomiMiMo/MiMo-V2.5"),
        ("mimo-v2.5-pro", "XiaomiMiMo/MiMo-V2.5-Pro"),
        ("mimo-v2.6-flash", "XiaomiMiMo/MiMo-V2.6-Flash-RL"),
        ("MiMo-V2.6-Pro", "XiaomiMiMo/MiMo-V2.6-Pro-RL"),
    ],
)
def test_aliases_name_the_hub_repositories(alias, repo, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    ref = parse_name(alias)
    assert (ref.kind, ref.repo_id, ref.name) == ("hub", repo, alias.lower())
    assert ref.path == tmp_path / "models" / repo.replace("/", "--")
    assert parse_name(repo).name == alias.lower()  # the repo id shows as its alias
