"""KV caches: sliding-window ring buffers and rollback to an earlier length."""

import pytest
import torch

from mimo_local.config import parse_config
from mimo_local.loader import load_model


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_rollback_then_continue_equals_fresh_recompute(checkpoints, family):
    model = load_model(checkpoints(family))
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(64)
    model(ids[:, :30], cache)
    model(torch.randint(0, 1000, (1, 5)), cache)  # speculative tokens, then rejected
    cache.truncate(30)
    continued = model(ids[:, 30:], cache, all_logits=True).logits
    fresh = model(ids, model.new_cache(64), all_logits=True).logits[:, 30:]
    assert (continued - fresh).abs().max().item() < 1e-4


def test_sliding_layers_keep_only_the_window(checkpoints):
    model = load_model(checkpoints("mimo_v2_flash"))
    cache = model.new_cache(4096, spare_slots=8)
    window = model.config.sliding_attention.sliding_window
    for layer, layer_cache in zip(model.layers, cache.layers):
        if layer.self_attn.spec.is_sliding:
            assert layer_cache.keys.shape[2] == window + 8
        else:
            assert layer_cache.keys.shape[2] == 4096


def test_real_v2_flash_cache_sizes():
    import json
    from pathlib import Path

    from mimo_local.cache import ModelCache

    config = parse_config(json.loads((Path(__file__).parent / "data/mimo-v2-flash.config.json").read_text()))
    meta = ModelCache.allocate(config, 1000, torch.bfloat16, "meta", spare_slots=0)
    meta2 = ModelCache.allocate(config, 2000, torch.bfloat16, "meta", spare_slots=0)
    slot_bytes = sum(c.slot_pos.nbytes for c in meta.layers if hasattr(c, "slot_pos"))
    assert meta2.nbytes - meta.nbytes == 1000 * 22.5 * 1024
    assert meta.nbytes - slot_bytes - 1000 * 22.5 * 1024 == config.kv_fixed_bytes(2)


def resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("cache_type", ["bf16", "int8"])
def test_a_long_cpu_cache_takes_memory_as_positions_are_written(checkpoints, cache_type):
    """A 32k-token server slot of a full-size 7B held 4.6 GB the moment it was made (and took seconds
    to clear); now it holds what its positions use, and reads as zeros beyond them."""
    from mimo_local.cache import ModelCache

    model = load_model(checkpoints("mimo"))
    capacity = 1 << 22  # 4M positions: gigabytes if they were cleared up front
    before = resident_bytes()
    cache = ModelCache.allocate(model.config, capacity, model.dtype, "cpu", cache_type=cache_type)
    layer = cache.layers[0]
    assert cache.nbytes > 512 << 20
    assert resident_bytes() - before < 64 << 20
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(2))
    cached = model(ids, cache, all_logits=True).logits
    small = ModelCache.allocate(model.config, 64, model.dtype, "cpu", cache_type=cache_type)
    fresh = model(ids, small, all_logits=True).logits
    assert torch.equal(cached, fresh)
    assert layer.keys[:, :, 24:4096].count_nonzero() == 0 and layer.keys[:, :, :24].count_nonzero() > 0
    assert resident_bytes() - before < 128 << 20
