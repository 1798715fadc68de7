"""The Triton int8/int4 kernels against the pure-torch references, run on the CPU by Triton's
interpreter (TRITON_INTERPRET=1, set before the kernels are built). On a GPU the same kernels
compile for real (benchmarks/bench_quant_kernels.py measures them there)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mimo_local.kernels import quant, triton_quant  # noqa: E402
from mimo_local.quant import mxfp4  # noqa: E402


def close(got, expected):
    return ((got - expected).abs() <= 1e-4 * (1 + expected.abs())).all()


def test_triton_is_installed_for_these_tests():
    assert triton_quant.available()


@pytest.mark.parametrize("rows", [1, 3, 20])  # GEMV (1 row, a 4-row tile) and the tl.dot path
@pytest.mark.parametrize("out_features,in_features,group", [(40, 256, 128), (17, 96, 32)])
def test_int4_kernel_matches_reference(rows, out_features, in_features, group):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    packed = quant.pack_int4(torch.randint(0, 16, (out_features, in_features), generator=generator))
    scales = torch.rand(out_features, in_features // group, generator=generator) / 8
    zeros = torch.rand(out_features, in_features // group, generator=generator) * 15
    bias = torch.randn(out_features, generator=generator)
    expected = quant.reference_int4_linear(x, packed, scales, zeros, group, bias)
    assert close(triton_quant.int4_linear(x, packed, scales, zeros, group, bias), expected)
    assert close(triton_quant.int4_linear(x, packed, scales, zeros, group), expected - bias)


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_kernel_matches_reference(rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 160, generator=generator)
    qweight = torch.randint(-127, 128, (33, 160), generator=generator, dtype=torch.int8)
    scales = torch.rand(33, generator=generator) / 64
    bias = torch.randn(33, generator=generator)
    expected = quant.reference_int8_linear(x, qweight, scales, bias)
    assert close(triton_quant.int8_linear(x, qweight, scales, bias), expected)


def test_mxfp4_kernel_decodes_every_byte_at_every_finite_scale_bit_for_bit():
    """x = e_j reads column j of W out exactly (one nonzero product): every byte value at scale
    bytes 0 (subnormal 2^-127) to 252 (6 x scale still finite) decodes as mxfp4.py's reference."""
    packed = torch.arange(256, dtype=torch.uint8).view(8, 32).repeat(253, 1)  # 8 rows per scale byte
    scales = torch.arange(253, dtype=torch.uint8).repeat_interleave(8)[:, None].repeat(1, 2)
    columns = triton_quant.mxfp4_linear(torch.eye(64), packed, scales)  # 64 rows: the tl.dot path, few programs
    assert torch.equal(columns, mxfp4.reference_dequantize(packed, scales).T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 20])  # GEMV (1 row, a 4-row tile) and the tl.dot path
@pytest.mark.parametrize("out_features,in_features", [(40, 256), (17, 96)])
def test_mxfp4_kernel_matches_reference_within_summation_order(dtype, rows, out_features, in_features):
    """The float32 sums of the kernel, in whatever order, lie within gamma(K + 1) * sum |w x| of the
    exact float64 sum (the bound of tests/test_mxfp4_kernels.py); bfloat16 x: the same sums, then
    rounded once to bfloat16."""
    generator = torch.Generator().manual_seed(rows + in_features)
    packed = torch.randint(0, 256, (out_features, in_features // 2), generator=generator, dtype=torch.uint8)
    scales = torch.randint(112, 136, (out_features, in_features // 32), generator=generator, dtype=torch.uint8)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator)
    got = triton_quant.mxfp4_linear(x.float(), packed, scales, bias)
    weight = mxfp4.reference_dequantize(packed, scales).double()
    exact = x.double() @ weight.T + bias.double()
    size = x.double().abs() @ weight.abs().T + bias.double().abs()
    unit = 2.0**-24
    assert ((got.double() - exact).abs() <= (in_features + 1) * unit / (1 - (in_features + 1) * unit) * size).all()
    in_dtype = triton_quant.mxfp4_linear(x, packed, scales)
    assert in_dtype.dtype == dtype
    no_bias = (exact - bias.double()).to(dtype).double()  # one rounding of the float32 sum to x's dtype
    assert ((in_dtype.double() - no_bias).abs() <= 2 * unit * size + no_bias.abs() * 2.0**-7).all()
