"""C kernel or torch's own op per matmul shape (mimo_local/kernels/choice.py): measured once, kept on disk,
the same for a token alone and in a verify step."""

import time
from pathlib import Path

import kernel_builds
import pytest
import torch
import torch.nn.functional as F

from mimo_local.errors import MimoError
from mimo_local.kernels import choice, cpu, quant
from mimo_local.loader import load_model

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C compiler on this machine")


@pytest.fixture
def decisions_in(tmp_path, monkeypatch):
    """A fresh decision file under tmp_path, measurements counted (and answered by `answer`)."""
    monkeypatch.setattr(choice.build, "cache_dir", lambda: tmp_path)
    monkeypatch.delenv("MIMO_CPU_MATMUL", raising=False)
    choice._decisions.cache_clear()
    measured = []

    def set_answer(answer: bool):
        monkeypatch.setattr(choice, "measure", lambda ours, theirs: measured.append((ours, theirs)) or answer)
        return measured

    yield set_answer
    choice._decisions.cache_clear()


def test_a_shape_torch_wins_goes_to_torch_row_by_row_and_is_remembered(decisions_in, monkeypatch):
    measured = decisions_in(True)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 1024, generator=generator).bfloat16()
    x = torch.randn(3, 1024, generator=generator).bfloat16()
    together = cpu.linear(x, weight)
    assert len(measured) == 1
    ours, theirs = measured[0]
    ours(), theirs()  # the contenders are real one-token calls on this weight
    assert torch.equal(together, torch.cat([F.linear(x[i : i + 1], weight) for i in range(3)]))
    assert torch.equal(together, torch.cat([cpu.linear(x[i : i + 1], weight) for i in range(3)]))
    assert not cpu.mlp_supports(x, weight, weight)  # the fused MLP steps aside for the three calls
    assert len(measured) == 1  # measured once for the shape
    assert choice._read(choice.decisions_path()) == {f"linear-bfloat16:1024x1024:threads{torch.get_num_threads()}:"
                                                     f"{cpu.library().choice_key}": True}
    choice._decisions.cache_clear()  # a new process: the decision comes from disk
    monkeypatch.setattr(choice, "measure", lambda *args: pytest.fail("measured again"))
    assert cpu.torch_is_faster(weight)


def test_small_shapes_are_never_measured_and_stay_on_the_kernels(decisions_in):
    measured = decisions_in(True)
    weight, x = torch.randn(512, 1024).bfloat16(), torch.randn(2, 1024).bfloat16()
    assert torch.equal(cpu.linear(x, weight), cpu._kernel_linear(x, weight, None, False))
    assert not measured and not choice.decisions_path().exists()


def test_a_draft_vocabularys_growing_rows_share_one_decision(decisions_in):
    measured = decisions_in(False)
    weight = torch.randn(1300, 1024).bfloat16()
    for rows in (1100, 1200, 1300):
        cpu.linear(torch.randn(1, 1024).bfloat16(), weight[:rows], float32_out=True)
    assert len(measured) == 1 and choice.shape_class(1100, 1024) == "2048x1024"


def test_int8_where_torch_wins_runs_torchs_int8_op(decisions_in):
    decisions_in(True)
    generator = torch.Generator().manual_seed(1)
    qweight = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=generator)
    scales, bias = torch.rand(1024, generator=generator) / 64, torch.randn(1024, generator=generator)
    x = torch.randn(2, 1024, generator=generator).bfloat16()
    got = quant.int8_linear(x, qweight, scales, bias)
    rows = [torch._weight_int8pack_mm(x[i : i + 1], qweight, scales.bfloat16()) + bias.bfloat16() for i in range(2)]
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.cat(rows))


def test_the_measurement_picks_the_faster_side():
    slow = lambda: time.sleep(0.003)  # noqa: E731
    fast = lambda: None  # noqa: E731
    assert choice.measure(slow, fast) and not choice.measure(fast, slow)


def test_pinning_and_a_bad_mode(monkeypatch, decisions_in):
    measured = decisions_in(True)
    weight = torch.randn(1024, 1024).bfloat16()
    monkeypatch.setenv("MIMO_CPU_MATMUL", "kernels")
    assert not cpu.torch_is_faster(weight)
    monkeypatch.setenv("MIMO_CPU_MATMUL", "torch")
    assert cpu.torch_is_faster(torch.randn(8, 8))  # pinned: every shape, however small
    assert not measured
    monkeypatch.setenv("MIMO_CPU_MATMUL", "fastest")
    with pytest.raises(MimoError, match="MIMO_CPU_MATMUL must be one of measure, kernels, torch"):
        cpu.torch_is_faster(weight)


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_with_torch_preferred_a_token_gets_the_same_bits_alone_and_in_a_verify_step(checkpoints, monkeypatch, family):
    """Pinned to torch's matmuls (as a machine where torch wins everywhere would decide), the fused
    layer steps aside, and a verify step's logits equal those of the same tokens decoded one by one
    (MTP stays lossless); the logits stay close to the kernels' own."""
    model = load_model(checkpoints(family), torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(9))
    declined = []
    real_layer = cpu.decoder_layer

    def layer(*args, **kwargs):
        result = real_layer(*args, **kwargs)
        declined.append(result is None)
        return result

    monkeypatch.setattr(cpu, "decoder_layer", layer)

    def logits():
        one_by_one, verify = model.new_cache(64), model.new_cache(64)
        model(ids[:, :20], one_by_one)
        model(ids[:, :20], verify)
        alone = torch.cat([model(ids[:, i : i + 1], one_by_one).logits for i in range(20, 24)], dim=1)
        return alone, model(ids[:, 20:24], verify, all_logits=True).logits

    with kernel_builds.kernels():
        monkeypatch.setenv("MIMO_CPU_MATMUL", "torch")
        alone, together = logits()
        assert declined and all(declined)
        assert torch.equal(alone, together)
        monkeypatch.setenv("MIMO_CPU_MATMUL", "kernels")
        kernels_alone, _ = logits()
    assert ((alone.float() - kernels_alone.float()).abs() <= 0.05 * (1 + kernels_alone.float().abs())).all()


def test_a_changed_kernel_build_or_torch_is_measured_again(decisions_in, monkeypatch):
    """Decisions are kept per kernel build (its compiled file: source, compiler, flags) and torch
    version: a rebuilt kernel does not inherit the old one's verdict."""
    measured = decisions_in(True)
    weight = torch.randn(1024, 1024).bfloat16()
    key = cpu.library().choice_key
    assert Path(cpu.library()._name).stem in key and torch.__version__ in key
    assert cpu.torch_is_faster(weight) and len(measured) == 1
    monkeypatch.setattr(cpu.library(), "choice_key", key.replace(Path(cpu.library()._name).stem, "cpu_linear-rebuilt"))
    cpu.torch_is_faster(weight)
    assert len(measured) == 2
