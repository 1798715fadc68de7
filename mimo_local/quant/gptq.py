"""GPTQ (Frantar et al. 2022): quantize a weight column by column, each time spreading the rounding
error over the columns not yet quantized through the inverse Hessian of the layer's calibration
inputs, so the layer's outputs on those inputs move as little as possible.

Implemented here rather than through GPTQModel: GPTQModel 7.7.0 requires torch >= 2.14.1, numpy >=
2.4, datasets/pyarrow/torchao and builds C++/CUDA extensions, while this project pins CPU torch 2.13;
the algorithm itself is ~80 lines of torch.
"""

from __future__ import annotations

import torch

from .rtn import IntWeight, group_params, quantize_codes, quantize_rtn


class HessianAccumulator:
    """H = 2/n * sum x x^T over the calibration inputs of one linear layer. Inputs are kept as rows
    while there are fewer of them than inputs (a rarely routed expert costs its rows, not in^2)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.rows: list[torch.Tensor] = []
        self.sum: torch.Tensor | None = None  # sum x x^T once folded
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if not x.shape[0]:
            return
        self.tokens += x.shape[0]
        if self.sum is None:
            self.rows.append(x.clone())
            if self.tokens < self.in_features:
                return
            x = torch.cat(self.rows)
            self.rows = []
            self.sum = torch.zeros(self.in_features, self.in_features)
        self.sum.addmm_(x.t(), x)

    @property
    def hessian(self) -> torch.Tensor:
        if self.sum is None:
            x = torch.cat(self.rows) if self.rows else torch.zeros(0, self.in_features)
            return 2.0 / max(self.tokens, 1) * (x.t() @ x)
        return 2.0 / self.tokens * self.sum


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
) -> IntWeight:
    w = weight.float().clone()
    out_features, columns = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns)
    w, h = w[:, perm], h[perm][:, perm]

    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:  # numerically singular even after damping: nothing to gain
        return quantize_rtn(weight, bits, group_size, sym)

    size = columns if group_size == -1 else group_size
    groups = columns // size
    q = torch.zeros_like(w)
    scales = torch.zeros(groups, out_features)
    zeros = torch.zeros(groups, out_features)
    scale = zero = None
    for begin in range(0, columns, block):
        end = min(begin + block, columns)
        w_block = w[:, begin:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[begin:end, begin:end]
        for i in range(end - begin):
            column = begin + i
            if column % size == 0:  # group parameters from the error-compensated weights
                scale, zero = group_params(torch.cat([w_block[:, i:], w[:, end:]], 1)[:, :size], bits, sym)
                scales[column // size], zeros[column // size] = scale, zero
            codes = quantize_codes(w_block[:, i], scale, zero, bits)
            q[:, column] = codes
            error = (w_block[:, i] - (codes - zero) * scale) / hinv_block[i, i]
            w_block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ hinv[begin:end, end:]

    inverse = torch.argsort(perm)
    g_idx = (inverse // size).to(torch.int32)  # group of each original input column
    return IntWeight(
        q=q[:, inverse].to(torch.uint8),
        scales=scales.t().contiguous(),
        zeros=zeros.t().contiguous(),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
    )
