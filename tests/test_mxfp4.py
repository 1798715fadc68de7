"""MXFP4 (mimo_local/quant/mxfp4.py): the runtime dequantization equals the bit-field reference bit
for bit, and MiMo-V2.6's MXFP4 experts load as they are stored and compute what their float twin does."""

import json

import kernel_builds
from near_greedy import assert_near_greedy
import pytest
import torch
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.kernels import quant
from mimo_local.loader import load_model
from mimo_local.quant import mxfp4
from mimo_local.quant.linear import QuantLinear
from mimo_local.store.local import model_facts


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 differs from 0.0), NaN where NaN (payloads aside)."""
    nan = expected.isnan()
    bits = [tensor[~nan].view(torch.int32) for tensor in (actual, expected)]
    return torch.equal(actual.isnan(), nan) and torch.equal(*bits)


def test_every_byte_and_every_scale_dequantize_as_the_reference():
    packed = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # [256, 256]: every byte in every row
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 16)  # row r: scale byte r (255: NaN)
    expected = mxfp4.reference_dequantize(packed, scales)
    assert same_bits(mxfp4.dequantize(packed, scales), expected)
    # scale byte 127 = 1: byte 0x21 holds element 66 (low nibble 1: 0.5) and 67 (high nibble 2: 1.0)
    assert expected[127, 66:68].tolist() == [0.5, 1.0] and expected[127, 510:512].tolist() == [-6.0, -6.0]
    assert expected[255].isnan().all() and expected[254].isinf().any()  # 6 x 2^127 is past float32


@pytest.mark.parametrize("seed", range(3))
def test_random_blocks_dequantize_as_the_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (3, 5, 48), generator=generator, dtype=torch.uint8)  # 3 experts, 96 inputs
    scales = torch.randint(100, 140, (3, 5, 3), generator=generator, dtype=torch.uint8)
    expected = mxfp4.reference_dequantize(packed, scales)
    assert same_bits(mxfp4.dequantize(packed, scales), expected)
    assert same_bits(mxfp4.dequantize(packed, scales, torch.bfloat16).float(), expected.to(torch.bfloat16).float())


def test_expert_stack_runs_each_expert_on_its_dequantized_weights():
    generator = torch.Generator().manual_seed(7)
    stack = QuantLinear("mxfp4", 64, 8, experts=2, blocksize=mxfp4.BLOCK)
    stack.packed.copy_(torch.randint(0, 256, stack.packed.shape, generator=generator, dtype=torch.uint8))
    stack.scales.copy_(torch.randint(120, 130, stack.scales.shape, generator=generator, dtype=torch.uint8))
    x = torch.randn(3, 64, generator=generator)
    for expert in range(2):
        weight = mxfp4.reference_dequantize(stack.packed[expert], stack.scales[expert])
        exact = torch.nn.functional.linear(x, weight)
        got = stack.linear(x, expert)
        if quant.library() is None:  # no C compiler: dequantize + F.linear
            torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
            continue
        # the CPU kernel: x rounded to int8 per block of 32, its own summation order (both bounded
        # exactly in tests/test_mxfp4_kernels.py)
        same_arithmetic = quant.reference_mxfp4_q8_linear(x, stack.packed[expert], stack.scales[expert])
        torch.testing.assert_close(got, same_arithmetic, rtol=1e-5, atol=1e-5)
        assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.fixture(scope="module")
def v26(tmp_path_factory):
    root = tmp_path_factory.mktemp("v26")
    return make_checkpoint(root / "hub", "mimo_v2.6"), make_checkpoint(root / "twin", "mimo_v2.6", twin=True)


def test_v26_experts_load_as_stored_and_compute_like_the_float_twin(v26, decode_logits):
    hub, twin = v26
    ours, reference = load_model(hub), load_model(twin)
    for layer, twin_layer in zip(ours.layers[1:], reference.layers[1:]):
        group, twin_group = layer.mlp.groups[0], twin_layer.mlp.groups[0]
        for name in ("gate_up_proj", "down_proj"):
            stack, weights = getattr(group, name), getattr(twin_group, name)
            assert stack.kind == "mxfp4" and stack.packed.dtype == stack.scales.dtype == torch.uint8
            assert stack.packed.nbytes + stack.scales.nbytes == weights.numel() * 4.25 / 8  # no float copy
            for expert in range(len(group.experts)):
                assert torch.equal(stack.dequantize(expert), weights[expert].float())
    twin_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():  # everything else is the same
        assert torch.equal(param, twin_params[name]), name
    with kernel_builds.kernels(enabled=False):  # torch's float matmuls on both: the same weights
        ours_logits, twin_logits = decode_logits(ours, 5), decode_logits(reference, 5)
    torch.testing.assert_close(ours_logits, twin_logits, rtol=0, atol=1e-5)  # the float MoE sums in another order
    assert torch.equal(ours_logits.argmax(-1), twin_logits.argmax(-1))
    # the MXFP4 kernels on int8-rounded activations (tests/test_mxfp4_kernels.py): measured 0.05 at logits up to 4
    ours_logits, twin_logits = decode_logits(ours, 5), decode_logits(reference, 5)
    assert (ours_logits - twin_logits).abs().max() <= 0.02 * (1 + twin_logits.abs().max())
    assert torch.equal(ours_logits.argmax(-1), twin_logits.argmax(-1))


def test_v26_runs_plans_and_shows_its_parameters(v26):
    hub, twin = v26
    run = CliRunner().invoke(app, ["run", "-m", str(hub), "--temperature", "0", "-n", "8", "--json", "Hello"])
    assert run.exit_code == 0, run.output
    tokens = json.loads(run.stdout)["token_ids"]
    assert len(tokens) == 8
    assert_near_greedy(twin, "Hello", tokens)  # MXFP4 activations round to int8: tokens near the twin's best
    assert model_facts(hub).parameters == model_facts(twin).parameters  # packed bytes count two weights each
    plan = CliRunner().invoke(app, ["plan", str(hub), "--gpu-mem", "0", "--cpu-mem", "8GiB", "--ctx", "256", "--json"])
    report = json.loads(plan.stdout)
    assert "mxfp4 experts" in report["weights_format"]
    experts = 5 * 8 * 3 * 32 * 64  # MoE layers x experts x (gate, up, down) x 32 x 64 weights
    assert report["weight_bytes"]["cpu"]["experts"] == experts * 4.25 / 8
