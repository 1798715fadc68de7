import json
from pathlib import Path

import pytest

from mimo_local.config import parse_config
from mimo_local.errors import MimoError

DATA = Path(__file__).parent / "data"


def real_config(name):
    return json.loads((DATA / name).read_text())


def test_mimo_7b_config():
    config = parse_config(real_config("mimo-7b-rl.config.json"))
    assert config.family == "mimo"
    attention = config.global_attention
    assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (32, 8, 128)
    assert attention.bias and not attention.has_sink and attention.rope_dim == 128
    assert config.num_mtp_layers == 1 and config.eos_token_ids == (151645,)
    # 36 layers x 8 kv heads x (128 + 128) x 2 bytes
    assert config.kv_bytes_per_token(2) == 36 * 8 * 256 * 2
    assert config.kv_fixed_bytes(2) == 0


def test_v2_flash_config_and_kv_arithmetic():
    config = parse_config(real_config("mimo-v2-flash.config.json"))
    assert sum(config.layer_is_sliding) == 39 and config.layer_is_sliding.count(False) == 9
    assert config.layer_is_moe[0] is False and all(config.layer_is_moe[1:])
    sliding, full = config.sliding_attention, config.global_attention
    assert (full.num_kv_heads, sliding.num_kv_heads) == (4, 8)
    assert sliding.rope_dim == 64 and sliding.has_sink and not full.has_sink
    assert (full.rope_theta, sliding.rope_theta) == (5e6, 1e4)
    assert sliding.sliding_window == 128 and sliding.value_scale == 0.707
    assert config.moe.num_experts == 256 and config.moe.routed_scaling_factor == 1.0
    assert config.fp8_block_size == (128, 128)
    # 9 global layers x 4 heads x (192 + 128) x 2 bytes = 22.5 KiB per token
    assert config.kv_bytes_per_token(2) == 22.5 * 1024
    # 39 sliding layers x 128 tokens x 8 heads x 320 x 2 bytes ~= 25.6 MB, independent of context
    assert config.kv_fixed_bytes(2) == 39 * 128 * 5120 == 25_559_040


def test_unknown_model_type_is_named():
    with pytest.raises(MimoError, match="unknown model_type 'llama'"):
        parse_config({"model_type": "llama"})


@pytest.mark.parametrize("name,key", [("mimo-7b-rl.config.json", "rope_theta"),
                                      ("mimo-v2-flash.config.json", "hybrid_layer_pattern"),
                                      ("mimo-v2-flash.config.json", "swa_num_key_value_heads")])
def test_missing_key_is_named(name, key):
    raw = real_config(name)
    del raw[key]
    with pytest.raises(MimoError, match=f"missing config key '{key}'"):
        parse_config(raw)
