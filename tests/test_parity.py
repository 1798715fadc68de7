"""Logit and greedy-token parity against the transformers reference implementations."""

import json
import shutil

import pytest
import torch

from mimo_local.checkpoint import Checkpoint, write_safetensors
from mimo_local.generate import DoneEvent, stream
from mimo_local.loader import load_model
from mimo_local.sampling import SamplingSettings
from mimo_local.tokenizer import ChatTokenizer

transformers = pytest.importorskip("transformers")

REFERENCE = {"mimo": "Qwen2ForCausalLM", "mimo_v2_flash": "MiMoV2FlashForCausalLM"}


def dequantized_copy(directory, out):
    """The checkpoint with FP8 weights dequantized to fp32, for a reference without FP8 kernels."""
    out.mkdir()
    checkpoint = Checkpoint(directory)
    tensors = {}
    for name, entry in checkpoint.entries.items():
        if name.endswith("_scale_inv"):
            continue
        tensors[name] = torch.empty(entry.shape, dtype=torch.float32)
        checkpoint.read_into(name, tensors[name])
    write_safetensors(out / "model.safetensors", tensors)
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(directory / name, out / name)
    return out


def reference_model(family, directory, tmp_path, fp8):
    if fp8:
        directory = dequantized_copy(directory, tmp_path / "dequantized")
    cls = getattr(transformers, REFERENCE[family])
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(reference, batch, new_tokens):
    """Plain argmax decoding with the reference's own KV cache (EOS does not stop it)."""
    out = reference(batch, use_cache=True)
    generated = []
    for _ in range(new_tokens):
        generated.append(int(out.logits[0, -1].argmax()))
        out = reference(torch.tensor([[generated[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


def prompt_ids(directory, length):
    tokenizer = ChatTokenizer(directory)
    text = "The quick brown fox jumps over the lazy dog while the keyword arguments are evaluated. " * 8
    ids = tokenizer.encode(text)
    assert len(ids) >= length
    return ids[:length]


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
@pytest.mark.parametrize("fp8", [False, True])
def test_logits_and_greedy_tokens_match_transformers(checkpoints, tmp_path, family, fp8):
    directory = checkpoints(family, fp8=fp8)
    ours = load_model(directory, torch.float32)
    reference = reference_model(family, directory, tmp_path, fp8)
    # 40 tokens: five times the tiny V2-Flash sliding window (8), so the ring buffer wraps.
    ids = prompt_ids(directory, 40)
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected = reference(batch).logits
    got = ours(batch, ours.new_cache(64), all_logits=True).logits
    assert (got - expected).abs().max().item() < 1e-4

    # Token-by-token decoding through the caches gives the same logits as the full pass.
    cache = ours.new_cache(64)
    ours(batch[:, :24], cache)
    for position in range(24, 40):
        step = ours(batch[:, position : position + 1], cache).logits[0, 0]
        assert (step - expected[0, position]).abs().max().item() < 1e-4

    new_tokens = 64
    reference_ids = reference_greedy(reference, batch, new_tokens)
    settings = SamplingSettings(temperature=0, max_tokens=new_tokens)
    events = list(stream(ours, ChatTokenizer(directory), ids, settings, eos_ids=()))
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].stats.token_ids == reference_ids


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_bf16_compute_is_as_accurate_as_the_reference_in_bf16(checkpoints, tmp_path, family):
    directory = checkpoints(family)
    ids = torch.tensor([prompt_ids(directory, 24)])
    exact = load_model(directory, torch.float32)
    half = load_model(directory, torch.bfloat16)
    reference = getattr(transformers, REFERENCE[family]).from_pretrained(directory, dtype=torch.bfloat16)
    truth = exact(ids, exact.new_cache(32), all_logits=True).logits
    ours = half(ids, half.new_cache(32), all_logits=True).logits
    with torch.no_grad():
        theirs = reference(ids).logits.float()
    our_error = (ours - truth).abs().mean().item()
    their_error = (theirs - truth).abs().mean().item()
    assert our_error <= 3 * their_error + 1e-3
    assert (ours.argmax(-1) == truth.argmax(-1)).float().mean().item() >= 0.8


@pytest.mark.parametrize("family, window", [("mimo", None), ("mimo_v2_flash", 100)])
def test_long_prompt_logits_match_transformers_across_window_and_chunk_boundaries(tmp_path, one_thread, family, window):
    """A 2,000-token prompt in uneven chunks (the fused and the few-query attention paths, chunks
    crossing the window and the query blocks) gives the reference's float32 logits at every position."""
    from mimo_local.dev.tiny import make_checkpoint

    overrides = {"mtp_layers": 0, **({"sliding_window_size": window} if window else {})}
    directory = make_checkpoint(tmp_path / "model", family, shards=1, overrides=overrides)
    ours = load_model(directory, torch.float32)
    reference = reference_model(family, directory, tmp_path, fp8=False)
    ids = torch.randint(0, 1000, (1, 2000), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits[0]
    cache = ours.new_cache(2048)
    bounds = [0, 512, 1024, 1031, 1500, 1512, 2000]
    got = torch.cat([ours(ids[:, a:b], cache, all_logits=True).logits[0] for a, b in zip(bounds, bounds[1:])])
    assert (got - expected).abs().max().item() < 1e-4
