"""Attention of a chunk of queries over the keys a cache shows them (a KeyView), tiled so that its
cost and memory follow what each query can see, never the square of the prompt:

- a sliding-window layer takes the queries in blocks; each block attends only to the `window`
  positions before it and to itself (a block x (window + block) band);
- a global layer attends to everything before the chunk without a mask, and to the chunk itself
  causally; quantized caches are read a tile of positions at a time.

Each part returns its output and the log-sum-exp of its scores, and the parts are merged exactly
(the online-softmax identity). A per-head sink is one more term in the softmax denominator:
p_ij = exp(a_ij) / (exp(sink_h) + sum_j exp(a_ij)), i.e. a part with output 0 and lse = sink_h.
"""

from __future__ import annotations

import torch

from .. import ops
from ..cache import KeyView

KEY_TILE = 2048  # positions per tile where keys are dequantized or scored without the fused kernel
MIN_QUERY_BLOCK = 64  # queries per sliding-window block at least (tiny windows would mean many calls)
CAUSAL_QUERY_BLOCK = 64  # queries per fused call on a global layer (see _causal_blocks)
MANUAL_ATTENTION_STEPS = 16  # up to this many queries (decode, verify) two small matmuls beat the fused kernel

_fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def part_attention(q, k, v, scale: float, mask: torch.Tensor | None = None, causal: bool = False):
    """Softmax attention of q [B,H,T,D] over k [B,Hkv,S,D], v [B,Hkv,S,Dv] (grouped-query), with a
    [T, S] bool `mask` (True = visible) or `causal` (T == S, aligned). Returns (output [B,H,T,Dv]
    in q's dtype, log-sum-exp of the scaled scores [B,H,T] float32). Every query must see a key."""
    steps = q.shape[2]
    if _fused is not None and q.device.type == "cpu" and steps > MANUAL_ATTENTION_STEPS:
        return _fused_part(q, k, v, scale, mask, causal)
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    grouped = q.float().reshape(batch, kv_heads, group * steps, dim)
    scores = (torch.matmul(grouped, k.float().transpose(-1, -2)) * scale).view(batch, kv_heads, group, steps, -1)
    if causal:
        mask = torch.ones(steps, steps, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).view(batch, kv_heads, group * steps, -1)
    out = torch.matmul(probs, v.float()).view(batch, heads, steps, v.shape[-1])
    return out.to(q.dtype), lse.view(batch, heads, steps)


def _fused_part(q, k, v, scale, mask, causal):
    """torch's CPU flash-attention kernel: tiled internally, grouped-query aware, and it returns the
    log-sum-exp. It wants one head size for q, k and v (V2-Flash's values are narrower: padded)."""
    v_dim = v.shape[-1]
    if v_dim != q.shape[-1]:
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - v_dim))
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out, lse = _fused(q, k, v, is_causal=causal, attn_mask=bias, scale=scale)
    return out[..., :v_dim], lse


class Merged:
    """One softmax over the union of several parts' keys, from each part's output and log-sum-exp,
    accumulated as the parts come (memory: one output, however many parts)."""

    def __init__(self):
        self.out: torch.Tensor | None = None  # float32 [B,H,T,Dv], normalized over the parts so far
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out.float(), lse
            return
        total = torch.logaddexp(self.lse, lse)
        self.out = self.out.mul_(torch.exp(self.lse - total).unsqueeze(-1))
        self.out.add_(out.float() * torch.exp(lse - total).unsqueeze(-1))
        self.lse = total

    def result(self, sinks: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The merged output in `dtype`, with the sinks' terms in the denominator."""
        if sinks is not None:
            sink = sinks.float().view(1, -1, 1)
            self.out = self.out.mul_(torch.sigmoid(self.lse - sink).unsqueeze(-1))  # e^lse / (e^lse + e^sink)
        return self.out.to(dtype)


def single(part, sinks, dtype) -> torch.Tensor:
    if sinks is None:
        return part[0].to(dtype)
    merged = Merged()
    merged.add(*part)
    return merged.result(sinks, dtype)


def chunk_attention(q: torch.Tensor, view: KeyView, start: int, window: int | None, scale: float,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of queries q [B,H,T,D] at positions start..start+T-1 over `view` (whose last T
    entries are their own keys): causal, and within `window` previous positions when set."""
    if window is None:
        return _global(q, view, start, scale, sinks)
    steps = q.shape[2]
    block = max(window, MIN_QUERY_BLOCK)
    outs = []
    for begin in range(0, steps, block):
        end = min(begin + block, steps)
        # entries this block may see: from `window` before its first query to its last query
        first_pos = max(view.first, start + begin - window)
        lo, hi = first_pos - view.first, start + end - view.first
        offset = (start + torch.arange(begin, end, device=q.device))[:, None] - (
            first_pos + torch.arange(hi - lo, device=q.device))[None, :]
        mask = (offset >= 0) & (offset <= window)
        if view.valid is not None:
            mask &= view.valid[lo:hi]
        keys, values = view.span(lo, hi)
        outs.append(single(part_attention(q[:, :, begin:end], keys, values, scale, mask), sinks, q.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _global(q, view: KeyView, start: int, scale: float, sinks):
    """Causal attention over every entry up to each query: bfloat16 keys in one call of our kernel
    where the CPU has it (ops.prefill_attention: AVX512-BF16, sinks included). Otherwise torch's
    fused kernel takes bfloat16 or float32 keys of the queries' head size whole (_causal_blocks);
    other keys (quantized, narrower values to pad, no fused kernel) come a tile at a time: everything
    before the chunk without a mask, then the chunk's own keys causally."""
    steps = q.shape[2]
    before = start - view.first
    if not view.quantized:
        keys, values = view.span(0, before + steps)
        out = ops.prefill_attention(q, keys, values, before, scale, sinks)
        if out is not None:
            return out
    if _uses_fused(q) and not view.quantized and view.values.shape[-1] == q.shape[-1]:
        return _causal_blocks(q, view, before, scale, sinks)
    merged = Merged()
    for begin in range(0, before, KEY_TILE):
        keys, values = view.span(begin, min(begin + KEY_TILE, before))
        merged.add(*part_attention(q, keys, values, scale))
    keys, values = view.span(before, before + steps)
    merged.add(*part_attention(q, keys, values, scale, causal=True))
    return merged.result(sinks, q.dtype)


def _causal_blocks(q, view: KeyView, before: int, scale: float, sinks):
    """Blocks of CAUSAL_QUERY_BLOCK queries, each in one fused call over the entries it sees (the
    `before` ones and the chunk's up to its last query, masked causally). The kernel computes every
    score of a 512-key block a query block reaches, masked or not: one call for a whole chunk of
    T queries would score T * T of its own keys where T * T / 2 are seen."""
    steps = q.shape[2]
    outs = []
    for begin in range(0, steps, CAUSAL_QUERY_BLOCK):
        end = min(begin + CAUSAL_QUERY_BLOCK, steps)
        keys, values = view.span(0, before + end)
        mask = torch.ones(end - begin, before + end, dtype=torch.bool, device=q.device).tril(before + begin)
        outs.append(single(part_attention(q[:, :, begin:end], keys, values, scale, mask), sinks, q.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _uses_fused(q: torch.Tensor) -> bool:
    return _fused is not None and q.device.type == "cpu" and q.shape[2] > MANUAL_ATTENTION_STEPS
