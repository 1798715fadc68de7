"""MXFP4 (OCP Microscaling FP4), as MiMo-V2.6 stores its routed experts: `weight` uint8 [out, in/2]
holds two e2m1 values a byte (element 2i in the low nibble, 2i+1 in the high one, as in the OCP
spec and the compressed-tensors / gpt-oss checkpoints llama.cpp repacks), `weight_scale` uint8
[out, in/32] one E8M0 scale per 32 inputs (2^(s - 127); 255 is NaN).

The experts stay in this form in memory (4.25 bits a weight); a forward dequantizes only the
expert it runs (`dequantize`, a lookup of both nibbles of a byte at once).
"""

from __future__ import annotations

import torch

BLOCK = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# byte b -> (value of its low nibble, value of its high nibble)
PAIRS = torch.tensor([(E2M1[b & 15], E2M1[b >> 4]) for b in range(256)], dtype=torch.float32)


def is_mxfp4(weight_dtype: torch.dtype, has_scale: bool) -> bool:
    """How a checkpoint marks an MXFP4 weight: uint8 bytes beside a `weight_scale` (FP8 weights have
    `weight_scale_inv`)."""
    return weight_dtype == torch.uint8 and has_scale


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes as float32 powers of two (NaN for 255)."""
    exponent = scales.to(torch.int32) - 127
    values = torch.ldexp(torch.ones(exponent.shape), exponent)
    return values.masked_fill_(scales == 255, float("nan"))


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in] weights from packed [..., out, in/2] bytes and [..., out, in/32] E8M0 scales."""
    lead = packed.shape[:-1]
    blocks = scales.shape[-1]
    values = PAIRS.to(packed.device)[packed.int()].view(*lead, blocks, BLOCK)
    values.mul_(scale_values(scales).to(packed.device)[..., None])
    return values.reshape(*lead, blocks * BLOCK).to(dtype)


def reference_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same from the bit fields, element by element in float64, for tests: e2m1 is sign, a
    2-bit exponent (bias 1; 0 is subnormal) and one mantissa bit."""
    out = []
    for row_bytes, row_scales in zip(packed.reshape(-1, packed.shape[-1]).tolist(),
                                     scales.reshape(-1, scales.shape[-1]).tolist()):
        nibbles = [n for byte in row_bytes for n in (byte & 15, byte >> 4)]
        row = []
        for i, nibble in enumerate(nibbles):
            sign = -1.0 if nibble & 8 else 1.0
            exponent, mantissa = (nibble >> 1) & 3, nibble & 1
            magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
            scale = row_scales[i // BLOCK]
            row.append(float("nan") if scale == 255 else sign * magnitude * 2.0 ** (scale - 127))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).to(torch.float32).view(*packed.shape[:-1], -1)
