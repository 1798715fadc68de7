"""Bytes a weight takes in memory under a quantization recipe (mimo_local.quant recipes: ordered
regex -> scheme rules over hub tensor names), in the runtime layouts QuantLinear holds:
int8 [out, in] + float32 scale per row; int4 packed [out, in/2] + float32 scale and zero per group
(+ an int64 input permutation with act-order); nf4 packed [out, in/2] + float32 absmax per block."""

from __future__ import annotations

import math

from ..quant.recipes import Recipe, Scheme, load_recipe

__all__ = ["Recipe", "load_recipe", "runtime_bytes"]
SCALE = 4  # float32


def runtime_bytes(scheme: Scheme, shape: tuple[int, ...], native_itemsize: int) -> int:
    """In-memory bytes of one linear weight [out, in] under `scheme` (its own dtype when kept)."""
    if not scheme.quantized or len(shape) != 2:
        return math.prod(shape) * native_itemsize
    out_features, in_features = shape
    if scheme.name == "nf4":
        return out_features * in_features // 2 + out_features * math.ceil(in_features / scheme.blocksize) * SCALE
    if scheme.bits == 8:
        return out_features * in_features + out_features * SCALE
    groups = scheme.groups(in_features)
    perm = in_features * 8 if scheme.act_order else 0
    return out_features * math.ceil(in_features / 2) + 2 * out_features * groups * SCALE + perm
