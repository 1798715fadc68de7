"""The MXFP4 C kernels (mimo_local/kernels/cpu_quant.c: linear_mxfp4 and moe_quant's MXFP4 stacks) against the
pure-torch references, in every ISA build this CPU runs.

The kernels decode each weight exactly (checked bit for bit below) and multiply it by x quantized to
int8 per block of 32 inputs, as llama.cpp does (quant.quantize_blocks_q8). Two references:
- the same arithmetic in torch (quant.mxfp4_q8_terms: each block's exact integer dot product and its
  float32 step): the kernel's result is their sum up to the float32 summation order, within the
  textbook bound for that: any order of n float32 products and sums lies within gamma(n) * sum |terms|
  of the exact sum, gamma(n) = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability, 3.1), n
  here the 4 int32 lanes of each block the kernels scale one by one, plus the bias;
- dequantize-then-matmul in float64 (mimo_local/quant/mxfp4.py), from which it differs by the
  rounding of x: at most half a step (x_scale / 2) per input, so by sum_blocks x_scale / 2 * sum |w|."""

import kernel_builds
import pytest
import torch

from mimo_local.kernels import quant
from mimo_local.loader import load_model
from mimo_local.quant import mxfp4
from mimo_local.quant.linear import QuantLinear, fused_expert_operands


@pytest.fixture(autouse=True, scope="module", params=kernel_builds.LEVELS)
def isa_build(request):
    """Every test of this file runs against each ISA build this CPU can run."""
    with kernel_builds.kernels(request.param):
        assert quant.library().kernel_isa().decode() == request.param
        yield request.param


@pytest.fixture
def kernel_only(monkeypatch):
    """Few-row calls must run the C kernel: the dequantizing fallback fails the test if reached."""
    reference = quant.reference_mxfp4_linear

    def refuse(*args):
        raise AssertionError("mxfp4_linear fell back to the torch reference")

    monkeypatch.setattr(quant, "reference_mxfp4_linear", refuse)
    return reference


def gamma(terms: int) -> float:
    unit = 2.0**-24
    return terms * unit / (1 - terms * unit)


def random_mxfp4(generator, *shape_out_in, scale_range=(112, 136)):
    """Random packed bytes and E8M0 scales for weights [..., out, in]."""
    *lead, out_features, in_features = shape_out_in
    packed = torch.randint(0, 256, (*lead, out_features, in_features // 2), generator=generator, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (*lead, out_features, in_features // mxfp4.BLOCK), generator=generator,
                           dtype=torch.uint8)
    return packed, scales


def assert_within_summation_order(got, x, packed, scales, bias=None):
    """got is the sum of the int8 arithmetic's terms up to float32 summation order."""
    dots, steps = quant.mxfp4_q8_terms(x.float(), packed, scales)
    codes, _ = quant.quantize_blocks_q8(x.float())
    twice = mxfp4.dequantize(packed, torch.full_like(scales, 128)).double()  # 2 * e2m1
    codes = codes.double().abs().view(x.shape[0], 1, scales.shape[1], mxfp4.BLOCK)
    magnitude = ((codes * twice.abs().view(1, *scales.shape, mxfp4.BLOCK)).sum(-1) * steps).sum(-1)
    exact = (dots * steps).sum(-1)
    if bias is not None:  # one more rounding: the bias add
        exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
    bound = gamma(x.shape[-1] // 8 + 2) * magnitude
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() / bound).max()


def assert_within_activation_rounding(got, x, packed, scales, bias=None):
    """got differs from x . W (float64) by at most x_scale * (1/2 + 127 * 2^-11) per input times |w|
    (half a step of rounding, plus a code of at most 127 times the float16 rounding of the step), and
    float32 sums."""
    weight = mxfp4.reference_dequantize(packed, scales).double()
    exact = x.double() @ weight.T + (0 if bias is None else bias.double())
    _, x_scale = quant.quantize_blocks_q8(x.float())
    per_block = weight.abs().view(weight.shape[0], -1, mxfp4.BLOCK).sum(-1)  # [N, blocks]
    rounding = (x_scale.double() * (0.5 + 127 * 2.0**-11)) @ per_block.T
    magnitude = x.double().abs() @ weight.abs().T + rounding + (0 if bias is None else bias.double().abs())
    bound = rounding * (1 + 1e-6) + gamma(x.shape[-1] + 1) * magnitude
    assert ((got.double() - exact).abs() <= bound).all(), ((got.double() - exact).abs() / bound).max()


def test_the_mxfp4_kernel_is_built_here():
    assert quant.library() is not None and hasattr(quant.library(), "linear_mxfp4")


def test_every_byte_at_every_finite_scale_decodes_bit_for_bit(kernel_only):
    """Unit inputs read single weights out: x = c e_j with c = 127/128 quantizes exactly (step 1/128,
    code 127) and gives c times column j of W exactly (one nonzero product, c w exact in float32),
    so every byte value at every position, under every scale that keeps 6 * scale finite (0 to 252;
    0 is the subnormal 2^-127), comes out as the reference decodes it."""
    in_features, c = 512, 127 / 128
    packed = torch.arange(256, dtype=torch.uint8).repeat(253, 1)  # row r: bytes 0..255 at scale byte r
    scales = torch.arange(253, dtype=torch.uint8)[:, None].repeat(1, in_features // mxfp4.BLOCK)
    identity = c * torch.eye(in_features)
    step = quant.MXFP4_MAX_ROWS
    columns = torch.cat([quant.mxfp4_linear(identity[i : i + step], packed, scales)
                         for i in range(0, in_features, step)])
    expected = mxfp4.reference_dequantize(packed, scales).T
    assert torch.equal(columns, c * expected)  # -0.0 == 0.0: a zero weight's sign is lost in the sum
    assert torch.equal(columns, quant.reference_mxfp4_q8_linear(identity, packed, scales))
    assert expected[2, 0] == 2.0**-128  # scale byte 0 (2^-127) gives subnormal weights, kept as they are


def test_a_nan_scale_gives_nan_rows_only():
    generator = torch.Generator().manual_seed(5)
    packed, scales = random_mxfp4(generator, 6, 64)
    scales[2, 1] = 255
    out = quant.mxfp4_linear(torch.randn(1, 64, generator=generator), packed, scales)
    assert out[0, 2].isnan() and not out[0, [0, 1, 3, 4, 5]].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 64, 1024), (2, 33, 96), (3, 70, 32), (5, 17, 160),
                                                          (16, 48, 384), (64, 24, 256)])
def test_random_blocks_match_the_reference_within_summation_order(kernel_only, dtype, rows, out_features,
                                                                 in_features):
    generator = torch.Generator().manual_seed(rows * in_features)
    packed, scales = random_mxfp4(generator, out_features, in_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator)
    got = quant.mxfp4_linear(x.float(), packed, scales, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert_within_summation_order(got, x, packed, scales, bias)
    assert_within_activation_rounding(got, x, packed, scales, bias)
    in_dtype = quant.mxfp4_linear(x, packed, scales)
    assert in_dtype.dtype == dtype
    assert torch.equal(in_dtype, quant.mxfp4_linear(x.float(), packed, scales).to(dtype))


def test_a_token_gets_the_same_bits_alone_and_in_a_verify_step():
    """As for the int kernels: a decode step and an MTP verify step compute each token alike."""
    generator = torch.Generator().manual_seed(9)
    packed, scales = random_mxfp4(generator, 256, 1024)
    x = torch.randn(7, 1024, generator=generator)
    together = quant.mxfp4_linear(x, packed, scales)
    assert torch.equal(together, torch.cat([quant.mxfp4_linear(x[i : i + 1], packed, scales) for i in range(7)]))


def test_many_rows_take_the_reference_path():
    generator = torch.Generator().manual_seed(2)
    packed, scales = random_mxfp4(generator, 24, 128)
    x = torch.randn(2, 40, 128, generator=generator)
    got = quant.mxfp4_linear(x, packed, scales)
    assert got.shape == (2, 40, 24)
    assert torch.equal(got, quant.reference_mxfp4_linear(x, packed, scales))


def routed_pairs(tokens, experts, top_k, generator):
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)
    return flat[order], order // top_k, torch.rand(tokens * top_k, generator=generator)[order]


@pytest.mark.parametrize("tokens,hidden,inter", [(1, 128, 64), (3, 96, 64), (4, 64, 32), (2, 1024, 256)])
def test_mxfp4_experts_match_the_reference(tokens, hidden, inter):
    generator = torch.Generator().manual_seed(tokens + hidden)
    experts, top_k = 6, 2
    gate_up = random_mxfp4(generator, experts, 2 * inter, hidden)
    down = random_mxfp4(generator, experts, hidden, inter)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    pairs = routed_pairs(tokens, experts, top_k, generator)
    assert quant.moe_supports(x, gate_up[0], down[0])
    got = quant.moe_pairs(x, "mxfp4", mxfp4.BLOCK, gate_up, down, *pairs)
    same_arithmetic = quant.reference_moe_pairs(x, "mxfp4", mxfp4.BLOCK, gate_up, down, *pairs, q8_activations=True)
    expected = quant.reference_moe_pairs(x, "mxfp4", mxfp4.BLOCK, gate_up, down, *pairs)
    assert got.shape == (tokens, hidden)
    # two matmuls, each within its summation-order bound, and the C expf in SiLU (a few ulp)
    assert ((got - same_arithmetic).abs() <= 1e-5 * (1 + same_arithmetic.abs().max())).all()
    # the float reference: x and the SwiGLU output rounded to int8 per block of 32 (as int4-g128's test)
    error = (got - expected).abs().max().item()
    assert 0 < error <= 0.02 * expected.abs().max().item()


def test_mxfp4_expert_stacks_are_routed_to_the_fused_kernel():
    gate_up = QuantLinear("mxfp4", 64, 64, experts=4, blocksize=mxfp4.BLOCK)
    down = QuantLinear("mxfp4", 32, 64, experts=4, blocksize=mxfp4.BLOCK)
    kind, group, gate_up_tensors, down_tensors = fused_expert_operands(gate_up, down)
    assert (kind, group) == ("mxfp4", 32)
    assert gate_up_tensors == (gate_up.packed, gate_up.scales) and down_tensors == (down.packed, down.scales)


def test_v26_decodes_as_the_torch_path_with_the_mxfp4_kernels(checkpoints, tmp_path, monkeypatch, decode_logits):
    """The tiny MiMo-V2.6 (MXFP4 routed experts): decode and verify steps run one MXFP4 moe_pairs
    call per MoE layer and give the greedy ids of the torch path (kernels off: every expert
    dequantized by mxfp4.py), its logits within the int8 activations' error (measured: 0.045 at
    logits up to 3.8, 0.045-0.05 on other seeds)."""
    from mimo_local.dev.tiny import make_checkpoint

    model = load_model(make_checkpoint(tmp_path / "v26", "mimo_v2.6"))
    kinds = []
    fused = quant.moe_pairs
    monkeypatch.setattr(quant, "moe_pairs", lambda x, kind, *args: kinds.append(kind) or fused(x, kind, *args))
    with_kernels = decode_logits(model, seed=6)
    assert kinds and set(kinds) == {"mxfp4"}
    with kernel_builds.kernels(enabled=False):
        kinds.clear()
        torch_path = decode_logits(model, seed=6)
        assert not kinds
    assert (with_kernels - torch_path).abs().max() <= 0.02 * (1 + torch_path.abs().max())
    assert torch.equal(with_kernels.argmax(-1), torch_path.argmax(-1))


def test_activation_scales_round_as_float16_stores_them():
    """The x scales keep float16's precision (llama.cpp's Q8_0 stores them in float16), subnormals
    included, and stay finite past its range."""
    generator = torch.Generator().manual_seed(5)
    values = (torch.rand(50000, generator=generator) * torch.logspace(-9, 4, 50000)).float()
    values = torch.cat([values, torch.tensor([2.0**-14, 3 * 2.0**-16, 65504.0, 1 / 3])])
    assert torch.equal(quant.round_to_half(values), values.half().float())
    assert quant.round_to_half(torch.tensor([1e6])).item() == 999936.0  # 1953 * 2^9, where float16 is inf
