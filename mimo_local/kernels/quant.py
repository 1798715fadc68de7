"""Matmuls on packed int8 / int4 weights: the runtime layout every quantized format is loaded into.

Layouts (row = output channel, so a decode GEMV streams each row once):
- int8, per output channel, symmetric: `qweight` int8 [out, in], `scales` float32 [out];
  W = qweight * scales[:, None].
- int4, groups of `group_size` inputs, asymmetric: `packed` uint8 [out, in // 2] (input 2j in the low
  nibble, 2j+1 in the high nibble), `scales` and `zeros` float32 [out, in // group_size];
  W[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]. Symmetric int4 (GPTQ sym) has zeros = 8.
- mxfp4, as MiMo-V2.6 stores its experts (mimo_local/quant/mxfp4.py): `packed` uint8 [out, in // 2]
  e2m1 pairs (nibbles ordered as int4's), `scales` uint8 [out, in // 32] E8M0.

Each op has a pure-torch reference (`reference_*`). On CPU, the few-token case (decode, speculative
verify) runs the C kernels of cpu_quant.c, which stream the packed bytes once per call (int8: unless
torch's own int8 op, torch._weight_int8pack_mm, is faster for the shape here: choice.py); prefill-
sized bfloat16 int8/int4 calls run its GEMM on int8-quantized x (`gemm`, exactly `reference_gemm`)
where that measured faster than the row kernel or dequantize + F.linear; on CUDA the Triton kernels
of triton_quant.py run; everything else dequantizes and calls F.linear.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant import mxfp4
from . import choice, cpu, signatures, triton_quant

SOURCE = Path(__file__).with_name("cpu_quant.c")
# Rows (tokens) up to which the row kernels beat dequantize + F.linear: decode for int8; for int4 a
# whole prefill chunk (measured on the 7B-shape bench: 512-token prefill 914 vs 747 tok/s; int8 with
# 512 rows would be slower than torch's GEMM, 677 vs 1031 tok/s). Both now serve prefill only where
# the GEMM (GEMM_MIN_ROWS) does not apply or measured slower.
INT8_MAX_ROWS = 16
INT4_MAX_ROWS = 512
# MXFP4 (an expert's rows in a prefill chunk, V2-Flash down 4096x2048, 1 thread): the C kernel 28 ms
# for 64 rows vs 120 ms to dequantize + F.linear; 219 vs 119 ms for 256 rows.
MXFP4_MAX_ROWS = 64
GEMM_INT8_GROUP = 128  # inputs per x scale of the prefill GEMM on int8 weights (cpu_quant.c)
# Rows from which bfloat16 x takes the prefill GEMM (gemm_quant_bf16) where it measured faster than
# the path above (choice.py): past the decode and verify steps, whose bits stay the row kernels'.
# 4096x4096, 1 thread, ours vs before: int4 1.28x at 24 rows, 4.7x at 512 (MiMo-7B gate|up); int8
# 1.9x at 24 rows, 1.7x at 512 (torch's bfloat16 GEMM on the float weight: 1.15-1.25x at 512).
GEMM_MIN_ROWS = 17
# moe_quant's `format` argument per stack kind (cpu_quant.c)
MOE_FORMATS = {"mxfp4": 1, "int4": 4, "int8": 8}
ROUTED_FORMATS = {**MOE_FORMATS, "bf16": 16}  # moe_routed's: bfloat16 stacks too


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] integers in 0..15 -> uint8 [out, in // 2]."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in // 2] -> uint8 [out, in] in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    q = unpack_int4(packed).float()
    out, features = q.shape
    q = q.view(out, features // group_size, group_size)
    weight = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return weight.reshape(out, features).to(dtype)


def int8_codes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of float rows [out, in] (row * 127 / row absmax, rounded) and the row
    absmax: the rounding LLM.int8 (bitsandbytes) and the int8 layout share."""
    absmax = rows.abs().amax(dim=1)
    codes = torch.round(rows * (127.0 / absmax.clamp(min=1e-12))[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, absmax


def quantize_int8(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> the int8 layout (one scale per row), `chunk_rows` rows at a time so a
    large matrix never needs a float32 copy of itself."""
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for begin in range(0, weight.shape[0], chunk_rows):
        codes, absmax = int8_codes(weight[begin : begin + chunk_rows].float())
        qweight[begin : begin + chunk_rows] = codes
        scales[begin : begin + chunk_rows] = absmax.clamp(min=1e-12) / 127.0
    return qweight, scales


TILE_ROWS = 512  # weight rows dequantized at a time: the tile stays in cache while torch's GEMM reads it


def tiled_linear(x: torch.Tensor, out_features: int, dequantize_rows, bias=None) -> torch.Tensor:
    """F.linear(x, W, bias) with W [out_features, in] dequantized TILE_ROWS rows at a time by
    `dequantize_rows(begin, end)` (in x's dtype): prefill-sized calls never hold the whole float
    weight (at MiMo-7B's gate|up, 2.3-2.8x faster than dequantizing it whole, measured at 512 tokens)."""
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    for begin in range(0, out_features, TILE_ROWS):
        end = min(begin + TILE_ROWS, out_features)
        out[..., begin:end] = F.linear(x, dequantize_rows(begin, end), None if bias is None else bias[begin:end])
    return out


def reference_int8_linear(x, qweight, scales, bias=None):
    return tiled_linear(x, qweight.shape[0], lambda b, e: dequantize_int8(qweight[b:e], scales[b:e], x.dtype), bias)


def reference_int4_linear(x, packed, scales, zeros, group_size: int, bias=None):
    return tiled_linear(x, packed.shape[0], lambda b, e: dequantize_int4(packed[b:e], scales[b:e], zeros[b:e],
                                                                          group_size, x.dtype), bias)


def reference_mxfp4_linear(x, packed, scales, bias=None):
    return tiled_linear(x, packed.shape[0], lambda b, e: mxfp4.dequantize(packed[b:e], scales[b:e], x.dtype), bias)


def quantize_blocks_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations of the MXFP4 kernels (cpu_quant.c): x [..., K] as int8_group_codes in blocks of
    32 (float32 codes [..., K]) and the scale the codes are multiplied by, rounded to float16's
    precision (float32 [..., K / 32]): llama.cpp's Q8_0 exactly."""
    codes, scales, _ = int8_group_codes(x.reshape(-1, x.shape[-1]), mxfp4.BLOCK)
    return codes.view(x.shape), round_to_half(scales).view(*x.shape[:-1], -1)


def round_to_half(values: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to float16's precision, to nearest with ties to even (round_to_half of
    cpu_quant.c): float16's subnormals below 2^-14, its 11 significant bits above, without its range."""
    bits = values.view(torch.int32)
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    return torch.where(values.abs() < 2.0**-14, torch.round(values * 2.0**24) / 2.0**24, rounded)


def mxfp4_q8_terms(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MXFP4 kernels' arithmetic for x [M, K]: per output and block, the exact integer dot product of
    the block's int8 codes with twice its e2m1 values, and the float32 step it is multiplied by,
    2^(e - 127) * (x_scale / 2) rounded as the kernels round it. Both float64 [M, N, K / 32]; the
    kernels' result is the sum of their products, in float32 and their own order."""
    codes, x_scale = quantize_blocks_q8(x)
    twice = mxfp4.dequantize(packed, torch.full_like(scales, 128))  # scale byte 128: 2 * e2m1, exact
    blocks = scales.shape[-1]
    dots = torch.einsum("mbj,nbj->mnb", codes.double().view(x.shape[0], blocks, mxfp4.BLOCK),
                        twice.double().view(packed.shape[0], blocks, mxfp4.BLOCK))
    steps = mxfp4.scale_values(scales)[None] * (x_scale * 0.5)[:, None, :]
    return dots, steps.double()


def reference_mxfp4_q8_linear(x, packed, scales, bias=None):
    """x @ W.T (+ bias) as the MXFP4 kernels compute it (mxfp4_q8_terms), summed in float64, in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    dots, steps = mxfp4_q8_terms(flat, packed, scales)
    out = (dots * steps).sum(-1)
    out = out if bias is None else out + bias.double()
    return out.view(*x.shape[:-1], packed.shape[0]).to(x.dtype)


_POINTER, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# Every entry point of cpu_quant.c: (argtypes, restype), checked against the C source by the tests.
DECLARATIONS: dict[str, signatures.Declaration] = {
    "linear_int8": ([_POINTER] * 5 + [_INT, _I64, _I64], None),
    "linear_int4": ([_POINTER] * 7 + [_INT, _I64, _I64, _I64], None),
    "linear_mxfp4": ([_POINTER] * 5 + [_INT, _I64, _I64], _INT),
    "linear_int4_bf16": ([_POINTER] * 6 + [_INT, _I64, _I64, _I64, _INT], _INT),
    "linear_int8_bf16": ([_POINTER] * 5 + [_INT, _I64, _I64, _INT], _INT),
    "gemm_quant_bf16": ([_POINTER, _INT] + [_POINTER] * 6 + [_INT, _I64, _I64, _I64], _INT),
    "moe_quant": ([_INT] + [_POINTER] * 10 + [_INT, _INT] + [_POINTER] * 3 + [_I64, _I64, _I64], None),
    "moe_route": ([_POINTER] * 3 + [_INT, _I64, _INT, _INT, _INT, _INT, _INT, ctypes.c_float] + [_POINTER] * 2, None),
    "moe_routed": ([_INT, _POINTER, _POINTER, _INT, _POINTER, _POINTER] + [_INT] * 5 + [ctypes.c_float]
                   + [_POINTER] * 6 + [_I64] * 3 + [_POINTER], _INT),
    "decoder_layer_quant_batch_bf16": ([_POINTER, _INT, _POINTER, _I64, ctypes.c_float] + [_POINTER] * 2 + [_I64]
                                       + [_POINTER] * 4 + [_I64] + [_POINTER] * 8, _INT),
}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    lib = cpu.load_compiled(SOURCE)
    if lib is None:
        return None
    signatures.declare(lib, DECLARATIONS)
    return lib


class Projection(ctypes.Structure):
    """`Projection` of cpu_quant.c: one projection of a fused decoder layer in any runtime layout."""

    _fields_ = [("bits", ctypes.c_int), ("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("group", ctypes.c_int64)]


def projection(bits: int, weight: torch.Tensor, scales=None, zeros=None, group: int = 0, bias=None):
    """A Projection for bfloat16 (bits 16), int8 or int4 weights, and the tensors it points to
    (keep them alive for the call). Bias: bfloat16 for bits 16, converted to float32 otherwise."""
    if bits != 16 and bias is not None:
        bias = bias.float()
    tensors = [t for t in (weight, scales, zeros, bias) if t is not None]
    return Projection(bits, weight.data_ptr(), cpu._address(scales), cpu._address(zeros), cpu._address(bias),
                      group), tensors


def decoder_layer_supports(x: torch.Tensor, projections) -> bool:
    """Whether `decoder_layer` may run: bfloat16 activations on the CPU and contiguous CPU weights
    (the layout conditions are checked by the kernel itself)."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and all(t.device.type == "cpu" and t.is_contiguous() for _, tensors in projections for t in tensors)
        and library() is not None
    )


def decoder_layer(x, eps: float, norm1, qkv, o, norm2, starts: list[int], lengths: list[int], tables: list,
                  caches: list, sinks, scale: float, gate_up=None, down=None, inter: int = 0):
    """cpu.decoder_layer with projections from `projection` (any mix of bfloat16, int8 and int4;
    `inter` the MLP's intermediate size). Returns (h, norm2(h)) as cpu.decoder_layer does, or None
    where the kernel does not apply or torch's op is faster on one of the projections (the caller
    then runs the layer step by step; nothing was changed)."""
    if any(_projection_prefers_torch(p) for p in (qkv, o, gate_up, down) if p is not None):
        return None
    spec = caches[0].spec
    qkv_out = spec.num_heads * spec.head_dim + spec.num_kv_heads * (spec.head_dim + spec.v_head_dim)
    inter = inter if down is not None else 0
    buffers = cpu.LayerBuffers(x, caches, starts, lengths, qkv_out, inter, tables, sinks, scale)
    done = library().decoder_layer_quant_batch_bf16(
        buffers.out.data_ptr(), buffers.attention.count, buffers.attention.rows, x.shape[2], eps, norm1.data_ptr(),
        ctypes.byref(qkv[0]), qkv_out, ctypes.byref(o[0]), norm2.data_ptr(),
        None if gate_up is None else ctypes.byref(gate_up[0]), None if down is None else ctypes.byref(down[0]), inter,
        *buffers.caches(), *buffers.pointers(),
    )
    return (buffers.out, buffers.normed) if done else None


def _projection_prefers_torch(described) -> bool:
    structure, tensors = described
    if structure.bits == 16:
        return cpu.torch_is_faster(tensors[0])
    return structure.bits == 8 and int8_torch_is_faster(tensors[0], tensors[1])


def _torch_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    """torch's own int8 weight-only matmul (its scales in x's dtype), bias added after."""
    out = torch._weight_int8pack_mm(x.contiguous(), qweight, scales.to(x.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def int8_torch_is_faster(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch._weight_int8pack_mm beats the int8 kernel on this shape here (choice.py)."""
    if not hasattr(torch, "_weight_int8pack_mm") or dtype not in (torch.bfloat16, torch.float32):
        return False

    def contenders():
        x = torch.randn(1, qweight.shape[1]).to(dtype)
        return (lambda: _int8_kernel(x, qweight, scales, None, dtype)), (lambda: _torch_int8_linear(x, qweight, scales))

    return choice.prefers_torch(f"int8-{str(dtype).removeprefix('torch.')}", *qweight.shape, library().choice_key,
                                contenders)


def _kernel_applies(x: torch.Tensor, *packed: torch.Tensor, max_rows: int = INT8_MAX_ROWS) -> bool:
    rows = x.numel() // x.shape[-1]
    return (
        x.device.type == "cpu"
        and rows <= max_rows
        and all(t.device.type == "cpu" and t.is_contiguous() for t in packed)
        and library() is not None
    )


def _float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float().contiguous()


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None,
                float32_out: bool = False) -> torch.Tensor:
    """x @ W.T in x's dtype, or in float32 with `float32_out` (logits; the Triton kernel on CUDA
    rounds through x's dtype first)."""
    out_dtype = torch.float32 if float32_out else x.dtype
    if x.is_cuda and triton_quant.available():
        return triton_quant.int8_linear(x, qweight, scales, bias).to(out_dtype)
    out = _prefill_gemm(x, 8, qweight, scales, None, 0, bias, float32_out)
    if out is not None:
        return out
    if not _kernel_applies(x, qweight):
        return reference_int8_linear(x.to(out_dtype), qweight, scales, None if bias is None else bias.to(out_dtype))
    if int8_torch_is_faster(qweight, scales, x.dtype):
        return cpu.torch_rows(_torch_int8_linear, x, qweight, scales, bias).to(out_dtype)
    return _int8_kernel(x, qweight, scales, bias, out_dtype)


def _int8_kernel(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias, out_dtype: torch.dtype):
    out_features, in_features = qweight.shape
    rows = x.numel() // in_features
    scales, bias = _float32(scales), _float32(bias)
    if x.dtype == torch.bfloat16 and out_dtype in (torch.bfloat16, torch.float32):
        flat = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype)
        if library().linear_int8_bf16(
            flat.data_ptr(), qweight.data_ptr(), scales.data_ptr(), bias.data_ptr() if bias is not None else None,
            out.data_ptr(), rows, out_features, in_features, out_dtype == torch.bfloat16,
        ):
            return out
    out = torch.empty(rows, out_features, dtype=torch.float32)
    flat = x.reshape(-1, in_features).float().contiguous()
    library().linear_int8(
        flat.data_ptr(), qweight.data_ptr(), scales.data_ptr(), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), flat.shape[0], out_features, in_features,
    )
    return out.view(*x.shape[:-1], out_features).to(out_dtype)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bias=None
) -> torch.Tensor:
    if x.is_cuda and triton_quant.available():
        return triton_quant.int4_linear(x, packed, scales, zeros, group_size, bias)
    out = _prefill_gemm(x, 4, packed, scales, zeros, group_size, bias)
    return out if out is not None else _int4_rows(x, packed, scales, zeros, group_size, bias)


def _int4_rows(x, packed, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """int4_linear without the prefill GEMM: the row kernels up to INT4_MAX_ROWS rows, else the reference."""
    in_features = packed.shape[1] * 2
    if not _kernel_applies(x, packed, max_rows=INT4_MAX_ROWS) or in_features % group_size or group_size % 2:
        return reference_int4_linear(x, packed, scales, zeros, group_size, bias)
    out_features, rows = packed.shape[0], x.numel() // in_features
    scales, zeros, bias = _float32(scales), _float32(zeros), _float32(bias)
    if x.dtype == torch.bfloat16:
        flat = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
        if library().linear_int4_bf16(
            flat.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            bias.data_ptr() if bias is not None else None, out.data_ptr(), rows, out_features,
            in_features, group_size, 1,
        ):
            return out
    out = torch.empty(rows, out_features, dtype=torch.float32)
    flat = x.reshape(-1, in_features).float()
    x_even, x_odd = flat[:, 0::2].contiguous(), flat[:, 1::2].contiguous()
    library().linear_int4(
        x_even.data_ptr(), x_odd.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), flat.shape[0], out_features, in_features,
        group_size,
    )
    return out.view(*x.shape[:-1], out_features).to(x.dtype)


def int8_group_codes(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 quantization of x [M, K] that the prefill GEMM, the int4 decode kernel and (in blocks
    of 32) the MXFP4 kernels make: codes [M, K] (round(x / scale), half to even as lrintf, scale =
    max|x_group| / 127, 1 for a zero group), scales and scale * sum(codes) [M, K / group]."""
    rows = x.float().reshape(x.shape[0], -1, group)
    peak = rows.abs().amax(dim=-1)
    scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    codes = torch.round(rows * (1.0 / scales)[..., None])
    return codes.reshape(x.shape), scales, scales * codes.sum(dim=-1)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c rounded once (float64 holds the product exactly; the sum is rounded to
    float64 and then to float32, which can differ from one rounding in the last bit, odds about
    2^-29 per call)."""
    return (a.double() * b.double() + c.double()).float()


def reference_gemm(x: torch.Tensor, bits: int, weight: torch.Tensor, scales: torch.Tensor, zeros, group: int,
                   bias=None) -> torch.Tensor:
    """What gemm_quant_bf16 of cpu_quant.c computes, in its order of float32 operations (float32
    [M, N]): x quantized by int8_group_codes in groups (int8 weights: of GEMM_INT8_GROUP), each group's
    integer sum exact, then per group acc = fma(exact, scale * x_scale, acc) and
    acc = fma(-scale * zero, x_sum, acc), where int8 weights count as codes w + 128 with zero 128."""
    if bits == 8:
        group = GEMM_INT8_GROUP
        codes_w = weight.double() + 128
        groups = weight.shape[1] // group
        col_scales = scales.float()[:, None].expand(-1, groups)
        offsets = col_scales * 128.0
    else:
        codes_w = unpack_int4(weight).double()
        col_scales, offsets = scales.float(), scales.float() * zeros.float()
    codes_x, x_scales, x_sums = int8_group_codes(x.reshape(-1, x.shape[-1]), group)
    out_features, groups = col_scales.shape
    exact = torch.einsum("mgj,ngj->mng", codes_x.double().view(codes_x.shape[0], groups, group),
                         codes_w.view(out_features, groups, group)).float()
    acc = torch.zeros(codes_x.shape[0], out_features)
    for g in range(groups):
        acc = _fma(exact[:, :, g], col_scales[None, :, g] * x_scales[:, g, None], acc)
        acc = _fma(-offsets[None, :, g], x_sums[:, g, None].expand_as(acc), acc)
    return acc if bias is None else acc + bias.float()


def gemm(x: torch.Tensor, bits: int, weight: torch.Tensor, scales: torch.Tensor, zeros, group: int,
         bias=None, float32_out: bool = False) -> torch.Tensor | None:
    """The prefill GEMM on bfloat16 x [..., K]: bfloat16 [..., N] (float32 with `float32_out`), or
    None where its layout conditions fail (see gemm_quant_bf16)."""
    in_features = x.shape[-1]
    flat = x.reshape(-1, in_features).contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32 if float32_out else torch.bfloat16)
    scales, zeros, bias = _float32(scales), _float32(zeros), _float32(bias)
    y_f32, y = (out.data_ptr(), None) if float32_out else (None, out.data_ptr())
    if not library().gemm_quant_bf16(flat.data_ptr(), bits, weight.data_ptr(), scales.data_ptr(), cpu._address(zeros),
                                      cpu._address(bias), y_f32, y, flat.shape[0], weight.shape[0], in_features, group):
        return None
    return out.view(*x.shape[:-1], weight.shape[0])


def _gemm_layout_fits(bits: int, in_features: int, group: int) -> bool:
    return in_features % GEMM_INT8_GROUP == 0 if bits == 8 else group % 128 == 0 and in_features % group == 0


def _prefill_gemm(x: torch.Tensor, bits: int, weight: torch.Tensor, scales, zeros, group: int, bias,
                  float32_out: bool = False):
    """`gemm` for a prefill-sized bfloat16 x on the CPU where it applies and is not the slower path
    for the weight's shape here; None otherwise (the caller's path runs)."""
    rows = x.numel() // x.shape[-1]
    if (x.dtype != torch.bfloat16 or rows < GEMM_MIN_ROWS or not _gemm_layout_fits(bits, x.shape[-1], group)
            or not _kernel_applies(x, weight, max_rows=rows) or gemm_is_slower(bits, weight, scales, zeros, group)):
        return None
    return gemm(x, bits, weight, scales, zeros, group, bias, float32_out)


def gemm_is_slower(bits: int, weight: torch.Tensor, scales, zeros, group: int) -> bool:
    """Whether the path prefill took before the GEMM (dequantize + F.linear, or int4's row kernel)
    beats it on this weight shape here, measured once on GEMM_MIN_ROWS * 8 rows (choice.py)."""
    in_features = weight.shape[1] * (1 if bits == 8 else 2)

    def contenders():
        x = torch.randn(GEMM_MIN_ROWS * 8, in_features).bfloat16()
        if bits == 8:
            before = lambda: reference_int8_linear(x, weight, scales)  # noqa: E731
        else:
            before = lambda: _int4_rows(x, weight, scales, zeros, group)  # noqa: E731
        return (lambda: gemm(x, bits, weight, scales, zeros, group)), before

    op = "gemm-int8" if bits == 8 else f"gemm-int4-g{group}"
    return choice.prefers_torch(op, weight.shape[0], in_features, library().choice_key, contenders)


def mxfp4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ W.T in x's dtype for MXFP4 weights (packed [out, in/2], E8M0 scales [out, in/32]): the
    Triton kernel on CUDA, the C kernel for few rows on the CPU (x quantized to int8 per block of 32:
    reference_mxfp4_q8_linear), else dequantize + F.linear."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    if x.is_cuda and triton_quant.available():
        return triton_quant.mxfp4_linear(x, packed, scales, bias)
    if not _kernel_applies(x, packed, scales, max_rows=MXFP4_MAX_ROWS) or in_features % mxfp4.BLOCK:
        return reference_mxfp4_linear(x, packed, scales, bias)
    flat = x.reshape(-1, in_features).float().contiguous()
    out = torch.empty(flat.shape[0], out_features, dtype=torch.float32)
    bias = _float32(bias)
    if not library().linear_mxfp4(
        flat.data_ptr(), packed.data_ptr(), scales.data_ptr(), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), flat.shape[0], out_features, in_features,
    ):
        return reference_mxfp4_linear(x, packed, scales, bias)
    return out.view(*x.shape[:-1], out_features).to(x.dtype)


def moe_supports(x: torch.Tensor, *stacks: torch.Tensor) -> bool:
    return _kernel_applies(x, *stacks)


def moe_pairs(
    x: torch.Tensor,
    kind: str,
    group_size: int,
    gate_up: tuple,
    down: tuple,
    pair_experts: torch.Tensor,
    pair_tokens: torch.Tensor,
    pair_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts on quantized stacks, one call per layer: out[token] += weight *
    down_e(silu(gate_e(x)) * up_e(x)) for each (expert, token, weight) assignment sorted by expert.
    `kind` is the stacks' layout: "int8" with (qweight, scales), "int4" with (packed, scales, zeros)
    in groups of `group_size`, "mxfp4" with (packed, E8M0 scales); each with a leading expert
    dimension: gate_up rows [E, 2I, ...], down rows [E, H, ...]. Returns float32 [M, H]. Callers
    check `moe_supports` first."""
    tokens, hidden = x.shape
    inter = down[0].shape[2] * (1 if kind == "int8" else 2)
    x = x.float().contiguous()
    threads = torch.get_num_threads()
    out = torch.empty(tokens, hidden, dtype=torch.float32)
    partial = torch.empty(threads, tokens, hidden, dtype=torch.float32)
    scratch = torch.empty(threads, 3 * hidden + 5 * inter, dtype=torch.float32)
    if kind == "mxfp4":  # E8M0 bytes as they are
        gate_up_scales, down_scales = gate_up[1].contiguous(), down[1].contiguous()
    else:
        gate_up_scales, down_scales = _float32(gate_up[1]), _float32(down[1])
    gate_up_zeros = _float32(gate_up[2]) if kind == "int4" else None
    down_zeros = _float32(down[2]) if kind == "int4" else None
    experts, token_ids = pair_experts.contiguous(), pair_tokens.contiguous()
    weights = pair_weights.float().contiguous()
    library().moe_quant(
        MOE_FORMATS[kind], x.data_ptr(), gate_up[0].data_ptr(), gate_up_scales.data_ptr(),
        cpu._address(gate_up_zeros), down[0].data_ptr(), down_scales.data_ptr(), cpu._address(down_zeros),
        experts.data_ptr(), token_ids.data_ptr(),
        weights.data_ptr(), experts.numel(), tokens, out.data_ptr(), partial.data_ptr(), scratch.data_ptr(),
        hidden, inter, group_size,
    )
    return out


def route_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.is_contiguous() and library() is not None)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid router of a MoE layer (config.MoESpec `spec`) for tokens x [M, H]: (experts
    int64 [M, k], weights float32 [M, k]), as Router's torch ops compute them. Callers check
    `route_supports` first."""
    tokens = x.float().contiguous()
    experts = torch.empty(tokens.shape[0], spec.experts_per_token, dtype=torch.int64)
    weights = torch.empty(tokens.shape[0], spec.experts_per_token, dtype=torch.float32)
    library().moe_route(tokens.data_ptr(), weight.data_ptr(), None if bias is None else _float32(bias).data_ptr(),
                        tokens.shape[0], tokens.shape[1], spec.num_experts, spec.experts_per_token, spec.n_group,
                        spec.topk_group, int(spec.norm_topk_prob), spec.routed_scaling_factor, experts.data_ptr(),
                        weights.data_ptr())
    return experts, weights


class RoutedExperts:
    """A MoE layer's routing and routed experts (bfloat16 stacks, or packed int8/int4/MXFP4 ones) for
    a bfloat16 decode or verify step in one call, added to the layer's output in place (moe_routed):
    the same bits as `route` then the experts' kernel in MoE's order (cpu.moe_pairs or moe_pairs),
    rounded to bfloat16 and added. The operands are gathered once."""

    def __init__(self, router_weight, router_bias, spec, kind: str, group_size: int, gate_up: tuple, down: tuple):
        self.spec, self.format, self.group_size = spec, ROUTED_FORMATS[kind], group_size
        self.inter = down[0].shape[2] * (2 if kind in ("int4", "mxfp4") else 1)
        bias = None if router_bias is None else _float32(router_bias)
        if kind == "bf16":
            scales = zeros = (None, None)
        elif kind == "mxfp4":  # E8M0 bytes as they are
            scales, zeros = (gate_up[1].contiguous(), down[1].contiguous()), (None, None)
        else:
            scales = _float32(gate_up[1]), _float32(down[1])
            zeros = (_float32(gate_up[2]), _float32(down[2])) if kind == "int4" else (None, None)
        self._tensors = (router_weight, bias, gate_up[0], down[0], *scales, *zeros)  # kept alive
        self._operands = (cpu._address(router_weight), cpu._address(bias))
        self._stacks = (gate_up[0].data_ptr(), cpu._address(scales[0]), cpu._address(zeros[0]), down[0].data_ptr(),
                        cpu._address(scales[1]), cpu._address(zeros[1]))

    def add_to(self, h: torch.Tensor, normed: torch.Tensor, counts: torch.Tensor | None = None) -> bool:
        """h [.., M, H] bfloat16 += the experts' output for normed (both contiguous), and `counts` [E]
        (router statistics, if given) += how often each expert was chosen; False where the kernel
        could not allocate its buffers (nothing changed)."""
        spec, hidden = self.spec, h.shape[-1]
        rows = h.numel() // hidden
        if rows > INT8_MAX_ROWS:  # MoE's other path for these (other sums)
            return False
        chosen = None if counts is None else torch.empty(rows * spec.experts_per_token, dtype=torch.int64)
        done = library().moe_routed(
            self.format, h.data_ptr(), normed.data_ptr(), rows, *self._operands, spec.num_experts,
            spec.experts_per_token, spec.n_group, spec.topk_group, int(spec.norm_topk_prob),
            spec.routed_scaling_factor, *self._stacks, hidden, self.inter, self.group_size,
            None if chosen is None else chosen.data_ptr())
        if done and counts is not None:
            counts += torch.bincount(chosen, minlength=spec.num_experts)
        return bool(done)


def reference_moe_pairs(x, kind, group_size, gate_up, down, pair_experts, pair_tokens, pair_weights,
                        q8_activations: bool = False):
    """moe_pairs in torch, each expert dequantized; with `q8_activations` (MXFP4 only) each matmul
    is the kernels' int8-activation arithmetic (reference_mxfp4_q8_linear) instead."""
    if q8_activations:
        def linear(inputs, stack, expert):
            return reference_mxfp4_q8_linear(inputs[None], stack[0][expert], stack[1][expert])[0]
    else:
        def linear(inputs, stack, expert):
            return F.linear(inputs, weight(stack, expert))

    def weight(stack, expert):
        if kind == "int8":
            return dequantize_int8(stack[0][expert], stack[1][expert])
        if kind == "mxfp4":
            return mxfp4.dequantize(stack[0][expert], stack[1][expert])
        return dequantize_int4(stack[0][expert], stack[1][expert], stack[2][expert], group_size)

    out = torch.zeros(x.shape, dtype=torch.float32)
    for expert, token, w in zip(pair_experts.tolist(), pair_tokens.tolist(), pair_weights.tolist()):
        gate, up = linear(x[token].float(), gate_up, expert).chunk(2)
        out[token] += w * linear(F.silu(gate) * up, down, expert)
    return out
