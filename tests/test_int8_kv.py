"""--cache-type int8: the global layers' KV in int8 (a bfloat16 scale per head and position)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mimo_local.cache import QuantizedKVCache
from mimo_local.cli import app
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.loader import load_model

KLD_BOUND = 1e-3  # mean KL(float32 KV || int8 KV) per position of a 2,000-token prompt (measured: 7e-7, 2e-4)


def prompt_logits(model, ids, cache_type):
    model.cache_type = cache_type
    cache = model.new_cache(ids.shape[1])
    bounds = [0, 512, 1024, 1031, 1500, 1512, ids.shape[1]]  # prefill chunks and decode-sized steps
    return torch.cat([model(ids[:, a:b], cache, all_logits=True).logits[0] for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("family, overrides", [("mimo", {}), ("mimo_v2_flash", {"sliding_window_size": 100})])
def test_int8_kv_logits_stay_within_the_stated_kl_bound(tmp_path, one_thread, family, overrides):
    """float32 compute, so that only the KV cache's precision differs; the same 2,000 tokens."""
    directory = make_checkpoint(tmp_path / family, family, shards=1, overrides={"mtp_layers": 0, **overrides})
    model = load_model(directory, torch.float32)
    ids = torch.randint(0, 1000, (1, 2000), generator=torch.Generator().manual_seed(3))
    exact = prompt_logits(model, ids, "bf16").log_softmax(-1)
    int8 = prompt_logits(model, ids, "int8").log_softmax(-1)
    kld = (exact.exp() * (exact - int8)).sum(-1)
    assert kld.mean().item() < KLD_BOUND
    assert (exact.argmax(-1) == int8.argmax(-1)).float().mean().item() >= 0.95
    cache = model.new_cache(64)
    assert any(isinstance(layer, QuantizedKVCache) for layer in cache.layers)
    assert all(not isinstance(layer, QuantizedKVCache) for layer, spec in
               zip(cache.layers, (model.config.attention(i) for i in range(model.config.num_layers))) if spec.is_sliding)


def test_int8_cache_holds_about_half_the_bytes():
    from mimo_local.cache import ModelCache
    from mimo_local.config import parse_config

    config = parse_config(json.loads((Path(__file__).parent / "data/mimo-v2-flash.config.json").read_text()))
    sizes = {t: ModelCache.allocate(config, 1000, torch.bfloat16, "meta", spare_slots=0, cache_type=t).nbytes -
             ModelCache.allocate(config, 0, torch.bfloat16, "meta", spare_slots=0, cache_type=t).nbytes
             for t in ("bf16", "int8")}
    assert sizes["bf16"] == 1000 * config.kv_bytes_per_token(2)
    assert sizes["int8"] == 1000 * config.kv_bytes_per_token(2, "int8") < 0.51 * sizes["bf16"]


def test_plan_counts_the_int8_global_kv_of_the_real_v2_flash():
    config = str(Path(__file__).parent / "data/mimo-v2-flash.config.json")
    common = ["plan", config, "--ctx", "262144", "--gpu-mem", "24G", "--cpu-mem", "128G", "--quant", "int4-g128", "--json"]
    plans = {t: json.loads(CliRunner().invoke(app, common + ["--cache-type", t]).stdout) for t in ("bf16", "int8")}
    bf16, int8 = plans["bf16"], plans["int8"]
    assert int8["cache_type"] == "int8" and int8["kv_bytes_per_token"] * 2 <= bf16["kv_bytes_per_token"] * 1.02
    assert int8["kv_fixed_bytes"] == bf16["kv_fixed_bytes"]  # the sliding-window rings stay bfloat16
    assert int8["kv_cache_bytes"]["gpu"] < 0.51 * bf16["kv_cache_bytes"]["gpu"]
    assert int8["verdict"].startswith(("fits", "does not fit"))
    result = CliRunner().invoke(app, ["plan", config, "--cache-type", "fp8"])
    assert result.exit_code == 1 and "--cache-type must be one of bf16, int8" in result.output


def test_an_int8_cache_copies_and_restores_its_scales():
    """The server's host prompt cache (--cache-ram) saves and restores a prefix of an int8 layer cache whole."""
    from mimo_local.config import AttentionSpec

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=8, rope_theta=10000.0, rope_dim=8,
                         sliding_window=None, has_sink=False, bias=False)
    cache = QuantizedKVCache(spec, 16, 1, torch.float32, "cpu")
    keys, values = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    written = cache.update(keys, values, 0)
    saved = cache.copied(7, "cpu")
    fresh = QuantizedKVCache(spec, 16, 1, torch.float32, "cpu")
    fresh.restore(saved, 7)
    restored = fresh.update(keys[:, :, 7:10], values[:, :, 7:10], 7)
    for name in ("keys", "values", "key_scales", "value_scales"):
        assert torch.equal(getattr(restored, name), getattr(written, name)), name
