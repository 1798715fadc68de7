"""Chunked prefill attention against dense attention: windows, sinks, ring holes, chunk boundaries."""

import kernel_builds
import pytest
import torch

from mimo_local import ops
from mimo_local.cache import FullKVCache, KeyView, SlidingWindowKVCache
from mimo_local.config import AttentionSpec
from mimo_local.kernels import cpu
from mimo_local.models import chunk_attention as chunked
from mimo_local.models.layers import attend


def dense(q, keys, values, window, scale, sinks):
    """Every query against every key of positions 0..S-1, one masked softmax (sinks in the denominator)."""
    steps, length = q.shape[2], keys.shape[2]
    offset = torch.arange(length - steps, length)[:, None] - torch.arange(length)[None, :]
    mask = (offset >= 0) & ((offset <= window) if window is not None else True)
    return attend(q.float(), keys.float(), values.float(), mask, scale, sinks)


def spec(window, kv_heads=2, dim=32, v_dim=16):
    return AttentionSpec(num_heads=4, num_kv_heads=kv_heads, head_dim=dim, v_head_dim=v_dim, rope_theta=1e4,
                         rope_dim=dim, sliding_window=window, has_sink=window is not None, bias=False)


@pytest.mark.parametrize("window, v_dim, key_tile", [(None, 16, 2048), (None, 32, 2048), (None, 16, 128), (8, 16, 2048),
                                                     (100, 16, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_through_a_cache_equal_dense_attention(monkeypatch, window, v_dim, key_tile, dtype):
    """Global layers with narrower values (tiles), the same head size (one fused call), small tiles;
    sliding windows smaller and larger than a query block."""
    monkeypatch.setattr(chunked, "KEY_TILE", key_tile)
    generator = torch.Generator().manual_seed(0)
    s = spec(window, v_dim=v_dim)
    length, heads = 700, s.num_heads
    q = torch.randn(1, heads, length, s.head_dim, generator=generator).to(dtype)
    k = torch.randn(1, s.num_kv_heads, length, s.head_dim, generator=generator).to(dtype)
    v = torch.randn(1, s.num_kv_heads, length, s.v_head_dim, generator=generator).to(dtype)
    sinks = torch.randn(heads, generator=generator) if window else None
    cache = SlidingWindowKVCache(s, 8, 1, dtype, "cpu") if window else FullKVCache(s, length, 1, dtype, "cpu")
    outs = []
    # chunks of uneven sizes: short (manual path) and long (fused), crossing window and block boundaries
    bounds = [0, 5, 300, 301, 317, 512, 700]
    for start, end in zip(bounds, bounds[1:]):
        view = cache.update(k[:, :, start:end], v[:, :, start:end], start)
        outs.append(chunked.chunk_attention(q[:, :, start:end], view, start, window, s.head_dim**-0.5, sinks).float())
    expected = dense(q, k, v, window, s.head_dim**-0.5, sinks).float()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (torch.cat(outs, dim=2) - expected).abs().max().item() < tolerance


def test_sliding_window_cost_follows_the_window_not_the_prompt(monkeypatch):
    """A window-W layer scores each query block against at most W + block keys, however long the chunk."""
    widths = []
    original = chunked.part_attention

    def recording(q, k, v, scale, mask=None, causal=False):
        widths.append(k.shape[2])
        return original(q, k, v, scale, mask, causal)

    monkeypatch.setattr(chunked, "part_attention", recording)
    window, steps = 128, 2048
    q = torch.randn(1, 4, steps, 32)
    view = KeyView(torch.randn(1, 2, steps, 32), torch.randn(1, 2, steps, 32), first=0)
    chunked.chunk_attention(q, view, 0, window, 32**-0.5, torch.zeros(4))
    block = max(window, chunked.MIN_QUERY_BLOCK)
    assert len(widths) == steps // block and max(widths) <= window + block


def test_global_layer_scores_about_the_causal_triangle(monkeypatch):
    """A global layer's chunk goes to the fused kernel in query blocks, each over the keys up to its
    last query: about half the chunk's own T x T scores, however the kernel blocks its keys."""
    scored = []
    original = chunked.part_attention

    def recording(q, k, v, scale, mask=None, causal=False):
        scored.append(q.shape[2] * k.shape[2])
        return original(q, k, v, scale, mask, causal)

    monkeypatch.setattr(chunked, "part_attention", recording)
    before, steps, block = 100, 512, chunked.CAUSAL_QUERY_BLOCK
    q = torch.randn(1, 4, steps, 32)
    view = KeyView(torch.randn(1, 2, before + steps, 32), torch.randn(1, 2, before + steps, 32), first=0)
    chunked.chunk_attention(q, view, before, None, 32**-0.5)
    assert len(scored) == steps // block
    assert sum(scored) == steps * before + steps * (steps + block) // 2


def test_rolled_back_ring_slots_are_not_seen():
    """Positions rolled back (truncated) and not rewritten are holes in the view: masked, not read."""
    s = spec(16)
    cache = SlidingWindowKVCache(s, 8, 1, torch.float32, "cpu")
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 16)
    cache.update(k[:, :, :30], v[:, :, :30], 0)
    view = cache.update(k[:, :, 25:40], v[:, :, 25:40], 25)  # 25..29 rewritten: no holes
    assert view.valid is None and view.first == 25 - 16
    fresh = SlidingWindowKVCache(s, 8, 1, torch.float32, "cpu")
    fresh.update(k[:, :, :10], v[:, :, :10], 0)
    view = fresh.update(k[:, :, 20:40], v[:, :, 20:40], 20)  # 10..19 never written
    assert view.first == 4 and view.valid.tolist() == [True] * 6 + [False] * 10 + [True] * 20


@pytest.mark.parametrize("rope_dim", [32, 16])  # whole heads; partial (V2-Flash)
def test_rope_equals_the_rotate_half_formula(rope_dim):
    """RoPE in place of halves gives exactly the bfloat16 roundings of x * cos + rotate_half(x) * sin."""
    from mimo_local.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(rope_dim, 1e4)
    x = torch.randn(1, 40, 6, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cos, sin = (t[:, None] for t in rope.cos_sin(3, 40, torch.bfloat16))
    rotated, half = x[..., :rope_dim], rope_dim // 2
    rotate_half = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
    expected = torch.cat([rotated * cos + rotate_half * sin, x[..., rope_dim:]], dim=-1)
    assert torch.equal(rope.apply(x, cos, sin), expected)


def grouped_causal_reference(q, keys, values, before, scale, sinks):
    """float32 softmax attention of q [1,H,T,D] at positions before.. over keys/values [1,Hkv,S,*]."""
    heads, steps = q.shape[1], q.shape[2]
    group = heads // keys.shape[1]
    mask = torch.ones(steps, keys.shape[2], dtype=torch.bool).tril(before)
    return attend(q.float(), keys.float().repeat_interleave(group, 1), values.float().repeat_interleave(group, 1),
                  mask, scale, sinks)


def cache_layout(kv_heads, length, dim, generator):
    """bfloat16 keys as a cache holds them: a view of positions 0..length-1 of a longer buffer."""
    return torch.randn(1, kv_heads, length + 37, dim, generator=generator).to(torch.bfloat16)[:, :, :length]


@pytest.mark.skipif(not kernel_builds.LEVELS or "avx512" not in kernel_builds.LEVELS,
                    reason="the vectorized prefill attention needs an AVX-512 CPU")
@pytest.mark.parametrize("heads, kv_heads, dim, v_dim", [(16, 2, 96, 64), (8, 4, 128, 128), (4, 1, 32, 80)])
@pytest.mark.parametrize("before, steps", [(0, 1), (0, 3), (70, 65), (1000, 300), (0, 512)])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_prefill_attention_kernel_equals_float32_attention(heads, kv_heads, dim, v_dim, before, steps, with_sinks):
    """The one-call causal attention of a global layer's chunk (AVX512-BF16 products, online softmax
    over 64-key blocks) against float32 attention: query rows off the 4-row tiles, key counts off the
    blocks, grouped heads, sinks, values of 64 dimensions and of a 16-dimension tail. Its error is
    that of bfloat16 probabilities, like torch's flash kernel's on the same inputs."""
    if cpu.library() is None or not cpu.library().attention_prefill_vectorized():
        pytest.skip("this CPU has no AVX512-BF16")
    generator = torch.Generator().manual_seed(before + steps + dim)
    length = before + steps
    qkv = torch.randn(1, steps, heads + kv_heads, dim, generator=generator).to(torch.bfloat16)
    q = qkv[:, :, :heads].transpose(1, 2)  # the projection's layout: rows strided, as layers.py hands it over
    keys, values = cache_layout(kv_heads, length, dim, generator), cache_layout(kv_heads, length, v_dim, generator)
    sinks = torch.randn(heads, generator=generator) if with_sinks else None
    assert ops.prefill_attention(q, keys, values, before, dim**-0.5, sinks) is not None
    out = cpu.prefill_attention(q, keys, values, before, dim**-0.5, sinks)
    expected = grouped_causal_reference(q, keys, values, before, dim**-0.5, sinks)
    torch_flash = chunked._fused_part(q, keys, values, dim**-0.5, torch.ones(steps, length, dtype=torch.bool).tril(before),
                                      False) if steps > chunked.MANUAL_ATTENTION_STEPS and v_dim <= dim else None
    error = (out.float() - expected).abs().max().item()
    assert error < 2e-2
    if torch_flash is not None:
        torch_error = (chunked.single(torch_flash, sinks, torch.bfloat16).float() - expected).abs().max().item()
        assert error <= 1.5 * torch_error + 1e-3


def test_a_bfloat16_global_chunk_goes_to_the_kernel():
    """chunk_attention hands a global layer's bfloat16 chunk over its cache to the one-call kernel
    (its numbers, bit for bit), where the build has it."""
    if cpu.library() is None or not cpu.library().attention_prefill_vectorized():
        pytest.skip("this CPU has no AVX512-BF16")
    generator = torch.Generator().manual_seed(2)
    s = spec(None, dim=32, v_dim=16)
    cache = FullKVCache(s, 700, 1, torch.bfloat16, "cpu")
    start, steps = 300, 200
    q = torch.randn(1, s.num_heads, steps, s.head_dim, generator=generator).bfloat16()
    cache.update(cache_layout(s.num_kv_heads, start, 32, generator), cache_layout(s.num_kv_heads, start, 16, generator), 0)
    view = cache.update(cache_layout(s.num_kv_heads, steps, 32, generator),
                        cache_layout(s.num_kv_heads, steps, 16, generator), start)
    sinks = torch.randn(s.num_heads, generator=generator)
    keys, values = view.span(0, start + steps)
    assert torch.equal(chunked.chunk_attention(q, view, start, None, 32**-0.5, sinks),
                       cpu.prefill_attention(q, keys, values, start, 32**-0.5, sinks))


@pytest.mark.parametrize("level", [level for level in kernel_builds.LEVELS if level != "avx512"])
def test_prefill_attention_plain_c_build_computes_the_same(level):
    """Builds without AVX512-BF16 keep the entry point in plain C (the layers use torch's kernel there,
    since the build says it is not vectorized): the same attention."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, v_dim, before, steps = 4, 2, 32, 16, 40, 30
    q = torch.randn(1, heads, steps, dim, generator=generator).to(torch.bfloat16)
    keys = cache_layout(kv_heads, before + steps, dim, generator)
    values = cache_layout(kv_heads, before + steps, v_dim, generator)
    sinks = torch.randn(heads, generator=generator)
    with kernel_builds.kernels(level):
        assert cpu.library().attention_prefill_vectorized() == 0
        assert ops.prefill_attention(q, keys, values, before, dim**-0.5, sinks) is None
        out = cpu.prefill_attention(q, keys, values, before, dim**-0.5, sinks)
    expected = grouped_causal_reference(q, keys, values, before, dim**-0.5, sinks)
    assert (out.float() - expected).abs().max().item() < 1e-2
