"""GPU matmuls on packed int8 / int4 / MXFP4 weights (layouts in quant.py), written in Triton.

One kernel serves the int layouts (BITS 4 or 8), another MXFP4. Each program computes BLOCK_N output channels for
BLOCK_M rows of x, walking K in BLOCK_K steps: it loads the packed bytes once, unpacks and dequantizes them in registers and multiplies them with
x. Few rows (decode) use an elementwise multiply-and-sum, which wastes nothing on padding; many
rows (prefill) use tl.dot on 16+ row tiles. The pure-torch references are in quant.py.

Kernels are built on first use, so TRITON_INTERPRET=1 (set before that) runs them on the CPU.
"""

from __future__ import annotations

import functools

import torch

DOT_MIN_ROWS = 16


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def quant_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, GROUP,
        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            if BITS == 4:  # packed nibbles, scale and zero per group of inputs
                pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_ptr + cols[:, None] * (K // 2) + pairs[None, :],
                                 mask=col_ok[:, None] & (pairs < K // 2)[None, :], other=0)
                q = tl.interleave(packed & 0x0F, packed >> 4).to(tl.float32)  # [BLOCK_N, BLOCK_K]
                meta = cols[:, None] * (K // GROUP) + (ks // GROUP)[None, :]
                meta_ok = col_ok[:, None] & k_ok[None, :]
                w = (q - tl.load(z_ptr + meta, mask=meta_ok, other=0.0)) * tl.load(s_ptr + meta, mask=meta_ok, other=0.0)
            else:  # int8, one scale per output channel, applied once at the end
                w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                            other=0).to(tl.float32)
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w))
            else:
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        if BITS == 8:
            acc *= tl.load(s_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def mxfp4_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """MXFP4: e2m1 pairs (element 2i in the low nibble) with an E8M0 scale byte per 32 inputs.
        Each weight is built from its bit fields exactly (no approximate exp2), so the weights are
        mxfp4.py's. tl.dot on float32 operands may run as TF32 on the GPU: exact products still for
        bfloat16 x (8 significant bits) and these weights (2), rounded x for float32 x."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + cols[:, None] * (K // 2) + pairs[None, :],
                             mask=col_ok[:, None] & (pairs < K // 2)[None, :], other=0).to(tl.int32)
            codes = tl.interleave(packed & 0x0F, packed >> 4)  # [BLOCK_N, BLOCK_K]
            # e2m1 magnitude codes 0-7: 0, 0.5 (subnormal), then 2^((c >> 1) - 1) * (1 + (c & 1) / 2)
            c = codes & 7
            normal = (((c >> 1) + 126) << 23) | ((c & 1) << 22)
            magnitude = tl.where(c >= 2, normal, tl.where(c == 1, 0x3F000000, 0)).to(tl.float32, bitcast=True)
            value = tl.where((codes & 8) != 0, -magnitude, magnitude)
            meta_ok = col_ok[:, None] & k_ok[None, :]
            e = tl.load(s_ptr + cols[:, None] * (K // 32) + (ks // 32)[None, :], mask=meta_ok, other=127).to(tl.int32)
            scale = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23)).to(tl.float32, bitcast=True)
            w = value * scale
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(x.to(tl.float32), tl.trans(w))
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])

    return triton, quant_kernel, mxfp4_kernel


def _tiles(rows: int) -> dict:
    if rows >= DOT_MIN_ROWS:
        return {"USE_DOT": True, "BLOCK_M": 16 if rows < 64 else 64, "BLOCK_N": 64, "BLOCK_K": 64}
    block_m = 1 if rows == 1 else 4
    return {"USE_DOT": False, "BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 128}


def _launch(bits: int, x, weights, scales, zeros, group_size: int, bias, out_features, in_features):
    triton, kernel, _ = _kernels()
    flat = x.reshape(-1, in_features).contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.float32, device=x.device)
    tiles = _tiles(rows)
    grid = (triton.cdiv(out_features, tiles["BLOCK_N"]), triton.cdiv(rows, tiles["BLOCK_M"]))
    unused = out  # pointer arguments the kernel never reads (no zeros for int8, no bias)
    kernel[grid](flat, weights.contiguous(), scales.float().contiguous(),
                 zeros.float().contiguous() if zeros is not None else unused,
                 bias.float().contiguous() if bias is not None else unused, out, rows, out_features, in_features,
                 group_size, BITS=bits, HAS_BIAS=bias is not None, **tiles)
    return out.view(*x.shape[:-1], out_features).to(x.dtype)


def int4_linear(x, packed, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    return _launch(4, x, packed, scales, zeros, group_size, bias, packed.shape[0], packed.shape[1] * 2)


def int8_linear(x, qweight, scales, bias=None) -> torch.Tensor:
    return _launch(8, x, qweight, scales, None, qweight.shape[1], bias, *qweight.shape)


def mxfp4_linear(x, packed, scales, bias=None) -> torch.Tensor:
    """x @ W.T in x's dtype for MXFP4 weights: packed uint8 [out, in/2], E8M0 scales uint8 [out, in/32]."""
    triton, _, kernel = _kernels()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    flat = x.reshape(-1, in_features).contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.float32, device=x.device)
    tiles = _tiles(rows)
    grid = (triton.cdiv(out_features, tiles["BLOCK_N"]), triton.cdiv(rows, tiles["BLOCK_M"]))
    kernel[grid](flat, packed.contiguous(), scales.contiguous(), bias.float().contiguous() if bias is not None else out,
                 out, rows, out_features, in_features, HAS_BIAS=bias is not None, **tiles)
    return out.view(*x.shape[:-1], out_features).to(x.dtype)
