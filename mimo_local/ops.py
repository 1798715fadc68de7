"""The operations MiMo's layers are made of, each run by the fastest implementation its tensors allow.

The model code (models/) says what is computed; this module decides how: our C kernels on the CPU
(float ones in kernels/cpu.py, packed int8/int4 ones in kernels/quant.py), fused into one call per
decoder layer where every part of it allows (prefill-sized int8/int4 linears: quant.py's GEMM), and
torch's own ops otherwise (CUDA, other prefill-sized steps, modules with accelerate's device hooks,
shapes where torch measured faster). What is settled
once: whether the kernels built and for which ISA (kernels/build.py, per process), torch or kernel
per weight shape (kernels/choice.py, per machine), and the fused path of each decoder layer
(LayerPlan, per layer and activation dtype). Functions returning None leave the step to the caller's
plain torch composition, which computes the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import cpu as cpu_kernels
from .kernels import quant as quant_kernels
from .models import layers as model_layers
from .quant.linear import QuantLinear, fused_expert_operands


def plain(module: nn.Module) -> bool:
    """An unquantized Linear or RMSNorm without accelerate device hooks: its weight can be handed to
    a kernel directly."""
    return type(module) in (model_layers.Linear, model_layers.RMSNorm) and not hasattr(module, "_hf_hook")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           float32_out: bool = False) -> torch.Tensor:
    """F.linear; float32 results with `float32_out` (logits: the bfloat16 kernel skips a rounding)."""
    return cpu_kernels.linear(x, weight, bias, float32_out=float32_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if cpu_kernels.rows_supported(x, weight):  # a few times faster than the torch ops below, also for prefill
        return cpu_kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [..., gate | up] rows."""
    return cpu_kernels.swiglu(gate_up)


def mlp(gate_up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """down(swiglu(gate_up(x))): one kernel call for the three where the weights allow."""
    if plain(gate_up) and plain(down) and cpu_kernels.mlp_supports(x, gate_up.weight, down.weight):
        return cpu_kernels.mlp(x, gate_up.weight, down.weight)
    return down(swiglu(gate_up(x)))


def decode_attention(attention: nn.Module, qkv: torch.Tensor, start: int, cache) -> torch.Tensor | None:
    """RoPE, cache write and attention of a few projected tokens qkv [1, T, *] in one kernel call
    ([1, T, heads * v_head_dim]), or None where the kernel does not apply."""
    return decode_attention_batch(attention, qkv, [start], [qkv.shape[1]], [cache])


def route(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A MoE router's (experts [M, k], weights [M, k]) for tokens x [M, H] in one call, or None where
    the kernel does not apply. Every CPU path routes here, so a token gets the same experts and
    weights in prefill, decode and batched steps."""
    if hasattr(router, "_hf_hook") or not quant_kernels.route_supports(x, router.weight):
        return None
    return quant_kernels.route(x, router.weight, router.e_score_correction_bias, router.spec)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, before: int, scale: float,
                      sinks: torch.Tensor | None) -> torch.Tensor | None:
    """Causal attention of a prefill chunk's queries q [1, H, T, D] over every key up to each of them
    (keys/values [1, Hkv, before + T, *]) with the sinks in the denominator, in one kernel call; None
    where the kernel does not apply or could not allocate its buffers (chunk_attention composes
    torch's flash kernel then)."""
    if not cpu_kernels.prefill_attention_supports(q, keys, values):
        return None
    return cpu_kernels.prefill_attention(q, keys, values, before, scale, sinks)


def decode_attention_batch(attention: nn.Module, qkv: torch.Tensor, starts: list[int], lengths: list[int],
                           caches: list) -> torch.Tensor | None:
    """decode_attention of several sequences' projected rows (qkv [1, N, *]: lengths[b] rows of sequence
    b at positions starts[b].. in caches[b]) in one kernel call ([1, N, heads * v_head_dim]), each
    sequence's rows as its own call gives them; None where the kernel does not apply to all of them."""
    if qkv.shape[0] != 1 or not all(cpu_kernels.attention_supports(qkv, cache, steps)
                                    for cache, steps in zip(caches, lengths)):
        return None
    tables = [attention.rope.cos_sin(start, steps, torch.float32) for start, steps in zip(starts, lengths)]
    sinks = None if attention.sinks is None else attention.sinks.float()
    rows = qkv.shape[1]
    out = cpu_kernels.decode_attention(qkv.view(rows, -1), starts, lengths, tables, caches, sinks, attention.scale)
    return out.view(1, rows, -1)


def moe(group: nn.Module, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """All routed experts of a layer held by one ExpertGroup (float, or packed int8/int4/MXFP4 stacks),
    for a few tokens, in one call (float32 [M, H]); None where no kernel applies."""
    if isinstance(group.gate_up_proj, torch.Tensor):
        if cpu_kernels.moe_supports(tokens, group.gate_up_proj):
            return cpu_kernels.moe(tokens, group.gate_up_proj, group.down_proj, experts, weights)
        return None
    quantized = fused_expert_operands(group.gate_up_proj, group.down_proj)
    if not quantized or not quant_kernels.moe_supports(tokens, quantized[2][0], quantized[3][0]):
        return None
    # the assignments as MoE's grouped path orders them (so the same sums, bit for bit)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    return quant_kernels.moe_pairs(tokens, *quantized, flat[order], order // experts.shape[1],
                                   weights.reshape(-1).float()[order])


def expert_pairs(group: nn.Module, x, pair_tokens, pair_experts, pair_weights) -> torch.Tensor | None:
    """out[token] += weight * expert(x[token]) over an ExpertGroup's (token, expert, weight) pairs in one
    call, for float or packed int8/int4 stacks (float32 [M, H]); None where no kernel applies."""
    if isinstance(group.gate_up_proj, torch.Tensor) and cpu_kernels.moe_supports(x, group.gate_up_proj):
        return cpu_kernels.moe_pairs(x, group.gate_up_proj, group.down_proj, pair_experts, pair_tokens, pair_weights)
    quantized = fused_expert_operands(group.gate_up_proj, group.down_proj)
    if quantized and quant_kernels.moe_supports(x, quantized[2][0], quantized[3][0]):
        return quant_kernels.moe_pairs(x, *quantized, pair_experts, pair_tokens, pair_weights)
    return None


def expert_linear(stack, x: torch.Tensor, index: int) -> torch.Tensor:
    """x @ W[index].T for a stacked [E, out, in] weight (cpu.linear: the kernels, or float32 panels for a
    bfloat16 prefill on CPUs without bfloat16 instructions), or for a quantized stack."""
    if isinstance(stack, torch.Tensor):
        return cpu_kernels.linear(x, stack[index])
    return stack.linear(x, index)


def decoder_layer(layer: nn.Module, x: torch.Tensor, start: int, cache) -> torch.Tensor | None:
    """A decode or verify step (a few tokens, batch 1) of a whole pre-norm decoder layer in one kernel
    call (its MoE, if any, after it), or None where that cannot run."""
    return decoder_layer_batch(layer, x, [start], [x.shape[1]], [cache])


def decoder_layer_batch(layer: nn.Module, x: torch.Tensor, starts: list[int], lengths: list[int],
                        caches: list) -> torch.Tensor | None:
    """decoder_layer for a batch step: the rows of several sequences (x [1, N, H]: lengths[b] rows of
    sequence b at positions starts[b].. in caches[b]) in one kernel call, each sequence's rows as its
    own decoder_layer call gives them; None where that cannot run."""
    if x.shape[0] != 1:
        return None
    if not all(cpu_kernels.attention_supports(x, cache, steps) for cache, steps in zip(caches, lengths)):
        return None
    if layer.kernel_plan is None or layer.kernel_plan[0] != x.dtype:
        layer.kernel_plan = (x.dtype, LayerPlan.make(layer, x))
    plan = layer.kernel_plan[1]
    return None if plan is None else plan.run(layer, x, starts, lengths, caches)


def projection_operand(module: nn.Module):
    """A projection as the fused quantized decoder-layer kernel takes it (bfloat16, int8 or int4
    weights), or None where it cannot."""
    if isinstance(module, QuantLinear):
        return module.fused_projection()
    if plain(module) and module.weight.dtype == torch.bfloat16:
        return quant_kernels.projection(16, module.weight, bias=module.bias)
    return None


class LayerPlan:
    """How a decoder layer runs decode and verify steps on the CPU in one kernel call, a dense MLP
    included (a MoE runs after it on the normed hidden state): plain float weights through cpu.py's
    kernel, int8/int4 ones (mixed with bfloat16 ones) through quant.py's. Made once per layer and
    activation dtype: the weights' descriptions do not change between steps."""

    def __init__(self, quantized: bool, weights: dict, dense: bool, sinks: torch.Tensor | None, experts=None):
        self.quantized, self.weights, self.dense, self.sinks = quantized, weights, dense, sinks
        self.experts = experts  # quant.RoutedExperts of a MoE layer, where its kernel applies

    @classmethod
    def make(cls, layer: nn.Module, x: torch.Tensor) -> "LayerPlan | None":
        attention, mlp_module = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(plain(norm) and cpu_kernels.supports_contiguous(x, norm.weight) for norm in norms):
            return None
        dense = type(mlp_module) is model_layers.MLP
        sinks = None if attention.sinks is None else attention.sinks.float()  # the kernels take float32 sinks
        experts = None if dense else routed_experts(mlp_module, x)
        projections = [attention.qkv_proj, attention.o_proj]
        if dense:
            projections += [mlp_module.gate_up_proj, mlp_module.down_proj]
        if all(plain(m) and cpu_kernels.supports_contiguous(x, m.weight) for m in projections):
            weights = dict(qkv_weight=attention.qkv_proj.weight, qkv_bias=attention.qkv_proj.bias,
                           o_weight=attention.o_proj.weight)
            if dense:
                weights.update(gate_up=mlp_module.gate_up_proj.weight, down=mlp_module.down_proj.weight)
            return cls(False, weights, dense, sinks, experts)
        described = [projection_operand(m) for m in projections]
        if None in described or not quant_kernels.decoder_layer_supports(x, described):
            return None
        weights = dict(qkv=described[0], o=described[1])
        if dense:
            weights.update(gate_up=described[2], down=described[3], inter=mlp_module.intermediate_size)
        return cls(True, weights, dense, sinks, experts)

    def run(self, layer: nn.Module, x: torch.Tensor, starts: list[int], lengths: list[int],
            caches: list) -> torch.Tensor | None:
        """The layer's output for the rows of one or more sequences (see decoder_layer_batch), or None
        where the kernel declined (nothing was changed then)."""
        attention = layer.self_attn
        tables = [attention.rope.cos_sin(start, steps, torch.float32) for start, steps in zip(starts, lengths)]
        kernel = quant_kernels.decoder_layer if self.quantized else cpu_kernels.decoder_layer
        result = kernel(x, layer.input_layernorm.eps, norm1=layer.input_layernorm.weight,
                        norm2=layer.post_attention_layernorm.weight, starts=starts, lengths=lengths, tables=tables,
                        caches=caches, sinks=self.sinks, scale=attention.scale, **self.weights)
        if result is None:
            return None
        out, normed = result
        if self.dense:
            return out
        if self.experts is not None and self.experts.add_to(out, normed, layer.mlp.selection_counts):
            return out
        return out + layer.mlp(normed)


def routed_experts(moe: nn.Module, x: torch.Tensor) -> "quant_kernels.RoutedExperts | None":
    """The one-call routing and experts of a MoE layer whose experts are one group of bfloat16 or
    packed int8/int4/MXFP4 stacks on the CPU, for bfloat16 decode steps; None where that kernel does
    not apply."""
    if type(moe) is not model_layers.MoE or len(moe.groups) != 1 or x.dtype != torch.bfloat16:
        return None
    router, group = moe.gate, moe.groups[0]
    if hasattr(router, "_hf_hook") or hasattr(group, "_hf_hook") or not quant_kernels.route_supports(x, router.weight):
        return None
    gate_up, down = group.gate_up_proj, group.down_proj
    if isinstance(gate_up, torch.Tensor):
        if gate_up.is_contiguous() and down.is_contiguous() and cpu_kernels.moe_supports(x, gate_up):
            return quant_kernels.RoutedExperts(router.weight, router.e_score_correction_bias, moe.spec, "bf16", 0,
                                               (gate_up,), (down,))
        return None
    quantized = fused_expert_operands(gate_up, down)
    if not quantized or not quant_kernels.moe_supports(x, quantized[2][0], quantized[3][0]):
        return None
    return quant_kernels.RoutedExperts(router.weight, router.e_score_correction_bias, moe.spec, *quantized)
