"""Integer weight quantization shared by every integer scheme: GPTQ's conventions for scales and
zero points (so the result packs into the GPTQ layout unchanged), and round-to-nearest."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IntWeight:
    """Integer codes with group-wise affine dequantization: W[o, i] = (q[o, i] - zeros[o, g]) * scales[o, g]
    with g = g_idx[i]. Zero points are integers (stored as float32)."""

    q: torch.Tensor  # uint8 [out, in], 0 .. 2**bits - 1
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # float32 [out, groups]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1: one group

    def dequantize(self) -> torch.Tensor:
        index = self.g_idx.long()
        return (self.q.float() - self.zeros[:, index]) * self.scales[:, index]


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [out, n] (GPTQ's min/max rule, range widened to hold 0)."""
    maxq = 2**bits - 1
    low = w.min(dim=1).values.clamp(max=0)
    high = w.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = -high
    empty = (low == 0) & (high == 0)
    low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
    scale = (high - low) / maxq
    # Asymmetric zero points are kept >= 1: the GPTQ v1 layout stores zero - 1, and readers that
    # do not mask would see 16 for a stored -1.
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-low / scale).clamp(1, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `w` [out, n] (or [out]) for per-row scale/zero [out]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def sequential_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> IntWeight:
    w = weight.float()
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    grouped = w.reshape(out_features, in_features // size, size)
    flat = grouped.permute(1, 0, 2).reshape(-1, size)  # [groups * out, size]
    scale, zero = group_params(flat, bits, sym)
    codes = quantize_codes(flat, scale, zero, bits)
    groups = in_features // size
    q = codes.view(groups, out_features, size).permute(1, 0, 2).reshape(out_features, in_features)
    return IntWeight(
        q=q.to(torch.uint8),
        scales=scale.view(groups, out_features).t().contiguous(),
        zeros=zero.view(groups, out_features).t().contiguous(),
        g_idx=sequential_g_idx(in_features, group_size),
        bits=bits,
        group_size=group_size,
    )
