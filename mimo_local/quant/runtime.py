"""One hub linear weight in its runtime layout, from whatever holds it: a GPTQ-layout or bitsandbytes
checkpoint (ours or anyone's), or a float weight quantized now by a recipe scheme."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..errors import MimoError
from . import formats, mxfp4
from .recipes import Scheme
from .rtn import IntWeight, quantize_rtn


@dataclass
class RuntimeWeight:
    kind: str  # int8 | int4 | nf4 | mxfp4
    tensors: dict  # runtime name -> tensor ([out, ...] each), see linear.LAYOUTS
    group_size: int = 0
    blocksize: int = 64
    code: torch.Tensor | None = None  # nf4 code book
    perm: torch.Tensor | None = None  # int4 act-order input permutation


def from_int_weight(weight: IntWeight, name: str) -> RuntimeWeight:
    if weight.bits == 8:
        return RuntimeWeight("int8", formats.int8_runtime(weight, name))
    runtime = formats.int4_runtime(weight, name)
    group_size, perm = runtime.pop("group_size"), runtime.pop("perm", None)
    return RuntimeWeight("int4", runtime, group_size=group_size, perm=perm)


def from_nf4(tensors: dict, name: str) -> RuntimeWeight:
    runtime = formats.nf4_runtime(tensors, name)
    code = runtime.pop("code")
    blocksize = runtime["packed"].shape[1] * 2 // runtime["absmax"].shape[1]
    return RuntimeWeight("nf4", runtime, blocksize=blocksize, code=code)


def stored_format(checkpoint: Checkpoint, base: str) -> str | None:
    """How the checkpoint stores linear `base` (hub name without '.weight'): gptq, nf4, bnb-int8, mxfp4
    or None."""
    if base + ".weight_scale" in checkpoint:  # MXFP4 (FP8 weights have weight_scale_inv)
        return "mxfp4"
    if base + ".qweight" in checkpoint:
        return "gptq"
    if base + ".weight.quant_state.bitsandbytes__nf4" in checkpoint:
        return "nf4"
    if base + ".SCB" in checkpoint:
        return "bnb-int8"
    return None


STORED_SUFFIXES = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "nf4": ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"),
    "bnb-int8": ("weight", "SCB"),
    "mxfp4": ("weight", "weight_scale"),
}


def stored_tensors(checkpoint: Checkpoint, base: str) -> dict[str, torch.Tensor]:
    suffixes = STORED_SUFFIXES[stored_format(checkpoint, base)]
    return {s: checkpoint.read(f"{base}.{s}") for s in suffixes if f"{base}.{s}" in checkpoint}


def from_checkpoint(checkpoint: Checkpoint, base: str, tensors: dict | None = None) -> RuntimeWeight:
    kind = stored_format(checkpoint, base)
    tensors = tensors if tensors is not None else stored_tensors(checkpoint, base)
    if kind == "gptq":
        qweight, g_idx = tensors["qweight"], tensors.get("g_idx")
        in_features = g_idx.numel() if g_idx is not None else None
        bits = 32 * qweight.shape[0] // in_features if in_features else 4
        return from_int_weight(formats.from_gptq(tensors, bits, base), base)
    if kind == "nf4":
        return from_nf4(tensors, base)
    if kind == "bnb-int8":
        return RuntimeWeight("int8", formats.bnb_int8_runtime(tensors))
    if kind == "mxfp4":
        packed, scales = tensors["weight"], tensors["weight_scale"]
        blocks = packed.shape[-1] * 2 // mxfp4.BLOCK
        if packed.dtype != torch.uint8 or scales.dtype != torch.uint8 or packed.dim() != 2 or \
                scales.shape != (packed.shape[0], blocks) or packed.shape[1] * 2 % mxfp4.BLOCK:
            raise MimoError(f"'{base}': MXFP4 weight {packed.dtype} {list(packed.shape)} with scales {scales.dtype} "
                            f"{list(scales.shape)} is not uint8 [out, in/2] with uint8 [out, in/{mxfp4.BLOCK}]")
        return RuntimeWeight("mxfp4", {"packed": packed, "scales": scales}, blocksize=mxfp4.BLOCK)
    raise MimoError(f"'{base}' is not stored quantized")


def serialize(weight: torch.Tensor, scheme: Scheme, hessian=None, name: str = "") -> dict[str, torch.Tensor]:
    """The tensors (suffix -> tensor) of one linear in the standard layout of `scheme`; `hessian` makes
    a gptq scheme calibrated (without one it is round-to-nearest)."""
    if scheme.name == "nf4":
        return formats.nf4_tensors(weight, scheme.blocksize)
    if scheme.name == "bnb-int8":
        return formats.bnb_int8_tensors(weight)
    return formats.to_gptq(int_weight(weight, scheme, hessian))


def int_weight(weight: torch.Tensor, scheme: Scheme, hessian=None) -> IntWeight:
    if scheme.calibrated and hessian is not None:
        from .gptq import gptq_quantize

        return gptq_quantize(weight, hessian, scheme.bits, scheme.group_size, scheme.sym, scheme.act_order,
                             scheme.damp)
    return quantize_rtn(weight, scheme.bits, scheme.group_size, scheme.sym)


def from_weight(weight: torch.Tensor, scheme: Scheme, name: str) -> RuntimeWeight:
    """Quantize a float weight in memory (`mimo run --quant`) straight into the runtime layout,
    through the same tensors a file would hold."""
    if scheme.calibrated:
        raise MimoError("scheme 'gptq' needs calibration: run `mimo quantize` and load its output")
    if scheme.name == "nf4":
        return from_nf4(formats.nf4_tensors(weight, scheme.blocksize), name)
    if scheme.name == "bnb-int8":
        return RuntimeWeight("int8", formats.bnb_int8_runtime(formats.bnb_int8_tensors(weight)))
    return from_int_weight(int_weight(weight, scheme), name)
