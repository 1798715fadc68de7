"""Quantized linear layers in the runtime layouts of mimo_local/kernels/quant.py.

Each module holds one fused projection ([out, in]) or a stack of experts ([E, out, in]; `linear(x, e)`
runs expert e), so fused q|k|v and gate|up parts and stacked experts are filled by the same
(expert, row-slice) index the float loader uses. Buffers only: the loader's float path never sees them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import quant as quant_kernels
from . import bnb, mxfp4
from .formats import dequantize_nf4

# runtime tensor name -> (dtype, shape from (out, in, groups, blocks)) for each kind
LAYOUTS = {
    "int8": {"qweight": (torch.int8, "out,in"), "scales": (torch.float32, "out")},
    "int4": {"packed": (torch.uint8, "out,in/2"), "scales": (torch.float32, "out,groups"),
             "zeros": (torch.float32, "out,groups"), "perm": (torch.int64, "in")},
    "nf4": {"packed": (torch.uint8, "out,in/2"), "absmax": (torch.float32, "out,blocks")},
    "mxfp4": {"packed": (torch.uint8, "out,in/2"), "scales": (torch.uint8, "out,blocks")},  # as stored (mxfp4.py)
}


def layout_shapes(kind: str, in_features: int, out_features: int, group_size: int = 0, blocksize: int = 64,
                  permuted: bool = False) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Runtime tensor name -> (dtype, shape) of one projection in layout `kind`: what QuantLinear
    allocates and what the memory planner counts."""
    dims = {"out": out_features, "in": in_features, "in/2": in_features // 2,
            "groups": in_features // group_size if group_size > 0 else 1, "blocks": in_features // blocksize}
    shapes = {name: (dtype, tuple(dims[d] for d in shape.split(",")))
              for name, (dtype, shape) in LAYOUTS[kind].items() if name != "perm" or permuted}
    if kind == "nf4":
        shapes["code"] = (torch.float32, (16,))
    return shapes


def layout_nbytes(kind: str, in_features: int, out_features: int, **layout) -> int:
    """Bytes of one projection in runtime layout `kind` (see layout_shapes)."""
    return sum(dtype.itemsize * math.prod(shape)
               for dtype, shape in layout_shapes(kind, in_features, out_features, **layout).values())


class QuantLinear(nn.Module):
    """A linear layer (or a stack of `experts`) with weights in one quantized runtime layout."""

    def __init__(self, kind: str, in_features: int, out_features: int, *, experts: int | None = None,
                 group_size: int = 0, blocksize: int = 64, permuted: bool = False, bias_dtype=None, device=None):
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, out_features
        self.experts, self.group_size, self.blocksize = experts, group_size, blocksize
        lead = (experts,) if experts else ()
        if not permuted:
            self.perm = None
        for name, (dtype, size) in layout_shapes(kind, in_features, out_features, group_size, blocksize, permuted).items():
            self.register_buffer(name, torch.zeros((lead if name != "code" else ()) + size, dtype=dtype, device=device))
        if kind == "nf4":
            self._bnb_state = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias_dtype else None

    def extra_repr(self) -> str:
        stack = f"experts={self.experts}, " if self.experts else ""
        return f"{self.kind}, {stack}in={self.in_features}, out={self.out_features}"

    @property
    def device(self) -> torch.device:
        return self.scales.device if self.kind != "nf4" else self.absmax.device

    def forward(self, x: torch.Tensor, float32_out: bool = False) -> torch.Tensor:
        out = self.linear(x, None)
        return out.float() if float32_out else out

    def fused_projection(self):
        """This projection for the fused quantized decoder layer (mimo_local/kernels/quant.py), or None where
        that kernel cannot take it (nf4/bitsandbytes, stacks, act-order permutations)."""
        if self.experts is not None or getattr(self, "perm", None) is not None or hasattr(self, "_hf_hook"):
            return None
        if self.kind == "int8":
            return quant_kernels.projection(8, self.qweight, self.scales, bias=self.bias)
        if self.kind == "int4":
            return quant_kernels.projection(4, self.packed, self.scales, self.zeros, self.group_size, self.bias)
        return None

    def linear(self, x: torch.Tensor, index: int | None) -> torch.Tensor:
        def pick(tensor):
            return tensor if index is None or tensor is None else tensor[index]

        if self.kind == "int8":
            return quant_kernels.int8_linear(x, pick(self.qweight), pick(self.scales), self.bias)
        if self.kind == "int4":
            if self.perm is not None:
                x = x[..., pick(self.perm)]
            return quant_kernels.int4_linear(x, pick(self.packed), pick(self.scales), pick(self.zeros),
                                             self.group_size, self.bias)
        if self.kind == "mxfp4":
            return quant_kernels.mxfp4_linear(x, pick(self.packed), pick(self.scales), self.bias)
        if x.is_cuda:
            return self._bnb_nf4(x, index)
        weight = dequantize_nf4(pick(self.packed), pick(self.absmax), self.code, x.dtype)
        return F.linear(x, weight, self.bias)

    def first_rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The first `rows` outputs only (a draft vocabulary): reads only their weights."""
        bias = None if self.bias is None else self.bias[:rows]
        if self.kind == "int8":
            return quant_kernels.int8_linear(x, self.qweight[:rows], self.scales[:rows], bias)
        if self.kind == "int4":
            x = x if self.perm is None else x[..., self.perm]
            return quant_kernels.int4_linear(x, self.packed[:rows], self.scales[:rows], self.zeros[:rows],
                                             self.group_size, bias)
        return self.forward(x)[..., :rows]

    def _bnb_nf4(self, x: torch.Tensor, index: int | None) -> torch.Tensor:
        """bitsandbytes' fused 4-bit matmul on CUDA (its CPU path is far slower than dequantizing)."""
        bnbf = bnb.functional()

        key = (index, x.dtype)
        if self._bnb_state is None or self._bnb_state[0] != key:
            absmax = self.absmax if index is None else self.absmax[index]
            state = bnbf.QuantState(absmax=absmax.reshape(-1).contiguous(), shape=torch.Size([self.out_features, self.in_features]),
                                    code=self.code, blocksize=self.blocksize, quant_type="nf4", dtype=x.dtype)
            self._bnb_state = (key, state)
        packed = self.packed if index is None else self.packed[index]
        return bnb.matmul_4bit(x, packed.reshape(-1, 1).t(), quant_state=self._bnb_state[1], bias=self.bias)

    def dequantize(self, index: int | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight [out, in] (of expert `index`; only output rows `rows` if given)."""

        def pick(tensor):
            tensor = tensor if index is None else tensor[index]
            return tensor if rows is None else tensor[rows]

        if self.kind == "int8":
            return quant_kernels.dequantize_int8(pick(self.qweight), pick(self.scales))
        if self.kind == "nf4":
            return dequantize_nf4(pick(self.packed), pick(self.absmax), self.code)
        if self.kind == "mxfp4":
            return mxfp4.dequantize(pick(self.packed), pick(self.scales))
        weight = quant_kernels.dequantize_int4(pick(self.packed), pick(self.scales), pick(self.zeros), self.group_size)
        if self.perm is None:
            return weight
        unpermuted = torch.empty_like(weight)
        unpermuted[:, self.perm if index is None else self.perm[index]] = weight
        return unpermuted


def fused_expert_operands(gate_up, down) -> tuple | None:
    """(kind, group_size, gate_up tensors, down tensors) for quant_kernels.moe_pairs when both expert
    stacks are int8, MXFP4, or int4 with one group size and no act-order permutation; else None."""
    if not (isinstance(gate_up, QuantLinear) and isinstance(down, QuantLinear)) or gate_up.kind != down.kind:
        return None
    if gate_up.kind == "int8":
        return "int8", 0, (gate_up.qweight, gate_up.scales), (down.qweight, down.scales)
    if gate_up.kind == "mxfp4":
        return "mxfp4", mxfp4.BLOCK, (gate_up.packed, gate_up.scales), (down.packed, down.scales)
    if gate_up.kind == "int4" and gate_up.perm is None and down.perm is None and gate_up.group_size == down.group_size:
        return ("int4", gate_up.group_size, (gate_up.packed, gate_up.scales, gate_up.zeros),
                (down.packed, down.scales, down.zeros))
    return None


def dequantized_linear_weight(module: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight of a float or quantized linear layer (only output rows `rows` if given)."""
    if isinstance(module, QuantLinear):
        return module.dequantize(rows=rows)
    return (module.weight if rows is None else module.weight[rows]).float()
