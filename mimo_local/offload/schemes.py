"""Which scheme each weight of a model gets, and the bytes it then takes in memory: a recipe
(--quant) on a float or FP8 checkpoint, or what a quantized checkpoint already holds. Bytes come
from the runtime layouts QuantLinear allocates (quant.linear.layout_shapes), not from the file."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MimoError
from ..quant.linear import layout_nbytes
from ..quant.recipes import Scheme, load_recipe
from ..quant.stored import StoredQuantization, describe, stored_method

if TYPE_CHECKING:
    from .inventory import ModelSource


@functools.lru_cache(maxsize=4096)  # a MoE model has thousands of experts of a few shapes
def runtime_bytes(scheme: Scheme, shape: tuple[int, ...], native_itemsize: int) -> int:
    """In-memory bytes of one linear weight [out, in] under `scheme` (its own dtype when kept)."""
    kind = scheme.runtime_kind
    if kind is None or len(shape) != 2:
        return math.prod(shape) * native_itemsize
    out_features, in_features = shape
    if scheme.name == MXFP4:  # two e2m1 values a byte, one E8M0 scale byte per block: 4.25 bits at 32
        return out_features * (in_features // 2 + -(-in_features // scheme.blocksize))
    if kind == "int4":
        group = in_features if scheme.group_size == -1 else scheme.group_size
        return layout_nbytes(kind, in_features, out_features, group_size=group, permuted=scheme.act_order)
    if kind == "nf4":
        return layout_nbytes(kind, in_features, out_features, blocksize=scheme.blocksize)
    return layout_nbytes(kind, in_features, out_features)


MXFP4 = "mxfp4"
EXPERT_WEIGHT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


@dataclass(frozen=True)
class Mxfp4Experts:
    """An FP8 checkpoint whose routed experts are stored as MXFP4 (MiMo-V2.6: store_dtype "mxfp4"):
    the experts are held as they are (no float expansion), every other FP8 weight is dequantized."""

    block_size: int

    @property
    def name(self) -> str:
        return f"fp8 (dequantized on load) + {MXFP4} experts ({4 + 8 / self.block_size:g} bits)"

    def plan(self, shapes: dict[str, tuple], quantizable: set[str]) -> dict[str, Scheme]:
        scheme = Scheme(MXFP4, bits=4, blocksize=self.block_size)
        return {name: scheme for name in quantizable if EXPERT_WEIGHT.match(name)}


def weight_quantization(model: "ModelSource", quant: str | None):
    """What `plan` of the inventory asks: the recipe of --quant, the stored quantization of a
    quantized checkpoint, or None (float weights; FP8 ones are dequantized on load)."""
    stored = stored_method(model.raw)
    mxfp4 = model.config.mxfp4_block_size
    if quant and (stored or mxfp4):
        held = describe(model.raw) if stored else f"{MXFP4} experts"
        raise MimoError(f"{model.path.name} is already quantized ({held}): "
                        f"load it without --quant (--quant quantizes a float or FP8 checkpoint while loading)")
    if quant:
        return load_recipe(quant)
    if stored:
        return StoredQuantization(model.raw, model.entries, str(model.path))
    if mxfp4:
        return Mxfp4Experts(mxfp4)
    return None
