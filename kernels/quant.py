"""Matmuls on packed int8 / int4 weights: the runtime layout every quantized format is loaded into.

Layouts (row = output channel, so a decode GEMV streams each row once):
- int8, per output channel, symmetric: `qweight` int8 [out, in], `scales` float32 [out];
  W = qweight * scales[:, None].
- int4, groups of `group_size` inputs, asymmetric: `packed` uint8 [out, in // 2] (input 2j in the low
  nibble, 2j+1 in the high nibble), `scales` and `zeros` float32 [out, in // group_size];
  W[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]. Symmetric int4 (GPTQ sym) has zeros = 8.

Each op has a pure-torch reference (`reference_*`); faster kernels plug in behind the same call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def reference_int8_linear(x, qweight, scales, bias=None):
    return F.linear(x, dequantize_int8(qweight, scales, x.dtype), bias)


def reference_int4_linear(x, packed, scales, zeros, group_size: int, bias=None):
    return F.linear(x, dequantize_int4(packed, scales, zeros, group_size, x.dtype), bias)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    return reference_int8_linear(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bias=None
) -> torch.Tensor:
    return reference_int4_linear(x, packed, scales, zeros, group_size, bias)
