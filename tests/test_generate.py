"""The one generator: sampling controls, stop strings, EOS, incremental UTF-8 text."""

import pytest
import torch

from mimo_local.generate import DoneEvent, StopMatcher, stream
from mimo_local.loader import load_model
from mimo_local.sampling import SamplingSettings, draw, keep_top_p, penalize_repetition, probabilities
from mimo_local.tokenizer import ChatTokenizer, IncrementalDetokenizer


@pytest.fixture(scope="module")
def tiny(checkpoints):
    directory = checkpoints("mimo")
    return load_model(directory), ChatTokenizer(directory)


def run(tiny, settings, prompt="Hello world", eos_ids=()):
    model, tokenizer = tiny
    events = list(stream(model, tokenizer, tokenizer.encode(prompt), settings, eos_ids=eos_ids))
    assert isinstance(events[-1], DoneEvent)
    return events[:-1], events[-1].stats


def test_seeded_sampling_is_reproducible_and_differs_by_seed(tiny):
    _, a = run(tiny, SamplingSettings(temperature=1.0, top_p=1.0, seed=7, max_tokens=24))
    _, b = run(tiny, SamplingSettings(temperature=1.0, top_p=1.0, seed=7, max_tokens=24))
    _, c = run(tiny, SamplingSettings(temperature=1.0, top_p=1.0, seed=8, max_tokens=24))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_top_k_one_is_greedy(tiny):
    _, greedy = run(tiny, SamplingSettings(temperature=0, max_tokens=16))
    _, top1 = run(tiny, SamplingSettings(temperature=1.5, top_k=1, seed=3, max_tokens=16))
    assert greedy.token_ids == top1.token_ids and greedy.finish_reason == "length"


def test_streamed_text_is_the_decoded_tokens(tiny):
    events, stats = run(tiny, SamplingSettings(temperature=0.8, seed=1, max_tokens=40))
    text = "".join(e.text for e in events)
    assert text == stats.text == tiny[1].decode(stats.token_ids)
    assert stats.completion_tokens == 40 and stats.decode_tokens_per_s > 0 and stats.prefill_tokens_per_s > 0


def test_eos_stops_and_is_reported(tiny):
    _, free = run(tiny, SamplingSettings(temperature=0, max_tokens=10))
    eos = free.token_ids[3]
    _, stopped = run(tiny, SamplingSettings(temperature=0, max_tokens=10), eos_ids=(eos,))
    assert stopped.token_ids == free.token_ids[:4] and stopped.finish_reason == "stop"


def test_stop_string_cuts_text_and_is_never_shown(tiny):
    _, free = run(tiny, SamplingSettings(temperature=0, max_tokens=30))
    stop = free.text[10:14]
    events, stopped = run(tiny, SamplingSettings(temperature=0, max_tokens=30, stop=[stop]))
    shown = "".join(e.text for e in events)
    assert stopped.finish_reason == "stop"
    assert shown == stopped.text == free.text[: free.text.find(stop)]


def test_stop_matcher_holds_back_partial_matches():
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("abc</e") == ("abc", False)
    assert matcher.feed("x") == ("</ex", False)
    assert matcher.feed("</en") == ("", False)
    assert matcher.feed("d>tail") == ("", True)
    assert matcher.text == "abc</ex"


def test_incremental_detokenizer_waits_for_complete_utf8(checkpoints):
    tokenizer = ChatTokenizer(checkpoints("mimo"))
    text = "naïve café — 日本語 ok"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_a_stray_byte_repeated_does_not_hold_the_stream_back(checkpoints):
    """Greedy decoding on a random model can repeat a lone UTF-8 continuation byte: the text goes out
    (as U+FFFD) once no character can complete it, not at the end of the answer."""
    tokenizer = ChatTokenizer(checkpoints("mimo"))
    stray = next(i for i in range(300) if tokenizer.decode([i]) == "\ufffd")
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(stray) for _ in range(12)]
    assert pieces[:3] == [""] * 3 and all(piece for piece in pieces[3:])
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode([stray] * 12)
    text = "日本語 then a stray byte"
    pieces = [detokenizer.add(i) for i in tokenizer.encode(text)] + [detokenizer.flush()]
    assert "".join(pieces) == text


def test_sampling_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    top_k = probabilities(logits, SamplingSettings(temperature=1.0, top_k=2, top_p=1.0))
    assert top_k[2:].sum() == 0 and torch.isclose(top_k.sum(), torch.tensor(1.0))
    top_p = probabilities(logits, SamplingSettings(temperature=1.0, top_p=0.7))
    assert top_p[0] > 0 and top_p[1] > 0 and top_p[2:].sum() == 0
    min_p = probabilities(logits, SamplingSettings(temperature=1.0, top_p=1.0, min_p=0.3))
    assert (min_p > 0).tolist() == [True, True, False, False]
    penalized = penalize_repetition(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0)
    assert penalized.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0, 50.0])  # flat (cut inside a log-probability bin) to peaked
def test_top_p_equals_a_full_sort(spread):
    generator = torch.Generator().manual_seed(int(spread * 10))
    probs = torch.softmax(torch.randn(3, 151680, generator=generator) * spread, dim=-1)
    peaked = spread == 50.0  # the 256 likeliest tokens hold top_p: the candidate path; else the bins
    assert bool((probs.topk(256).values.sum(-1) > 0.95).all()) == peaked
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    limit = 0.95 * sorted_probs.sum(-1, keepdim=True)
    expected = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(mass_before > limit, 0.0))
    got = keep_top_p(probs, 0.95)
    # Only a token right at the cut may land on the other side, by float rounding of the sums.
    differ = (got > 0) != (expected > 0)
    at_cut = torch.zeros_like(probs).scatter_(-1, order, (mass_before - limit).abs()) < 1e-5
    assert differ.sum() <= 3 and bool(at_cut[differ].all())
    assert torch.equal(got[~differ], expected[~differ])


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    probs = torch.zeros(151680)
    probs[[5, 70000, 151679]] = torch.tensor([0.2, 0.5, 0.3])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(4000)]), minlength=151680)
    assert counts.sum() == counts[[5, 70000, 151679]].sum()
    assert torch.allclose(counts[[5, 70000, 151679]] / 4000, probs[[5, 70000, 151679]], atol=0.03)


def test_chat_template_renders_chatml(checkpoints):
    tokenizer = ChatTokenizer(checkpoints("mimo"))
    text = tokenizer.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<think>hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<think>hi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.token_id("<|im_start|>")
    # <think> is plain text: several ordinary tokens, not one special token.
    assert tokenizer.token_id("<think>") is None
