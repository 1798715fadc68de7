"""The MoE router in one C call (quant.route) and a decode step's routing + quantized experts added
to the layer output in one call (quant.RoutedExperts): the router's torch ops, and route + moe_pairs
+ the bfloat16 add, bit for bit where the arithmetic is ours."""

import dataclasses

import pytest
import torch

from mimo_local import ops
from mimo_local.config import MoESpec
from mimo_local.kernels import cpu, quant
from mimo_local.models.layers import MoE, Router
from mimo_local.quant import mxfp4

pytestmark = pytest.mark.skipif(quant.library() is None, reason="no C compiler on this machine")

SPECS = {
    "v2-flash": MoESpec(num_experts=16, experts_per_token=4, intermediate_size=64, norm_topk_prob=True,
                        routed_scaling_factor=1.0, n_group=1, topk_group=1),
    "grouped, scaled": MoESpec(num_experts=16, experts_per_token=3, intermediate_size=64, norm_topk_prob=False,
                               routed_scaling_factor=2.5, n_group=4, topk_group=2),
}


def router(spec: MoESpec, hidden: int, generator) -> Router:
    module = Router(hidden, spec)
    with torch.no_grad():
        module.weight.copy_(torch.randn(spec.num_experts, hidden, generator=generator) / hidden**0.5)
        module.e_score_correction_bias.copy_(torch.randn(spec.num_experts, generator=generator) * 0.1)
    return module


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("tokens", [1, 7])
def test_the_routing_kernel_gives_the_torch_ops_experts_and_weights(name, tokens, monkeypatch):
    generator = torch.Generator().manual_seed(tokens)
    module = router(SPECS[name], 96, generator)
    x = torch.randn(tokens, 96, generator=generator).bfloat16()
    calls = []
    real = quant.route
    monkeypatch.setattr(quant, "route", lambda *args: calls.append(1) or real(*args))
    experts, weights = module(x)
    assert calls, "the routing kernel did not run"
    monkeypatch.setattr(quant, "route_supports", lambda *args: False)
    expected_experts, expected_weights = module(x)
    assert torch.equal(experts, expected_experts)
    # the sigmoid's exp and the sum's order are the only differences from torch's ops
    assert torch.allclose(weights, expected_weights, rtol=1e-6, atol=0)


def test_grouped_routing_keeps_to_the_best_groups():
    spec = SPECS["grouped, scaled"]
    module = router(spec, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():  # group 2 (experts 8-11) and group 0 (0-3) score highest through the bias
        module.e_score_correction_bias.copy_(torch.tensor([5.0, 4, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0, 0]))
    experts, _ = module(torch.randn(2, 32))
    assert experts[:, 0].tolist() == [8, 8] and experts[:, 1].tolist() == [0, 0]
    assert set(experts[:, 2].tolist()) <= {1, 2, 3, 9, 10, 11}  # expert 12 (group 3) is out


def stacks(kind: str, experts: int, hidden: int, inter: int, generator):
    def stack(out_features, in_features):
        if kind == "bf16":
            return (torch.randn(experts, out_features, in_features, generator=generator).bfloat16() / 8,)
        if kind == "mxfp4":
            packed = torch.randint(0, 256, (experts, out_features, in_features // 2), generator=generator,
                                   dtype=torch.uint8)
            scales = torch.randint(118, 126, (experts, out_features, in_features // mxfp4.BLOCK),
                                   generator=generator, dtype=torch.uint8)
            return packed, scales
        if kind == "int8":
            q = torch.randint(-127, 128, (experts, out_features, in_features), generator=generator, dtype=torch.int8)
            return q, torch.rand(experts, out_features, generator=generator) / 256
        packed = torch.randint(0, 256, (experts, out_features, in_features // 2), generator=generator,
                               dtype=torch.uint8)
        shape = (experts, out_features, in_features // 128)
        return packed, torch.rand(*shape, generator=generator) / 32, torch.rand(*shape, generator=generator) * 15

    return stack(2 * inter, hidden), stack(hidden, inter)


@pytest.mark.parametrize("kind", ["bf16", "mxfp4", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_routed_experts_add_route_then_moe_pairs_rounded_to_bfloat16(kind, tokens):
    generator = torch.Generator().manual_seed(tokens)
    spec = dataclasses.replace(SPECS["v2-flash"], intermediate_size=256)
    hidden, group = 256, {"bf16": 0, "mxfp4": mxfp4.BLOCK, "int8": 0, "int4": 128}[kind]
    module = router(spec, hidden, generator)
    gate_up, down = stacks(kind, spec.num_experts, hidden, spec.intermediate_size, generator)
    h = torch.randn(1, tokens, hidden, generator=generator).bfloat16()
    normed = torch.randn(1, tokens, hidden, generator=generator).bfloat16()

    experts, weights = quant.route(normed[0], module.weight, module.e_score_correction_bias, spec)
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    pairs = flat[order], order // spec.experts_per_token, weights.reshape(-1)[order]
    if kind == "bf16":
        moe_out = cpu.moe_pairs(normed[0], gate_up[0], down[0], *pairs)
    else:
        moe_out = quant.moe_pairs(normed[0], kind, group, gate_up, down, *pairs)
    expected = h + moe_out.to(torch.bfloat16)

    routed = quant.RoutedExperts(module.weight, module.e_score_correction_bias, spec, kind, group, gate_up, down)
    got = h.clone()
    assert routed.add_to(got, normed)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("preset", ["mimo_v2.6", "mimo_v2_flash"])
@pytest.mark.parametrize("recording", [False, True])
def test_bfloat16_decode_steps_take_the_routed_experts_call_with_the_step_by_step_bits(tmp_path, monkeypatch,
                                                                                     decode_logits, threads, preset,
                                                                                     recording):
    """Tiny MiMo-V2.6 (MXFP4 experts) and V2-Flash (FP8 experts, bfloat16 once loaded) in bfloat16:
    every MoE layer of every decode and verify step is one RoutedExperts call, and the logits equal
    those of the router and experts run as MoE runs them (route, the experts' kernel, then the
    bfloat16 add). With router statistics recorded (as every Engine does), the counts are MoE's too."""
    from mimo_local.dev.tiny import make_checkpoint
    from mimo_local.loader import load_model
    from mimo_local.offload.hotness import recorded, start_recording

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(make_checkpoint(tmp_path / preset, preset), torch.bfloat16)
        moe_layers = sum(isinstance(layer.mlp, MoE) for layer in model.layers)
        assert moe_layers
        if recording:
            start_recording(model)
        calls = []
        real = quant.RoutedExperts.add_to
        monkeypatch.setattr(quant.RoutedExperts, "add_to", lambda *args: calls.append(1) or real(*args))
        fused = decode_logits(model, seed=4)
        fused_counts = recorded(model).counts if recording else None
        assert len(calls) == 7 * moe_layers  # 6 decode steps and a 4-token verify step
        for layer in model.layers:
            layer.kernel_plan = None
        monkeypatch.setattr(ops, "routed_experts", lambda *args: None)
        calls.clear()
        step_by_step = decode_logits(model, seed=4)
        assert not calls
        assert torch.equal(fused, step_by_step)
        if recording:
            assert fused_counts == recorded(model).counts
            assert sum(sum(layer) for layer in fused_counts.values()) > 0
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float_experts_shared_by_a_batchs_tokens_give_each_token_its_own_bits(dtype, one_thread):
    """cpu.moe_pairs runs the tokens that chose one expert through its rows together: each token's
    output is the one it gets alone."""
    generator = torch.Generator().manual_seed(7)
    experts, hidden, inter, top_k, tokens = 8, 256, 128, 3, 6
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=generator) / 8).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=generator) / 8).to(dtype)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    chosen = torch.tensor([[0, 1, 2 + t] for t in range(tokens)])  # experts 0 and 1 shared by all six
    weights = torch.rand(tokens, top_k, generator=generator)

    def pairs(rows):
        flat = chosen[rows].reshape(-1)
        order = flat.argsort(stable=True)
        return flat[order], order // top_k, weights[rows].reshape(-1)[order]

    together = cpu.moe_pairs(x, gate_up, down, *pairs(list(range(tokens))))
    for t in range(tokens):
        alone = cpu.moe_pairs(x[t : t + 1], gate_up, down, *pairs([t]))
        assert torch.equal(together[t], alone[0]), t
