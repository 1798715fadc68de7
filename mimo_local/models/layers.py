"""Blocks shared by both MiMo families: RMSNorm, partial rotate-half RoPE, attention with optional
sinks and sliding windows, SwiGLU MLP and the sigmoid-routed MoE.

Projections are fused on load (q|k|v, gate|up) so a decode step issues few large matmuls. The
math is written here; how each operation runs (C kernels, fused per layer, or torch) is ops.py's.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import AttentionSpec, MoESpec
from .chunk_attention import MANUAL_ATTENTION_STEPS, chunk_attention


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, float32_out: bool = False) -> torch.Tensor:
        """`float32_out` (logits) skips the rounding to the model dtype; it is an argument of forward
        so that accelerate's device hooks still see the call."""
        return ops.linear(x, self.weight, self.bias, float32_out=float32_out)

    def first_rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """float32 outputs of the first `rows` rows only (a draft vocabulary): reads only their weights."""
        bias = None if self.bias is None else self.bias[:rows]
        return ops.linear(x, self.weight[:rows], bias, float32_out=True)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half (NeoX) RoPE on the first `rope_dim` dims of each head."""

    def __init__(self, rope_dim: int, theta: float):
        super().__init__()
        self.rope_dim = rope_dim
        self.theta = theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        # (start, steps, dtype) -> (cos, sin) of the latest positions asked for: every layer of a
        # step asks for each sequence's positions in turn (one sequence, or a batch of them).
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def compute_inv_freq(self, device="cpu") -> torch.Tensor:
        # An explicit device even when built on meta: torch's first meta arange costs ~3 s of imports.
        exponents = torch.arange(0, self.rope_dim, 2, dtype=torch.float32, device=device) / self.rope_dim
        return 1.0 / (self.theta**exponents)

    KEPT_TABLES = 64  # more than the sequences of a batch

    def cos_sin(self, start: int, steps: int, dtype: torch.dtype):
        key = (start, steps, dtype)
        tables = self._tables.get(key)
        if tables is None:
            positions = torch.arange(start, start + steps, device=self.inv_freq.device, dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq[None, :]
            angles = torch.cat([freqs, freqs], dim=-1)
            tables = self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
            if len(self._tables) > self.KEPT_TABLES:
                self._tables.popitem(last=False)  # the oldest
        return tables

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin on the first rope_dim dims of x [..., head_dim] (cos/sin
        [..., rope_dim] broadcast against it), each product rounded to x's dtype as in the reference.
        rotate_half(x) = [-x2, x1] for x = [x1, x2]: the halves are subtracted and added in place
        (the negation is exact), without building rotate_half."""
        rope, half = self.rope_dim, self.rope_dim // 2
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.mul(x[..., :rope], cos, out=out[..., :rope])
        out[..., :half].sub_(x[..., half:rope] * sin[..., :half])
        out[..., half:rope].add_(x[..., :half] * sin[..., half:])
        out[..., rope:] = x[..., rope:]
        return out


class RopeSet:
    """One RotaryEmbedding per (rope_dim, theta), shared by the layers that use it."""

    def __init__(self):
        self.by_key: dict[tuple, RotaryEmbedding] = {}

    def __call__(self, spec: AttentionSpec) -> RotaryEmbedding:
        key = (spec.rope_dim, spec.rope_theta)
        if key not in self.by_key:
            self.by_key[key] = RotaryEmbedding(*key)
        return self.by_key[key]


def attend(q, k, v, mask, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention of a few queries (longer steps go to chunk_attention).
    q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv], mask [T,S] bool or None.

    Sinks add a per-head logit to the softmax denominator only:
    p_ij = exp(a_ij) / (exp(sink_h) + sum_j exp(a_ij)).
    """
    batch, heads, steps, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # fp32 throughout: torch's CPU bf16 batched matmul is slow, and these tensors are small.
    grouped_q = q.float().reshape(batch, kv_heads, group * steps, q.shape[-1])
    scores = torch.matmul(grouped_q, k.float().transpose(-1, -2)) * scale
    scores = scores.view(batch, kv_heads, group, steps, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink_logits = sinks.float().view(1, kv_heads, group, 1, 1).expand(batch, kv_heads, group, steps, 1)
        probs = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1)[..., :-1]
    probs = probs.reshape(batch, kv_heads, group * steps, -1)
    return torch.matmul(probs, v.float()).to(v.dtype).view(batch, heads, steps, v.shape[-1])


class Attention(nn.Module):
    def __init__(self, hidden_size: int, spec: AttentionSpec, rope: RotaryEmbedding):
        super().__init__()
        self.spec = spec
        self.q_size = spec.num_heads * spec.head_dim
        self.k_size = spec.num_kv_heads * spec.head_dim
        self.v_size = spec.num_kv_heads * spec.v_head_dim
        self.qkv_proj = Linear(hidden_size, self.q_size + self.k_size + self.v_size, bias=spec.bias)
        self.o_proj = Linear(spec.num_heads * spec.v_head_dim, hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(spec.num_heads)) if spec.has_sink else None
        self.rope = rope
        self.scale = spec.head_dim**-0.5

    def forward(self, x: torch.Tensor, start: int, cache) -> torch.Tensor:
        return self.o_proj(self.attend_projected(self.qkv_proj(x), start, cache))

    def forward_batch(self, x: torch.Tensor, starts: list[int], lengths: list[int], caches: list) -> torch.Tensor:
        """Several sequences' rows one after the other (x [1, N, H]: `lengths[b]` rows of sequence b
        at positions starts[b].., in caches[b]): the projections read their weights once for all."""
        qkv = self.qkv_proj(x)
        fused = ops.decode_attention_batch(self, qkv, starts, lengths, caches)  # decode / verify: one call
        if fused is not None:
            return self.o_proj(fused)
        parts = qkv.split(lengths, dim=1)
        outs = [self.attend_projected(part, start, cache) for part, start, cache in zip(parts, starts, caches)]
        return self.o_proj(torch.cat(outs, dim=1))

    def attend_projected(self, qkv: torch.Tensor, start: int, cache) -> torch.Tensor:
        """RoPE, cache write and attention of projected q|k|v [B, T, *]: the input of o_proj."""
        fused = ops.decode_attention(self, qkv, start, cache)  # decode / verify: one call
        if fused is not None:
            return fused
        batch, steps, _ = qkv.shape
        spec = self.spec
        q_k, v = qkv.split([self.q_size + self.k_size, self.v_size], dim=-1)
        # q and k heads rotated together in the projection's [B, T, heads, D] layout
        q_k = q_k.view(batch, steps, spec.num_heads + spec.num_kv_heads, spec.head_dim)
        cos, sin = self.rope.cos_sin(start, steps, qkv.dtype)
        q, k = self.rope.apply(q_k, cos[:, None], sin[:, None]).transpose(1, 2).split(
            [spec.num_heads, spec.num_kv_heads], dim=1)
        v = v.view(batch, steps, spec.num_kv_heads, spec.v_head_dim).transpose(1, 2)
        if spec.value_scale != 1.0:
            v = v * spec.value_scale
        view = cache.update(k, v, start)
        if steps > MANUAL_ATTENTION_STEPS or view.quantized:
            out = chunk_attention(q, view, start, spec.sliding_window, self.scale, self.sinks)
        else:
            out = attend(q, view.keys, view.values, view.mask(start, steps, spec.sliding_window), self.scale, self.sinks)
        return out.transpose(1, 2).reshape(batch, steps, -1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.mlp(self.gate_up_proj, self.down_proj, x)


class Router(nn.Module):
    """Sigmoid router: experts chosen on score + correction bias, weighted by the unbiased score."""

    def __init__(self, hidden_size: int, spec: MoESpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.zeros(spec.num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        routed = ops.route(self, x)
        if routed is not None:
            return routed
        spec = self.spec
        scores = ops.linear(x.float(), self.weight).sigmoid()
        choice = scores + self.e_score_correction_bias
        if spec.n_group > 1:
            grouped = choice.view(-1, spec.n_group, spec.num_experts // spec.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, 1)
            choice = grouped.masked_fill(keep[..., None] == 0, float("-inf")).view(-1, spec.num_experts)
        experts = choice.topk(spec.experts_per_token, dim=-1).indices
        weights = scores.gather(1, experts)
        if spec.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * spec.routed_scaling_factor


class ExpertGroup(nn.Module):
    """Some of a layer's routed experts, stacked on one device: gate_up [n, 2I, H], down [n, H, I].
    Row j of the stacks is global expert `experts[j]`; experts are listed in ascending order."""

    def __init__(self, hidden_size: int, intermediate_size: int, experts: list[int]):
        super().__init__()
        self.experts = list(experts)
        self.gate_up_proj = nn.Parameter(torch.zeros(len(self.experts), 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(len(self.experts), hidden_size, intermediate_size))

    @property
    def device(self) -> torch.device:
        return self.gate_up_proj.device

    def forward(self, x, pair_tokens, pair_experts, pair_weights) -> torch.Tensor:
        """Sum of weight * expert(x[token]) over (token, local expert, weight) pairs sorted by
        expert; x [M, H] is already on this group's device. Returns float32 [M, H] on this group's
        device. Only activations move, never weights."""
        fused = ops.expert_pairs(self, x, pair_tokens, pair_experts, pair_weights)
        if fused is not None:
            return fused
        device = self.device
        pair_tokens = pair_tokens.to(device, non_blocking=True)
        pair_weights = pair_weights.to(device, non_blocking=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=device)
        counts = torch.bincount(pair_experts, minlength=len(self.experts)).tolist()  # the fused kernels need none
        begin = 0
        for local, count in enumerate(counts):
            if count == 0:
                continue
            rows = pair_tokens[begin : begin + count]
            contribution = self.expert(x[rows], local) * pair_weights[begin : begin + count, None]
            out.index_add_(0, rows, contribution.float())
            begin += count
        return out

    def expert(self, x: torch.Tensor, local: int) -> torch.Tensor:
        hidden = ops.swiglu(ops.expert_linear(self.gate_up_proj, x, local))
        return ops.expert_linear(self.down_proj, hidden, local).float()


class MoE(nn.Module):
    """Routed SwiGLU experts in one or more ExpertGroups (one per device they live on); each group
    computes the tokens routed to its experts where its weights are, and the outputs are summed."""

    def __init__(self, hidden_size: int, spec: MoESpec):
        super().__init__()
        self.spec = spec
        self.hidden_size = hidden_size
        self.gate = Router(hidden_size, spec)
        self.groups = nn.ModuleList([ExpertGroup(hidden_size, spec.intermediate_size, range(spec.num_experts))])
        self._index_experts()
        self.selection_counts: torch.Tensor | None = None  # [E] int64 while recording router statistics

    def place(self, expert_devices: list) -> None:
        """Split the experts into one group per distinct key of `expert_devices` (one key per
        expert), groups in key order: the group whose outputs are waited on last goes last. Call on
        the meta device, before loading weights."""
        if len(expert_devices) != self.spec.num_experts:
            raise ValueError(f"placement names {len(expert_devices)} experts, the layer has {self.spec.num_experts}")
        members: dict = {}
        for expert, device in enumerate(expert_devices):
            members.setdefault(device, []).append(expert)
        inter, dtype = self.spec.intermediate_size, self.groups[0].gate_up_proj.dtype
        groups = [ExpertGroup(self.hidden_size, inter, members[key]).to(dtype) for key in sorted(members)]
        self.groups = nn.ModuleList(groups)
        self._index_experts()

    def _index_experts(self) -> None:
        cpu = torch.device("cpu")  # explicit: models are built under a meta device context
        group_of = torch.empty(self.spec.num_experts, dtype=torch.long, device=cpu)
        local_of = torch.empty(self.spec.num_experts, dtype=torch.long, device=cpu)
        for g, group in enumerate(self.groups):
            group_of[group.experts] = g
            local_of[group.experts] = torch.arange(len(group.experts), device=cpu)
        self._maps = {torch.device("cpu"): (group_of, local_of)}

    def expert_location(self, expert: int) -> tuple[int, int]:
        """(group index, row in that group's stacks) of a global expert index."""
        group_of, local_of = self._maps[torch.device("cpu")]
        return int(group_of[expert]), int(local_of[expert])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        experts, weights = self.gate(tokens)
        if self.selection_counts is not None:
            self.selection_counts += torch.bincount(experts.view(-1), minlength=self.spec.num_experts)
        fused = ops.moe(self.groups[0], tokens, experts, weights) if len(self.groups) == 1 else None
        if fused is not None:
            return fused.to(x.dtype).view(shape)
        return self._grouped(tokens, experts, weights).to(x.dtype).view(shape)

    def _grouped(self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Routing bookkeeping happens on the host when groups span devices: one small copy, and
        # no device sync inside the group loop.
        devices = {group.device for group in self.groups}
        host = tokens.device if devices == {tokens.device} else torch.device("cpu")
        # Inputs go to every device before any group runs, so a CPU group computes while the
        # kernels already launched for a GPU group run.
        inputs = {device: tokens.to(device) for device in devices}
        top_k = experts.shape[1]
        flat = experts.reshape(-1).to(host)
        order = flat.argsort(stable=True)
        pair_experts, pair_tokens = flat[order], order // top_k
        pair_weights = weights.reshape(-1).float().to(host)[order]
        if host not in self._maps:
            self._maps[host] = tuple(m.to(host) for m in self._maps[torch.device("cpu")])
        group_of, local_of = self._maps[host]
        pair_group, pair_local = group_of[pair_experts], local_of[pair_experts]
        if len(self.groups) == 1:
            group = self.groups[0]
            return group(inputs[group.device], pair_tokens, pair_local, pair_weights).to(tokens.device)
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        for g, group in enumerate(self.groups):
            chosen = (pair_group == g).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            partial = group(inputs[group.device], pair_tokens[chosen], pair_local[chosen], pair_weights[chosen])
            out += partial.to(tokens.device)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, hidden_size: int, eps: float, attention: AttentionSpec, mlp: nn.Module, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = Attention(hidden_size, attention, rope)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = mlp
        self.kernel_plan = None  # ops.py's (activation dtype, plan) for one-call decode steps

    def forward(self, x: torch.Tensor, start: int, cache) -> torch.Tensor:
        fused = ops.decoder_layer(self, x, start, cache)
        if fused is not None:
            return fused
        x = x + self.self_attn(self.input_layernorm(x), start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_batch(self, x: torch.Tensor, starts: list[int], lengths: list[int], caches: list) -> torch.Tensor:
        """Several sequences' rows (x [1, N, H]); see Attention.forward_batch."""
        fused = ops.decoder_layer_batch(self, x, starts, lengths, caches)
        if fused is not None:
            return fused
        x = x + self.self_attn.forward_batch(self.input_layernorm(x), starts, lengths, caches)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _apply(self, fn, *args, **kwargs):
        self.kernel_plan = None  # weights may have moved or changed dtype
        return super()._apply(fn, *args, **kwargs)
