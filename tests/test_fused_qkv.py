"""The TP-sharded fused FP8 qkv_proj of MiMo-V2.5 / V2.5-Pro / V2.6 (mimo_local/fused_qkv.py): the
layout fits the published tensor shapes, and a checkpoint written shard by shard reads back exactly
into our [Q | K | V] parameter."""

import json
from pathlib import Path

import pytest
import torch

from mimo_local.checkpoint import (
    Checkpoint,
    dequantize_fp8_blocks,
    fp8_scale_grid,
    quantize_fp8_blocks,
    write_safetensors,
)
from mimo_local.config import parse_config
from mimo_local.errors import MimoError
from mimo_local.fused_qkv import QkvShards, layouts

DATA = Path(__file__).parent / "data"
BLOCK = (128, 128)


def published(name: str):
    path = DATA / name
    return parse_config(json.loads(path.read_text()), str(path))


@pytest.mark.parametrize(
    "config_file, tensor, rows, scale_rows",
    [  # shapes of the hub checkpoints' tensor tables (tests/data/SOURCES.md)
        ("mimo-v2.5.config.json", "model.layers.0.self_attn.qkv_proj.weight", 13568, 108),  # global: 4 x 27, not 106
        ("mimo-v2.5.config.json", "model.layers.1.self_attn.qkv_proj.weight", 14848, 116),  # sliding: 4 x 29
        ("mimo-v2.5.config.json", "model.mtp.layers.2.self_attn.qkv_proj.weight", 14848, 116),
        ("mimo-v2.5-pro.config.json", "model.layers.0.self_attn.qkv_proj.weight", 27136, 216),  # 8 x 27, not 212
        ("mimo-v2.5-pro.config.json", "model.mtp.layers.0.self_attn.qkv_proj.weight", 27136, 216),
    ],
)
def test_layout_fits_the_published_shapes(config_file, tensor, rows, scale_rows):
    config = published(config_file)
    layout = layouts(config, [tensor], {})[tensor]
    assert layout.shards == config.global_attention.num_kv_heads  # V2.5: 4, Pro: 8
    assert layout.shards * layout.shard_rows == rows
    assert fp8_scale_grid((rows, config.hidden_size), BLOCK, layout.shards) == (scale_rows, config.hidden_size // 128)


def test_shards_hold_q_then_k_then_v_of_their_own_heads():
    """Rows labelled by (part, head) in the hub order that llama.cpp and SGLang read: shard r holds its
    query heads, then its KV heads' keys, then their values; our order is all Q, all K, all V."""
    heads, kv_heads, head_dim, v_dim, tp = 8, 4, 3, 2, 2
    layout = QkvShards(tp, heads // tp * head_dim, kv_heads // tp * head_dim, kv_heads // tp * v_dim)
    hub_rows = []
    for r in range(tp):
        hub_rows += [(0, h) for h in range(r * heads // tp, (r + 1) * heads // tp) for _ in range(head_dim)]
        hub_rows += [(1, g) for g in range(r * kv_heads // tp, (r + 1) * kv_heads // tp) for _ in range(head_dim)]
        hub_rows += [(2, g) for g in range(r * kv_heads // tp, (r + 1) * kv_heads // tp) for _ in range(v_dim)]
    ours = layout.to_fused(torch.tensor(hub_rows))
    expected = [(0, h) for h in range(heads) for _ in range(head_dim)]
    expected += [(1, g) for g in range(kv_heads) for _ in range(head_dim)]
    expected += [(2, g) for g in range(kv_heads) for _ in range(v_dim)]
    assert ours.tolist() == [list(row) for row in expected]
    assert torch.equal(layout.to_hub(ours), torch.tensor(hub_rows))


def small_v25(**changes) -> dict:
    """The published V2.5 config shrunk to two layers (global, sliding): 8 heads, 2 global / 4 sliding KV heads."""
    raw = json.loads((DATA / "mimo-v2.5.config.json").read_text())
    raw.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, swa_num_attention_heads=8,
               num_key_value_heads=2, swa_num_key_value_heads=4, head_dim=32, swa_head_dim=32, v_head_dim=16,
               swa_v_head_dim=16, hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 0], intermediate_size=96,
               eos_token_id=1, pad_token_id=0, vocab_size=256)
    return {**raw, **changes}


def write_fused(directory: Path, raw: dict, tp: int, metadata: dict | None = None):
    """Two fused FP8 qkv tensors written shard by shard as the hub does (each shard quantized on its own
    128-row blocks) and what each should read as: the shards' dequantized rows regrouped by hand."""
    directory.mkdir()
    generator = torch.Generator().manual_seed(1)
    tensors, expected = {}, {}
    for layer, kv in ((0, raw["num_key_value_heads"]), (1, raw["swa_num_key_value_heads"])):
        heads, dim, v_dim = raw["num_attention_heads"], raw["head_dim"], raw["v_head_dim"]
        q = torch.randn(heads * dim, 64, generator=generator)
        k = torch.randn(kv * dim, 64, generator=generator)
        v = torch.randn(kv * v_dim, 64, generator=generator)
        weights, scales, parts = [], [], {"q": [], "k": [], "v": []}
        for r in range(tp):
            rows = {"q": q.chunk(tp)[r], "k": k.chunk(tp)[r], "v": v.chunk(tp)[r]}
            fp8, scale = quantize_fp8_blocks(torch.cat(list(rows.values())))
            weights.append(fp8)
            scales.append(scale)
            exact = dequantize_fp8_blocks(fp8, scale).split([len(t) for t in rows.values()])
            for key, part in zip(rows, exact):
                parts[key].append(part)
        name = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        tensors[name], tensors[name + "_scale_inv"] = torch.cat(weights), torch.cat(scales)
        expected[name] = torch.cat([torch.cat(parts[key]) for key in "qkv"])
    write_safetensors(directory / "model_pp0_ep0_shard1.safetensors", tensors)
    index = {"metadata": metadata or {}, "weight_map": dict.fromkeys(tensors, "model_pp0_ep0_shard1.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return expected


@pytest.mark.parametrize("metadata", [{}, {"tp_size": 2}, {"tp_size": "2"}])
def test_sharded_fp8_qkv_reads_exactly_into_our_layout(tmp_path, metadata):
    raw = small_v25()
    expected = write_fused(tmp_path / "ckpt", raw, tp=2, metadata=metadata)  # TP 2 = the global KV heads
    checkpoint = Checkpoint(tmp_path / "ckpt", BLOCK, parse_config(raw))
    for name, want in expected.items():
        out = torch.empty(want.shape)
        checkpoint.read_into(name, out)
        assert torch.equal(out, want), name
    # the scale grid really restarts per shard: 2 x ceil(176 / 128) block rows, one grid would have 3
    assert checkpoint.entries["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == (4, 1)


def test_tp_size_metadata_wins_over_the_kv_head_rule(tmp_path):
    raw = small_v25(num_key_value_heads=4)  # the rule would say 4 shards; the files have 2
    expected = write_fused(tmp_path / "ckpt", raw, tp=2, metadata={"tp_size": 2})
    checkpoint = Checkpoint(tmp_path / "ckpt", BLOCK, parse_config(raw))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    out = torch.empty(expected[name].shape)
    checkpoint.read_into(name, out)
    assert torch.equal(out, expected[name])


@pytest.mark.parametrize(
    "raw_changes, metadata, message",
    [
        ({}, {"tp_size": 1}, "FP8 scales of shape [4, 1] do not match (128, 128) blocks of [352, 64]"),
        ({}, {"tp_size": 3}, "8 query and 2 KV heads do not split into 3 tensor-parallel shards"),
        ({}, {"tp_size": "two"}, "index metadata tp_size 'two' is not a tensor-parallel degree"),
        ({}, {"tp_size": 0}, "index metadata tp_size 0 is not a tensor-parallel degree"),
    ],
)
def test_inconsistent_shards_are_one_line_errors(tmp_path, raw_changes, metadata, message):
    raw = small_v25(**raw_changes)
    write_fused(tmp_path / "ckpt", raw, tp=2, metadata=metadata)
    with pytest.raises(MimoError) as error:
        checkpoint = Checkpoint(tmp_path / "ckpt", BLOCK, parse_config(raw))
        checkpoint.read_into("model.layers.0.self_attn.qkv_proj.weight", torch.empty(352, 64))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_split_layout_checkpoints_are_read_as_before(tmp_path):
    raw = small_v25(attention_projection_layout="split")
    write_fused(tmp_path / "ckpt", raw, tp=2)
    checkpoint = Checkpoint(tmp_path / "ckpt", BLOCK, parse_config(raw))
    assert checkpoint.row_layouts == {}
