"""Packed int8/int4 matmuls (mimo_local/kernels/quant.py): the C kernels against the pure-torch references."""

import kernel_builds
import pytest
import torch

from mimo_local.kernels import cpu, quant
from mimo_local.loader import load_model


@pytest.fixture(autouse=True, scope="module", params=kernel_builds.LEVELS)
def isa_build(request):
    """Every test of this file runs against each ISA build this CPU can run."""
    with kernel_builds.kernels(request.param):
        assert quant.library().kernel_isa().decode() == request.param
        yield request.param


SHAPES = [(1, 256, 512, 128), (2, 33, 96, 32), (3, 70, 256, 64), (5, 17, 40, 8), (16, 48, 384, 128)]


def close(got, expected, tolerance):
    return ((got.float() - expected.float()).abs() <= tolerance * (1 + expected.float().abs())).all()


def test_the_c_kernels_are_built_here():
    assert quant.library() is not None  # CI has gcc: the fast path is what the tests below exercise


def test_bfloat16_activations_take_the_integer_dot_product_kernels_in_every_build():
    """The int8/int4 kernels for bfloat16 x report whether they ran (0: the caller falls back to the
    float32 kernel); every build has them (AVX512-VNNI, AVX2 or plain C integer dot products) for
    these shapes, so the tests below check them."""
    x = torch.randn(1, 256).bfloat16()
    out = torch.empty(1, 8)
    scales, zeros = torch.rand(8, 2), torch.rand(8, 2)
    packed = quant.pack_int4(torch.randint(0, 16, (8, 256)))
    ran = quant.library().linear_int4_bf16(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                                           None, out.data_ptr(), 1, 8, 256, 128, 0)
    assert ran == 1
    qweight, row_scales = torch.randint(-127, 128, (8, 256), dtype=torch.int8), torch.rand(8)
    ran = quant.library().linear_int8_bf16(x.data_ptr(), qweight.data_ptr(), row_scales.data_ptr(), None,
                                           out.data_ptr(), 1, 8, 256, 0)
    assert ran == 1


def test_int4_packing_round_trips():
    values = torch.randint(0, 16, (7, 64), generator=torch.Generator().manual_seed(0))
    packed = quant.pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert torch.equal(quant.unpack_int4(packed), values.to(torch.uint8))
    assert int(packed[0, 0]) == int(values[0, 0]) | (int(values[0, 1]) << 4)  # low nibble first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features,group", SHAPES)
def test_int8_linear_matches_reference(dtype, rows, out_features, in_features, group):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    qweight = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales = torch.rand(out_features, generator=generator) / 64
    bias = torch.randn(out_features, generator=generator)
    got = quant.int8_linear(x, qweight, scales, bias)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    tolerance = 1e-4 if dtype == torch.float32 else 2**-7
    assert close(got, quant.reference_int8_linear(x.float(), qweight, scales, bias), tolerance)


def test_int8_linear_gives_float32_logits_when_asked():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 256, generator=generator).bfloat16()
    qweight = torch.randint(-127, 128, (40, 256), generator=generator, dtype=torch.int8)
    scales = torch.rand(40, generator=generator) / 64
    got = quant.int8_linear(x, qweight, scales, float32_out=True)
    assert got.dtype == torch.float32 and not torch.equal(got, got.bfloat16().float())  # not rounded to x's dtype
    # within the int16 quantization of bfloat16 x (max |x| / 65534 per element), far inside bfloat16's 2**-8
    assert close(got, quant.reference_int8_linear(x.float(), qweight, scales), 2**-10)


def test_quantize_int8_rounds_each_row_to_its_own_scale_in_chunks():
    weight = torch.randn(37, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    weight[5] = 0  # an all-zero row must not divide by zero
    qweight, scales = quant.quantize_int8(weight, chunk_rows=8)
    assert qweight.dtype == torch.int8 and scales.shape == (37,)
    assert (qweight.abs().amax(dim=1)[torch.arange(37) != 5] == 127).all()  # each row uses its whole range
    error = (quant.dequantize_int8(qweight, scales) - weight.float()).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all() and not error[5].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features,group", SHAPES)
def test_int4_linear_matches_reference(dtype, rows, out_features, in_features, group):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    packed = quant.pack_int4(torch.randint(0, 16, (out_features, in_features), generator=generator))
    scales = torch.rand(out_features, in_features // group, generator=generator) / 8
    zeros = torch.rand(out_features, in_features // group, generator=generator) * 15
    bias = torch.randn(out_features, generator=generator)
    got = quant.int4_linear(x, packed, scales, zeros, group, bias)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    expected = quant.reference_int4_linear(x.float(), packed, scales, zeros, group, bias)
    if dtype == torch.float32:
        assert close(got, expected, 1e-4)
        return
    # bfloat16 x is quantized to int8 per group of inputs (as llama.cpp does for its k-quants):
    # each input moves by at most half a step, max|x_group| / 254.
    step = x.float().abs().view(rows, -1, group).amax(-1) / 254
    bound = step.repeat_interleave(group, dim=1) @ quant.dequantize_int4(packed, scales, zeros, group).abs().T
    assert ((got.float() - expected).abs() <= bound * 1.01 + 2**-7 * (1 + expected.abs())).all()
    unbiased = quant.int4_linear(x, packed, scales, zeros, group)
    assert ((unbiased.float() - (expected - bias)).abs() <= bound * 1.01 + 2**-7 * (1 + expected.abs())).all()


def test_many_rows_and_leading_dimensions_take_the_reference_path_with_the_same_result():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 128, generator=generator)  # 600 rows: more than a prefill chunk
    packed = quant.pack_int4(torch.randint(0, 16, (24, 128), generator=generator))
    scales, zeros = torch.rand(24, 1, generator=generator), torch.full((24, 1), 8.0)
    got = quant.int4_linear(x, packed, scales, zeros, 128)
    assert got.shape == (2, 300, 24)
    expected = x @ quant.dequantize_int4(packed, scales, zeros, 128).T
    assert close(got, expected, 1e-4)
    decode = quant.int4_linear(x[:, :1], packed, scales, zeros, 128)  # [2, 1, 128]: 2 rows, C kernel
    assert close(decode, expected[:, :1], 1e-4)


def gemm_weights(bits, out_features, in_features, group, generator):
    if bits == 8:
        qweight = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
        return qweight, torch.rand(out_features, generator=generator) / 64, None
    packed = quant.pack_int4(torch.randint(0, 16, (out_features, in_features), generator=generator))
    scales = torch.rand(out_features, in_features // group, generator=generator) / 8
    return packed, scales, torch.rand(out_features, in_features // group, generator=generator) * 15


# (rows, out features, in features, int4 group): rows and columns off the tile sizes (12 x 32 AVX-512,
# 6 x 16 otherwise) as well as on them, groups of 128 and 256
GEMM_SHAPES = [(17, 40, 256, 128), (24, 64, 512, 256), (37, 33, 384, 128), (1, 7, 128, 128)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,out_features,in_features,group", GEMM_SHAPES)
def test_prefill_gemm_equals_its_reference_bit_for_bit(bits, rows, out_features, in_features, group):
    """Integer sums are exact and every build does the float32 steps in reference_gemm's order."""
    generator = torch.Generator().manual_seed(rows + bits)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    x[0, :64] *= 30  # a group with an outlier: its own scale
    weight, scales, zeros = gemm_weights(bits, out_features, in_features, group, generator)
    bias = torch.randn(out_features, generator=generator)
    for with_bias in (bias, None):
        got = quant.gemm(x, bits, weight, scales, zeros, group, with_bias, float32_out=True)
        assert got.dtype == torch.float32 and got.shape == (rows, out_features)
        expected = quant.reference_gemm(x, bits, weight, scales, zeros, group, with_bias)
        assert torch.equal(got, expected)
        rounded = quant.gemm(x, bits, weight, scales, zeros, group, with_bias)
        assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, expected.bfloat16())


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_gemm_is_within_the_int8_quantization_of_x_of_the_float_result(bits):
    generator = torch.Generator().manual_seed(5)
    rows, out_features, in_features, group = 40, 48, 512, 128
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    weight, scales, zeros = gemm_weights(bits, out_features, in_features, group, generator)
    got = quant.gemm(x, bits, weight, scales, zeros, group, float32_out=True)
    dense = (quant.dequantize_int8(weight, scales) if bits == 8
             else quant.dequantize_int4(weight, scales, zeros, group))
    expected = x.float() @ dense.T
    # each input moves by at most half a step of its group, max|x_group| / 254
    step = x.float().abs().view(rows, -1, 128).amax(-1) / 254
    bound = step.repeat_interleave(128, dim=1) @ dense.abs().T
    assert ((got - expected).abs() <= bound * 1.001 + 1e-4 * expected.abs()).all()
    assert not torch.equal(got, expected)


def test_prefill_gemm_declines_layouts_it_does_not_take():
    x = torch.randn(24, 192).bfloat16()
    weight, scales, zeros = gemm_weights(4, 8, 192, 64, torch.Generator().manual_seed(0))
    assert quant.gemm(x, 4, weight, scales, zeros, 64) is None  # int4 groups of 64
    assert quant.gemm(x, 8, *gemm_weights(8, 8, 192, 0, torch.Generator())[:2], None, 0) is None  # K % 128


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_sized_bfloat16_linears_take_the_gemm_and_decode_steps_do_not(monkeypatch, bits):
    monkeypatch.setenv("MIMO_CPU_MATMUL", "kernels")  # the GEMM wherever it applies (no measurement)
    generator = torch.Generator().manual_seed(9)
    weight, scales, zeros = gemm_weights(bits, 40, 256, 128, generator)
    bias = torch.randn(40, generator=generator)

    def run(x):
        if bits == 8:
            return quant.int8_linear(x, weight, scales, bias)
        return quant.int4_linear(x, weight, scales, zeros, 128, bias)

    prefill = torch.randn(1, quant.GEMM_MIN_ROWS, 256, generator=generator).bfloat16()
    got = run(prefill)
    assert got.dtype == torch.bfloat16 and got.shape == (1, quant.GEMM_MIN_ROWS, 40)
    assert torch.equal(got, quant.reference_gemm(prefill[0], bits, weight, scales, zeros, 128, bias)
                       .bfloat16().unsqueeze(0))
    decode = prefill[:, : quant.GEMM_MIN_ROWS - 1]  # a verify step: the row kernels, as before
    before = (quant._int8_kernel(decode, weight, scales, bias, torch.bfloat16) if bits == 8
              else quant._int4_rows(decode, weight, scales, zeros, 128, bias))
    assert torch.equal(run(decode), before)
    if bits == 4:  # the int4 row kernel quantizes x as the GEMM does: only the float32 summation order differs
        row_kernel = torch.empty(decode.shape[1], 40)
        assert quant.library().linear_int4_bf16(
            decode.data_ptr(), weight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bias.data_ptr(),
            row_kernel.data_ptr(), decode.shape[1], 40, 256, 128, 0)
        gemm = quant.reference_gemm(decode[0], 4, weight, scales, zeros, 128, bias)
        assert torch.allclose(row_kernel, gemm, rtol=1e-5, atol=1e-5 * gemm.abs().max().item())
    monkeypatch.setenv("MIMO_CPU_MATMUL", "torch")  # pinned to the path before the GEMM
    assert torch.equal(run(prefill), quant.reference_int8_linear(prefill, weight, scales, bias.bfloat16()) if bits == 8
                       else quant._int4_rows(prefill, weight, scales, zeros, 128, bias))


def quantized_stack(bits, experts, out_features, in_features, group, generator):
    if bits == 16:
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)

        def run(rows):
            return cpu.linear(rows, weight, float32_out=True)
    elif bits == 8:
        qweight = torch.randint(-127, 128, (experts, out_features, in_features), generator=generator, dtype=torch.int8)
        return qweight, torch.rand(experts, out_features, generator=generator) / 256
    q = torch.randint(0, 16, (experts * out_features, in_features), generator=generator)
    packed = quant.pack_int4(q).view(experts, out_features, in_features // 2)
    scales = torch.rand(experts, out_features, in_features // group, generator=generator) / 32
    zeros = torch.rand(experts, out_features, in_features // group, generator=generator) * 15
    return packed, scales, zeros


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens,hidden,inter,group", [(1, 128, 64, 32), (3, 96, 64, 32), (2, 40, 24, 8)])
def test_quantized_moe_matches_reference(bits, tokens, hidden, inter, group):
    generator = torch.Generator().manual_seed(bits + tokens)
    experts, top_k = 6, 2
    gate_up = quantized_stack(bits, experts, 2 * inter, hidden, group, generator)
    down = quantized_stack(bits, experts, hidden, inter, group, generator)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)
    pair_experts, pair_tokens = flat[order], order // top_k
    pair_weights = torch.rand(tokens * top_k, generator=generator)[order]
    assert quant.moe_supports(x, gate_up[0], down[0])
    kind = {8: "int8", 4: "int4"}[bits]
    got = quant.moe_pairs(x, kind, group, gate_up, down, pair_experts, pair_tokens, pair_weights)
    expected = quant.reference_moe_pairs(x, kind, group, gate_up, down, pair_experts, pair_tokens, pair_weights)
    assert got.shape == (tokens, hidden)
    # int8 stacks whose input is a multiple of 64 multiply int16-quantized activations (next test)
    int16_inputs = bits == 8 and (hidden % 64 == 0 or inter % 64 == 0)
    assert close(got, expected, 1e-3 if int16_inputs else 1e-4)


def test_int8_experts_take_int16_activations_within_their_error():
    """Inputs a multiple of 64 (x and the SwiGLU output) are quantized to int16 with one scale per
    token, as the dense int8 kernel does: close to the float reference (|error| <= max|x| / 65534 per
    input), not equal to it; other sizes multiply float32 x (summation order only). Measured relative
    errors: 6e-5 and 6e-7."""
    def relative_error(hidden, inter):
        generator = torch.Generator().manual_seed(11)
        gate_up = quantized_stack(8, 4, 2 * inter, hidden, 0, generator)
        down = quantized_stack(8, 4, hidden, inter, 0, generator)
        x = torch.randn(3, hidden, generator=generator)
        pairs = torch.tensor([0, 0, 1, 3, 3, 3]), torch.tensor([0, 2, 1, 0, 1, 2]), torch.rand(6, generator=generator)
        got = quant.moe_pairs(x, "int8", 0, gate_up, down, *pairs)
        expected = quant.reference_moe_pairs(x, "int8", 0, gate_up, down, *pairs)
        return ((got - expected).abs().max() / expected.abs().max()).item()

    assert 1e-5 < relative_error(256, 128) <= 2e-4  # the int16 rounding shows: that path ran
    assert relative_error(200, 136) < 1e-5  # float32 x


@pytest.mark.parametrize("scheme", ["int4\n    group_size: 32", "int8"])
def test_quantized_experts_take_the_fused_kernel_with_the_reference_result(checkpoints, tmp_path, monkeypatch, scheme):
    """A V2-Flash model whose routed experts are quantized: decode-sized forwards go through one
    moe_pairs call per layer and give the logits of the per-expert dequantizing path."""
    from mimo_local.loader import load_model

    recipe = tmp_path / "experts.yaml"
    recipe.write_text(
        "name: experts\nrules:\n  - match: '\\.mlp\\.experts\\.\\d+\\.(gate|up|down)_proj\\.weight$'\n"
        f"    scheme: {scheme}\n"
    )
    model = load_model(checkpoints("mimo_v2_flash"), torch.float32, quant=str(recipe))
    ids = torch.tensor([[5, 17, 300, 42]])
    calls = []
    fused = quant.moe_pairs
    monkeypatch.setattr(quant, "moe_pairs", lambda *args: calls.append(1) or fused(*args))

    def logits_step_by_step():
        cache = model.new_cache(16)
        return torch.cat([model(ids[:, i : i + 1], cache).logits[0] for i in range(ids.shape[1])])

    got = logits_step_by_step()
    assert calls, "the fused quantized-expert kernel was not used"
    monkeypatch.setattr(quant, "moe_supports", lambda *args: False)
    calls.clear()
    expected = logits_step_by_step()
    assert not calls
    assert (got - expected).abs().max().item() < 1e-4 * (1 + expected.abs().max().item())


def test_int8_recipe_quantizes_lm_head_and_draft_vocabulary_reads_its_rows(checkpoints):
    from mimo_local.loader import load_model
    from mimo_local.quant.linear import QuantLinear
    from mimo_local.speculative import DraftVocabulary

    model = load_model(checkpoints("mimo"), torch.float32, quant="int8")
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.kind == "int8"
    hidden = torch.randn(1, 1, model.config.hidden_size)
    full = model.mtp_logits(0, hidden)
    vocabulary = DraftVocabulary(model.lm_head, 100, model.config.vocab_size, model.dtype)
    vocabulary.extend(torch.tensor([5, 300, 7]))
    limited = model.mtp_logits(0, hidden, vocabulary)
    assert close(limited[..., :100], full[..., :100], 1e-5) and close(limited[..., 300], full[..., 300], 1e-5)
    assert torch.isinf(limited[..., 100:300]).all() and torch.isinf(limited[..., 301:]).all()


def test_int4_experts_with_128_groups_take_the_int8_activation_path_within_its_error():
    """Groups of 128 run the VNNI kernel on int8-quantized activations (x and the SwiGLU output):
    close to the float reference, not equal to it."""
    generator = torch.Generator().manual_seed(7)
    experts, tokens, hidden, inter, group = 4, 3, 256, 256, 128
    gate_up = quantized_stack(4, experts, 2 * inter, hidden, group, generator)
    down = quantized_stack(4, experts, hidden, inter, group, generator)
    x = torch.randn(tokens, hidden, generator=generator)
    pair_experts = torch.tensor([0, 0, 1, 3, 3, 3])
    pair_tokens = torch.tensor([0, 2, 1, 0, 1, 2])
    pair_weights = torch.rand(6, generator=generator)
    got = quant.moe_pairs(x, "int4", group, gate_up, down, pair_experts, pair_tokens, pair_weights)
    expected = quant.reference_moe_pairs(x, "int4", group, gate_up, down, pair_experts, pair_tokens, pair_weights)
    error = (got - expected).abs().max().item()
    assert 0 < error <= 0.02 * expected.abs().max().item()


def test_int4_experts_shared_by_several_tokens_give_each_token_its_own_sums():
    """Tokens routed to the same expert go through its weights together (a batch step), and each
    gets bit for bit what it gets routed alone (one thread: the same additions in the same order)."""
    generator = torch.Generator().manual_seed(11)
    experts, tokens, hidden, inter, group = 4, 6, 256, 256, 128
    gate_up = quantized_stack(4, experts, 2 * inter, hidden, group, generator)
    down = quantized_stack(4, experts, hidden, inter, group, generator)
    x = torch.randn(tokens, hidden, generator=generator)
    routes = torch.tensor([[0, 1], [0, 3], [0, 1], [0, 2], [0, 1], [3, 1]])  # expert 0: five tokens, 1: four
    weights = torch.rand(tokens, 2, generator=generator)
    flat = routes.reshape(-1)
    order = flat.argsort(stable=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = quant.moe_pairs(x, "int4", group, gate_up, down, flat[order], order // 2, weights.reshape(-1)[order])
        for token in range(tokens):
            alone_order = routes[token].argsort(stable=True)
            alone = quant.moe_pairs(x[token : token + 1], "int4", group, gate_up, down, routes[token][alone_order],
                                    torch.zeros(2, dtype=torch.long), weights[token][alone_order])
            assert torch.equal(together[token], alone[0]), token
    finally:
        torch.set_num_threads(previous)


GROUP_SIZED = {  # every projection input a multiple of 128, so the fused quantized layer applies
    "mimo": dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2),
    "mimo_v2_flash": dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, head_dim=96,
                          v_head_dim=32, moe_intermediate_size=128),
}


@pytest.mark.parametrize("family,recipe", [("mimo", "int4-g128"), ("mimo", "int8"), ("mimo_v2_flash", "v2flash-mixed")])
def test_fused_quantized_layer_equals_the_step_by_step_path(tmp_path, monkeypatch, family, recipe, decode_logits):
    """Decode and verify steps through the one-call quantized decoder layer give exactly the logits
    of the layer run projection by projection, and the fused call does run."""
    from mimo_local.dev.tiny import make_checkpoint

    if quant.library() is None:
        pytest.skip("no C compiler on this machine")
    path = make_checkpoint(tmp_path / family, family, overrides=GROUP_SIZED[family])
    model = load_model(path, torch.bfloat16, quant=recipe)
    fused_ran = []  # per fused call: whether the kernel took the layer (it returns None otherwise)
    real_layer = quant.decoder_layer

    def decode(fused: bool):
        def layer(*args, **kwargs):
            if not fused:
                return None
            result = real_layer(*args, **kwargs)
            fused_ran.append(result is not None)
            return result

        monkeypatch.setattr(quant, "decoder_layer", layer)
        return decode_logits(model, seed=3)

    step_by_step, fused = decode(False), decode(True)
    assert fused_ran == [True] * 7 * len(model.layers)  # 6 decode steps and a 4-token verify step per layer
    assert torch.equal(fused, step_by_step)


@pytest.mark.parametrize("family,recipe", [("mimo", "int4-g128"), ("mimo_v2_flash", "v2flash-mixed")])
def test_mtp_on_quantized_weights_is_lossless_and_stays_on_the_fused_kernels(tmp_path, monkeypatch, family, recipe):
    """Speculative decoding with quantized target and MTP layers (V2: also with the experts split
    into two groups, as offloading does) gives the plain greedy output, and every decode, draft and
    verify step of every decoder layer (MTP blocks included) runs the one-call quantized kernel."""
    from mimo_local.dev.tiny import make_checkpoint
    from mimo_local.generate import stream
    from mimo_local.models.layers import MoE
    from mimo_local.offload.placement import Placement
    from mimo_local.sampling import SamplingSettings
    from mimo_local.tokenizer import ChatTokenizer

    class TwoExpertGroups(Placement):
        def split_experts(self, model):
            for layer in model.layers:
                if isinstance(layer.mlp, MoE):
                    layer.mlp.place([e % 2 for e in range(layer.mlp.spec.num_experts)])

    path = make_checkpoint(tmp_path / family, family, overrides=GROUP_SIZED[family])
    placement = TwoExpertGroups(main="cpu") if family == "mimo_v2_flash" else None
    model = load_model(path, torch.bfloat16, quant=recipe, placement=placement)
    assert model.mtp_layers
    tokenizer = ChatTokenizer(path)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)
    kernel_took_it = []
    real_layer = quant.decoder_layer

    def layer(*args, **kwargs):
        result = real_layer(*args, **kwargs)
        kernel_took_it.append(result is not None)
        return result

    monkeypatch.setattr(quant, "decoder_layer", layer)

    def generate(draft_tokens):
        settings = SamplingSettings(temperature=0, max_tokens=24)
        events = list(stream(model, tokenizer, prompt, settings, eos_ids=(), draft_tokens=draft_tokens))
        return events[-1].stats

    plain = generate(0)
    assert kernel_took_it and all(kernel_took_it)
    kernel_took_it.clear()
    speculative = generate(len(model.mtp_layers))
    assert speculative.token_ids == plain.token_ids
    stats = speculative.speculation
    assert stats.verify_forwards < len(plain.token_ids)  # it did speculate
    assert all(kernel_took_it)
    # every verify forward through every target layer, and an MTP block call per draft, except each
    # MTP layer's first: its catch-up runs over the whole prompt, a prefill-sized call
    assert len(kernel_took_it) >= stats.verify_forwards * len(model.layers) + stats.drafted - len(model.mtp_layers)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_decode_rows_give_a_token_the_same_bits_alone_and_in_a_verify_step(bits):
    """A decode step (1 token) and an MTP verify step (several) must compute each token the same
    way, or greedy MTP could drift from plain decoding at a near tie."""
    generator = torch.Generator().manual_seed(bits)
    out_features, in_features = 256, 1024
    x = torch.randn(3, in_features, generator=generator).to(torch.bfloat16)
    if bits == 16:
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)

        def run(rows):
            return cpu.linear(rows, weight, float32_out=True)
    elif bits == 8:
        qweight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
        scales = torch.rand(out_features, generator=generator) / 50

        def run(rows):
            return quant.int8_linear(rows, qweight, scales)
    else:
        packed = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, generator=generator)
        scales = torch.rand(out_features, in_features // 128, generator=generator) / 50
        zeros = torch.full((out_features, in_features // 128), 8.0)

        def run(rows):
            return quant.int4_linear(rows, packed, scales, zeros, 128)
    together = run(x)
    assert torch.equal(together, torch.cat([run(x[i : i + 1]) for i in range(3)]))
