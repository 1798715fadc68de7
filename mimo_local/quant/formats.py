"""The standard on-disk layouts, and their conversion to the runtime layouts of mimo_local/kernels/quant.py.

GPTQ (AutoGPTQ / GPTQModel "gptq" v1 checkpoint format, read by transformers, vLLM and SGLang), per
linear `<name>`:
  qweight int32 [in * bits / 32, out]  codes packed along the INPUT dim, lowest bits first
  qzeros  int32 [groups, out * bits / 32]  zero points minus one, packed along the OUTPUT dim
  scales  fp16  [groups, out]
  g_idx   int32 [in]  group of each input column (not monotone with act-order)
  W[o, i] = scales[g, o] * (code[i, o] - (qzeros[g, o] + 1)),  g = g_idx[i]

bitsandbytes, as transformers serializes Linear4bit / Linear8bitLt:
  nf4:      weight uint8 [out * in / 2, 1] + weight.absmax / quant_map / nested_* /
            weight.quant_state.bitsandbytes__nf4 (QuantState.as_dict(packed=True))
  bnb-int8: weight int8 [out, in], SCB float32 [out] (row absmax), weight_format uint8 0;
            W = weight * SCB / 127
"""

from __future__ import annotations

import torch

from ..errors import MimoError
from . import bnb
from ..kernels.quant import int8_codes
from .rtn import IntWeight

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] codes -> int32 [n * bits / 32, m], value r at bits (r % per_word) * bits of word r // per_word."""
    per_word = 32 // bits
    n, m = values.shape
    words = values.to(torch.int64).view(n // per_word, per_word, m)
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits)[None, :, None]
    packed = (words << shifts).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n * bits / 32, m] -> uint8 codes [n, m]. One shift at a time in int32, so the memory
    beyond the result is a quarter of it (a 150k-row lm_head would take 8 bytes a weight in int64)."""
    per_word = 32 // bits
    words, m = packed.shape
    values = torch.empty(words, per_word, m, dtype=torch.uint8)
    for slot in range(per_word):  # arithmetic shifts of negative words: the mask drops the sign bits
        values[:, slot] = (packed >> (slot * bits)) & (2**bits - 1)
    return values.view(words * per_word, m)


def _unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n * bits / 32, m] -> uint8 codes [m, n]: `_unpack_rows` transposed, written in place (a
    large weight's loading transient is one shifted word plane, not a second copy of the codes)."""
    per_word = 32 // bits
    words, m = packed.shape
    values = torch.empty(m, words, per_word, dtype=torch.uint8)
    for slot in range(per_word):
        values[:, :, slot] = ((packed >> (slot * bits)) & (2**bits - 1)).t()
    return values.view(m, words * per_word)


def to_gptq(weight: IntWeight) -> dict[str, torch.Tensor]:
    """The four GPTQ tensors (suffix -> tensor) of one linear."""
    return {
        "qweight": _pack_rows(weight.q.t(), weight.bits),
        "qzeros": _pack_rows((weight.zeros - 1).to(torch.int64), weight.bits).t().contiguous(),
        "scales": weight.scales.t().to(torch.float16).contiguous(),
        "g_idx": weight.g_idx.to(torch.int32),
    }


def from_gptq(tensors: dict[str, torch.Tensor], bits: int, name: str) -> IntWeight:
    """One linear's GPTQ tensors (suffix -> tensor) back to integer codes."""
    if bits not in (4, 8):
        raise MimoError(f"'{name}': GPTQ with {bits} bits is not supported (4 or 8)")
    mask = 2**bits - 1
    q = _unpack_columns(tensors["qweight"], bits)  # [out, in]
    in_features = q.shape[1]
    zeros = ((_unpack_rows(tensors["qzeros"].t().contiguous(), bits) + 1) & mask)[: q.shape[0]]
    scales = tensors["scales"].float().t()
    groups = scales.shape[1]
    g_idx = tensors.get("g_idx")
    if g_idx is None:  # the oldest checkpoints: sequential groups
        g_idx = torch.arange(in_features) // (in_features // groups)
    if g_idx.shape != (in_features,) or int(g_idx.max()) >= groups or int(g_idx.min()) < 0:
        raise MimoError(f"'{name}': g_idx does not match {in_features} inputs in {groups} groups")
    return IntWeight(
        q=q,
        scales=scales.contiguous(),
        zeros=zeros.float().contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=-1 if groups == 1 else in_features // groups,
    )


def int8_runtime(weight: IntWeight, name: str) -> dict[str, torch.Tensor]:
    """8-bit codes -> runtime int8 (per output channel, symmetric): exact when there is one group with
    zero point 128, the only 8-bit GPTQ form the runtime holds."""
    if weight.scales.shape[1] != 1 or not bool((weight.zeros == 128).all()):
        raise MimoError(f"'{name}': 8-bit GPTQ is supported per output channel, symmetric only")
    # code - 128 in int8 is the code with its top bit flipped, read as two's complement
    return {"qweight": weight.q.bitwise_xor_(0x80).view(torch.int8), "scales": weight.scales[:, 0].contiguous()}


def int4_runtime(weight: IntWeight, name: str) -> dict[str, torch.Tensor]:
    """4-bit codes -> runtime int4 (packed, contiguous groups). Act-order g_idx becomes an input
    permutation that sorts columns by group (x is permuted the same way at run time)."""
    from ..kernels.quant import pack_int4

    out_features, in_features = weight.q.shape
    groups = weight.scales.shape[1]
    size = in_features // groups
    if size * groups != in_features or size % 2:
        raise MimoError(f"'{name}': {in_features} inputs do not split into {groups} even groups")
    q, perm = weight.q, None
    if not torch.equal(weight.g_idx.long(), torch.arange(in_features) // size):
        perm = torch.argsort(weight.g_idx.long(), stable=True)
        if not torch.equal(torch.bincount(weight.g_idx.long(), minlength=groups), torch.full((groups,), size)):
            raise MimoError(f"'{name}': act-order groups of unequal size are not supported")
        q = q[:, perm]
    runtime = {"packed": pack_int4(q), "scales": weight.scales.float(), "zeros": weight.zeros.float(), "group_size": size}
    if perm is not None:
        runtime["perm"] = perm
    return runtime


def nf4_tensors(weight: torch.Tensor, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 with double quant, exactly what transformers saves for a Linear4bit
    (suffix -> tensor, suffixes relative to the module: 'weight', 'weight.absmax', ...)."""
    bnbf = bnb.functional()

    packed, state = bnbf.quantize_4bit(
        weight.to(torch.bfloat16).contiguous(), blocksize=blocksize, compress_statistics=True, quant_type="nf4"
    )
    tensors = {"weight": packed}
    tensors.update({"weight." + key: value for key, value in state.as_dict(packed=True).items()})
    return tensors


def nf4_runtime(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Saved NF4 tensors -> packed codes [out, in / 2] (first input in the high nibble, as bitsandbytes
    packs), float32 absmax [out, in / blocksize] (double quant undone) and the 16-value code book."""
    bnbf = bnb.functional()

    state_items = {key[len("weight.") :]: value for key, value in tensors.items() if key.startswith("weight.")}
    try:
        state = bnbf.QuantState.from_dict(state_items, device=torch.device("cpu"))
    except (ValueError, KeyError, AssertionError) as error:
        raise MimoError(f"'{name}': unreadable bitsandbytes 4-bit state ({error})") from None
    if state.quant_type != "nf4":
        raise MimoError(f"'{name}': bitsandbytes quant_type '{state.quant_type}' is not supported (nf4)")
    out_features, in_features = state.shape
    if in_features % state.blocksize:
        raise MimoError(f"'{name}': nf4 blocks of {state.blocksize} span rows of {in_features} inputs")
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return {
        "packed": tensors["weight"].reshape(out_features, in_features // 2).contiguous(),
        "absmax": absmax.float().reshape(out_features, in_features // state.blocksize).contiguous(),
        "code": state.code.float().contiguous(),
    }


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype=torch.float32):
    """[out, in] weights from packed NF4 bytes: one lookup per byte in a 256-entry table of value
    pairs (high nibble first), so the transient memory is a few bytes per weight, not an int64
    index per weight (this runs in every CPU forward of an nf4 layer)."""
    out_features, blocks = packed.shape[0], absmax.shape[1]
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=-1)  # byte b -> (code[b >> 4], code[b & 15])
    values = pairs[packed.int()].view(out_features, blocks, -1).mul_(absmax[..., None])
    return values.reshape(out_features, -1).to(dtype)


def bnb_int8_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM.int8 weights as transformers saves a Linear8bitLt: int8 rows scaled by 127 / row absmax."""
    codes, absmax = int8_codes(weight.float())
    return {"weight": codes, "SCB": absmax, "weight_format": torch.tensor(0, dtype=torch.uint8)}


def bnb_int8_runtime(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"qweight": tensors["weight"].to(torch.int8), "scales": tensors["SCB"].float() / 127.0}
