"""The Triton int8/int4 kernels against the pure-torch references, run on the CPU by Triton's
interpreter (TRITON_INTERPRET=1, set before the kernels are built). On a GPU the same kernels
compile for real (benchmarks/bench_quant_kernels.py measures them there)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from mimo_local.kernels import quant, triton_quant  # noqa: E402


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
