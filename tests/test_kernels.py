"""CPU decode kernels against their pure-torch references."""

import kernel_builds
import pytest
import torch

from mimo_local import ops
from mimo_local.kernels import cpu
from mimo_local.loader import load_model

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C compiler on this machine")


@pytest.fixture(autouse=True, scope="module", params=kernel_builds.LEVELS)
def isa_build(request):
    """Every test of this file runs against each ISA build this CPU can run."""
    with kernel_builds.kernels(request.param):
        assert cpu.library().kernel_isa().decode() == request.param
        yield request.param


def ulp_close(got, expected, dtype):
    tolerance = 1e-4 if dtype == torch.float32 else 2 ** -7
    return ((got.float() - expected.float()).abs() <= tolerance * (1 + expected.float().abs())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 512, 256), (3, 130, 200), (16, 77, 1000)])
def test_linear_matches_reference(dtype, rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype) / in_features**0.5
    bias = torch.randn(out_features, generator=generator).to(dtype)
    assert cpu.supports(x, weight)
    assert ulp_close(cpu.linear(x, weight, bias), cpu.reference_linear(x, weight, bias), dtype)
    assert ulp_close(cpu.linear(x, weight), cpu.reference_linear(x, weight), dtype)


@pytest.mark.parametrize("rows", [2, 4, 5, 8, 11])
@pytest.mark.parametrize("width", [384, 200, 1003])
def test_rows_of_a_batch_equal_their_single_row_results_bit_for_bit(rows, width):
    """Several decode rows share each weight load (bfloat16; four rows a time with AVX512-BF16 at widths
    a multiple of 128, two elsewhere, tails included): every row's result is the one it gets alone,
    so a request's output does not depend on its batch."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=generator).bfloat16()
    weight = (torch.randn(96, width, generator=generator) / width**0.5).bfloat16()
    together = cpu.linear(x, weight, float32_out=True)
    alone = torch.cat([cpu.linear(x[i : i + 1], weight, float32_out=True) for i in range(rows)])
    assert torch.equal(together, alone)
    assert ulp_close(together, cpu.reference_linear(x, weight), torch.bfloat16)


def test_linear_falls_back_for_many_rows():
    x, weight = torch.randn(40, 64), torch.randn(32, 64)
    assert not cpu.supports(x, weight)
    assert torch.allclose(cpu.linear(x, weight), x @ weight.T, atol=1e-5)


@pytest.mark.parametrize("flags,emulated", [({"avx2", "fma"}, True), ({"avx512f", "avx512_bf16"}, False),
                                            ({"asimd"}, True), ({"asimd", "bf16"}, False)])
def test_bfloat16_prefill_goes_through_float32_where_the_cpu_has_no_bfloat16_instructions(monkeypatch, flags,
                                                                                          emulated):
    """Many-row bfloat16 matmuls (prefill) take float32 panels of the weight where torch's bfloat16 GEMM
    would be emulated; the result is the bfloat16 GEMM's arithmetic: float32 sums rounded once."""
    monkeypatch.setattr(cpu.build, "cpu_flags", lambda: frozenset(flags))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 300, generator=generator).bfloat16()
    weight = (torch.randn(cpu.PANEL_ROWS + 70, 300, generator=generator) / 300**0.5).bfloat16()
    bias = torch.randn(weight.shape[0], generator=generator).bfloat16()
    assert cpu.bfloat16_gemm_is_emulated(x, weight) == emulated
    assert not cpu.bfloat16_gemm_is_emulated(x.float(), weight.float())
    panels = cpu.bfloat16_linear_in_float32
    calls = []
    monkeypatch.setattr(cpu, "bfloat16_linear_in_float32", lambda *args, **kwargs: calls.append(1) or panels(*args, **kwargs))
    out, logits = cpu.linear(x, weight, bias), cpu.linear(x, weight, bias, float32_out=True)
    assert len(calls) == (2 if emulated else 0)
    expert = ops.expert_linear(weight[None], x[0], 0)  # a routed expert's tokens in a prefill: the same path
    assert len(calls) == (3 if emulated else 0)
    assert torch.equal(expert, cpu.linear(x[0], weight))
    exact = x.double() @ weight.double().T + bias.double()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 40, weight.shape[0])
    assert logits.dtype == torch.float32
    if emulated:  # float32 results are the float32 sums, not rounded to bfloat16 first
        assert torch.allclose(logits.double(), exact, rtol=1e-5, atol=1e-5)
    # one rounding of float32 sums: at most half a bfloat16 step from the exact value, plus the sums' error
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_matches_reference(dtype):
    generator = torch.Generator().manual_seed(0)
    experts, inter, hidden, tokens, top_k = 8, 48, 96, 3, 2
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=generator) / 10).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=generator) / 7).to(dtype)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    got = cpu.moe(x, gate_up, down, chosen, weights)
    expected = cpu.reference_moe(x, gate_up, down, chosen, weights)
    assert torch.allclose(got, expected, atol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("rows", [2, 300])  # a decode step; a prefill chunk (threaded kernel)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype, rows):
    from mimo_local.models.layers import RMSNorm

    norm = RMSNorm(200, 1e-5).to(dtype)
    norm.weight.data = torch.rand(200).to(dtype) + 0.5
    x = torch.randn(rows, 200).to(dtype) * 3
    fused = norm(x)
    reference = norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert ulp_close(fused, reference, dtype)


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_decode_identical_with_and_without_kernels(checkpoints, monkeypatch, family, decode_logits):
    """The fused decode path (kernels) and the plain torch path give the same logits step by step."""
    model = load_model(checkpoints(family))

    def decode(use_kernels):
        monkeypatch.setattr(cpu, "MAX_ROWS", 16 if use_kernels else 0)
        return decode_logits(model, seed=2)

    assert (decode(True) - decode(False)).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(dtype):
    gate_up = (torch.randn(3, 2 * 96) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert ulp_close(cpu.swiglu(gate_up), torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_mlp_equals_its_three_calls(dtype, rows):
    """One call for gate|up, SwiGLU and down gives exactly what the three separate kernels give."""
    generator = torch.Generator().manual_seed(rows)
    hidden, inter = 200, 136
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    gate_up = (torch.randn(2 * inter, hidden, generator=generator) / hidden**0.5).to(dtype)
    down = (torch.randn(hidden, inter, generator=generator) / inter**0.5).to(dtype)
    assert cpu.mlp_supports(x, gate_up, down)
    separate = cpu.linear(cpu.swiglu(cpu.linear(x, gate_up)), down)
    assert torch.equal(cpu.mlp(x, gate_up, down), separate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_logits_skip_the_rounding(dtype):
    x = torch.randn(1, 300).to(dtype)
    weight = (torch.randn(700, 300) / 300**0.5).to(dtype)
    logits = cpu.linear(x, weight, float32_out=True)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, x.float() @ weight.float().T, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_one_call_decoder_layer_equals_the_step_by_step_kernels(
    checkpoints, monkeypatch, family, dtype, decode_logits
):
    """The whole-layer kernel gives exactly the logits of the same layer run kernel by kernel
    (norm, qkv, attention, o_proj, norm, MLP or MoE), for decode and verify steps."""
    from mimo_local.ops import LayerPlan

    model = load_model(checkpoints(family), dtype)
    calls = []
    real = LayerPlan.run

    def decode(fused: bool):
        def layer(self, *args):
            calls.append(fused)
            return real(self, *args) if fused else None

        monkeypatch.setattr(LayerPlan, "run", layer)
        return decode_logits(model, seed=5)

    step_by_step, fused = decode(False), decode(True)
    assert calls.count(True) == 7 * len(model.layers)
    assert torch.equal(fused, step_by_step)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 4096, 151680])
def test_argmax_rows_picks_what_torch_argmax_picks(vocab):
    generator = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        logits = torch.randn(3, vocab, generator=generator)
        if trial % 3 == 0:
            logits = logits.round()  # many ties: the first index wins
        if trial % 4 == 0:
            logits[:, vocab // 2 :] = float("-inf")  # a draft vocabulary's unscored ids
        if trial == 5:
            logits[:] = float("-inf")
        assert cpu.argmax_rows(logits) == logits.argmax(dim=-1).tolist()
        assert cpu.argmax_rows(logits[1]) == [int(logits[1].argmax())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,sink", [(None, False), (6, True)])
def test_batch_attention_equals_each_sequence_alone(monkeypatch, dtype, window, sink):
    """One attention call for several sequences (a batch step: own caches, positions and row counts)
    gives each one bit for bit what its own decode-attention call gives, caches included, and what
    the torch ops give up to rounding."""
    import copy

    from mimo_local import ops
    from mimo_local.cache import make_layer_cache
    from mimo_local.config import AttentionSpec
    from mimo_local.models.layers import Attention, RotaryEmbedding

    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=32, v_head_dim=16, rope_theta=10000.0, rope_dim=16,
                         sliding_window=window, has_sink=sink, bias=True, value_scale=0.7 if sink else 1.0)
    torch.manual_seed(3)
    attention = Attention(64, spec, RotaryEmbedding(spec.rope_dim, spec.rope_theta)).to(dtype)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0, 0.3)
    prompts, lengths = [5, 11, 2], [1, 3, 1]  # each sequence's held positions, and its rows this step
    caches = [make_layer_cache(spec, 32, 4, 1, dtype, "cpu") for _ in prompts]
    with torch.inference_mode():
        for cache, held in zip(caches, prompts):
            attention(torch.randn(1, held, 64).to(dtype), 0, cache)
        x = torch.randn(1, sum(lengths), 64).to(dtype)
        qkv = attention.qkv_proj(x)

        def each_alone(use_kernel: bool):
            mine = copy.deepcopy(caches)
            with monkeypatch.context() as patch:
                if not use_kernel:
                    patch.setattr(cpu, "attention_supports", lambda *args: False)
                outs = [attention.attend_projected(part, start, cache)
                        for part, start, cache in zip(qkv.split(lengths, dim=1), prompts, mine)]
            return torch.cat(outs, dim=1), mine

        alone, alone_caches = each_alone(True)
        reference, _ = each_alone(False)
        batched_caches = copy.deepcopy(caches)
        batched = ops.decode_attention_batch(attention, qkv, prompts, lengths, batched_caches)
    assert batched is not None and torch.equal(batched, alone)
    for got, expected in zip(batched_caches, alone_caches):
        assert torch.equal(got.keys, expected.keys) and torch.equal(got.values, expected.values)
    difference = (batched.float() - reference.float()).abs().max()
    assert difference <= (1e-4 if dtype == torch.float32 else 0.05) * reference.float().abs().max()
