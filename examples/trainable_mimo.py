"""Training-only PyTorch modules for both MiMo families whose `state_dict()` names ARE the hub
tensor names, so a trained model is saved as is and loads with `Engine.load`.

The math follows /work/shared/MIMO_ARCHITECTURE.md and is checked against the engine by
tests/test_demo_models.py (logit parity of the main model and of every MTP layer). No KV cache:
whole sequences only, which is all training needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(rope_dim: int, theta: float, steps: int, device=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim)
    freqs = torch.arange(steps, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin, rope_dim: int):
    """Rotate-half (NeoX) RoPE on the first `rope_dim` dims of each head; x [B, H, T, D]."""
    rotated, passed = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rotate_half = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
    rotated = rotated * cos.to(x.dtype) + rotate_half * sin.to(x.dtype)
    return torch.cat([rotated, passed], dim=-1)


class Attention(nn.Module):
    """q/k/v/o projections (hub names), optional q/k/v biases, partial RoPE, V scaling, optional
    sliding window (query sees itself and `window` previous tokens) and per-head sink logits."""

    def __init__(self, hidden, heads, kv_heads, head_dim, v_head_dim, rope_dim, theta, bias=False,
                 window=None, sink=False, value_scale=1.0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.v_head_dim = heads, kv_heads, head_dim, v_head_dim
        self.rope_dim, self.theta, self.window, self.value_scale = rope_dim, theta, window, value_scale
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * v_head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * v_head_dim, hidden, bias=False)
        if sink:
            self.attention_sink_bias = nn.Parameter(torch.zeros(heads))
        else:
            self.attention_sink_bias = None

    def forward(self, x):
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.v_head_dim).transpose(1, 2) * self.value_scale
        cos, sin = rope_tables(self.rope_dim, self.theta, steps, x.device)
        q, k = apply_rope(q, cos, sin, self.rope_dim), apply_rope(k, cos, sin, self.rope_dim)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if self.window is None and self.attention_sink_bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            positions = torch.arange(steps, device=x.device)
            offset = positions[:, None] - positions[None, :]
            allowed = offset >= 0
            if self.window is not None:
                allowed &= offset <= self.window
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5
            scores = scores.masked_fill(~allowed, float("-inf"))
            if self.attention_sink_bias is not None:
                sink = self.attention_sink_bias.float().view(1, -1, 1, 1).expand(batch, -1, steps, 1)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores, dim=-1)
            out = (probs @ v.float()).to(v.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores in fp32; top-k chosen on score + e_score_correction_bias (a buffer moved by
    the aux-loss-free balancing update, not by gradients); weights = chosen scores, renormalized."""

    def __init__(self, hidden, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))

    def forward(self, x):
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        chosen = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        return chosen, weights / (weights.sum(-1, keepdim=True) + 1e-20)


class MoE(nn.Module):
    def __init__(self, hidden, experts, top_k, inter):
        super().__init__()
        self.gate = Router(hidden, experts, top_k)
        self.experts = nn.ModuleList(MLP(hidden, inter) for _ in range(experts))
        self.last_load = None  # tokens per expert in the last forward (for bias updates and stats)

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        chosen, weights = self.gate(tokens)
        self.last_load = torch.bincount(chosen.flatten(), minlength=len(self.experts)).detach()
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out = out.index_add(0, rows, (expert(tokens[rows]) * weights[rows, slot, None]).float())
        return out.to(x.dtype).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, hidden, eps, attention, mlp, post_norm="post_attention_layernorm"):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = attention
        self.post_norm_name = post_norm
        setattr(self, post_norm, RMSNorm(hidden, eps))
        self.mlp = mlp

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(getattr(self, self.post_norm_name)(x))


class MTPLayer(DecoderLayer):
    """Fuse (target hidden, next-token embedding), one decoder block, final norm (then the shared
    lm_head). MiMo-7B: [hidden, embedding] with token/hidden_layernorm + input_proj; V2-Flash:
    [embedding, hidden] with enorm/hnorm + eh_proj and pre_mlp_layernorm."""

    def __init__(self, hidden, eps, attention, mlp, v2: bool):
        super().__init__(hidden, eps, attention, mlp, "pre_mlp_layernorm" if v2 else "post_attention_layernorm")
        self.v2 = v2
        names = ("enorm", "hnorm", "eh_proj") if v2 else ("token_layernorm", "hidden_layernorm", "input_proj")
        self.names = names
        setattr(self, names[0], RMSNorm(hidden, eps))
        setattr(self, names[1], RMSNorm(hidden, eps))
        setattr(self, names[2], nn.Linear(2 * hidden, hidden, bias=False))
        self.final_layernorm = RMSNorm(hidden, eps)

    def forward(self, hidden, embeddings):
        token_norm, hidden_norm, proj = (getattr(self, n) for n in self.names)
        parts = [token_norm(embeddings), hidden_norm(hidden)]
        if not self.v2:
            parts.reverse()
        return self.final_layernorm(super().forward(proj(torch.cat(parts, dim=-1))))


class Body(nn.Module):
    """Holds what the hub stores under `model.`."""


class TrainableMiMo(nn.Module):
    """Either family, built from its hub config.json dict plus the number of MTP layers."""

    def __init__(self, config: dict, mtp_layers: int):
        super().__init__()
        self.config = config
        hidden, eps = config["hidden_size"], config.get("layernorm_epsilon", config.get("rms_norm_eps"))
        self.v2 = config["model_type"] == "mimo_v2_flash"
        self.model = Body()
        self.model.embed_tokens = nn.Embedding(config["vocab_size"], hidden)
        self.model.layers = nn.ModuleList(self._layer(i, hidden, eps) for i in range(config["num_hidden_layers"]))
        self.model.norm = RMSNorm(hidden, eps)
        mtp = nn.ModuleList(
            MTPLayer(hidden, eps, self._attention(sliding=self.v2), MLP(hidden, config["intermediate_size"]), self.v2)
            for _ in range(mtp_layers)
        )
        if self.v2:
            self.model.mtp = Body()
            self.model.mtp.layers = mtp
        else:
            self.model.mtp_layers = mtp
        self.lm_head = nn.Linear(hidden, config["vocab_size"], bias=False)

    @property
    def mtp(self) -> nn.ModuleList:
        return self.model.mtp.layers if self.v2 else self.model.mtp_layers

    def _attention(self, sliding: bool) -> Attention:
        c, hidden = self.config, self.config["hidden_size"]
        if not self.v2:
            dim = hidden // c["num_attention_heads"]
            return Attention(hidden, c["num_attention_heads"], c["num_key_value_heads"], dim, dim, dim,
                             c["rope_theta"], bias=True)
        prefix = "swa_" if sliding else ""
        dim = c[prefix + "head_dim"]
        return Attention(
            hidden, c[prefix + "num_attention_heads"], c[prefix + "num_key_value_heads"], dim,
            c[prefix + "v_head_dim"], int(dim * c["partial_rotary_factor"]),
            c["swa_rope_theta" if sliding else "rope_theta"],
            window=c["sliding_window_size"] if sliding else None,
            sink=c["add_swa_attention_sink_bias" if sliding else "add_full_attention_sink_bias"],
            value_scale=c["attention_value_scale"],
        )

    def _layer(self, i: int, hidden: int, eps: float) -> DecoderLayer:
        c = self.config
        if not self.v2:
            return DecoderLayer(hidden, eps, self._attention(False), MLP(hidden, c["intermediate_size"]))
        sliding = c["hybrid_layer_pattern"][i] == 1
        if c["moe_layer_freq"][i]:
            mlp = MoE(hidden, c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"])
        else:
            mlp = MLP(hidden, c["intermediate_size"])
        return DecoderLayer(hidden, eps, self._attention(sliding), mlp)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, ids):
        """Main-model logits [B, T, V] and the last decoder layer's output before the final norm."""
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x)), x

    def mtp_logits(self, k: int, hidden, ids, every: int = 1):
        """MTP layer k at every position i that has a token x_{i+k+1}: reads (h_i, x_{i+k+1}) and
        predicts x_{i+k+2}. hidden [B, T, H] of the target; returns [B, T-k-1, V], or only every
        `every`-th of those positions (the lm_head is most of an MTP layer's cost)."""
        steps = ids.shape[1] - k - 1
        embeddings = self.model.embed_tokens(ids[:, k + 1 : k + 1 + steps])
        return self.lm_head(self.mtp[k](hidden[:, :steps], embeddings)[:, ::every])
