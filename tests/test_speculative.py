"""MTP speculative decoding: lossless greedy output, exact sampling, cache rollback."""

import dataclasses

import pytest
import torch

from mimo_local.dev.tiny import make_bigram_with_oracle_mtp
from mimo_local.errors import MimoError
from mimo_local.generate import SpeculativeDecoder, stream
from mimo_local.loader import load_model
from mimo_local.sampling import Sampler, SamplingSettings
from mimo_local.speculative import accept_drafts
from mimo_local.tokenizer import ChatTokenizer

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 3,  # longer than the tiny sliding window (8)
    "def f(x):\n    return x * 2\n",
    "Once upon a time there was a keyword argument",
]


def generate(model, tokenizer, prompt, draft_tokens=0, max_tokens=40, cache=None, draft_vocab=None, **sampling):
    settings = SamplingSettings(max_tokens=max_tokens, **({"temperature": 0} | sampling))
    events = list(stream(model, tokenizer, tokenizer.encode(prompt), settings, cache=cache, eos_ids=(),
                         draft_tokens=draft_tokens, draft_vocab=draft_vocab))
    return events[-1].stats


@pytest.fixture(scope="module", params=["mimo", "mimo_v2_flash"])
def family_model(request, checkpoints):
    directory = checkpoints(request.param)
    return request.param, directory, load_model(directory), ChatTokenizer(directory)


@pytest.mark.parametrize("draft_tokens", [1, 2, 3, 5])
def test_greedy_output_identical_with_mtp(family_model, draft_tokens):
    _, _, model, tokenizer = family_model
    for prompt in PROMPTS:
        plain = generate(model, tokenizer, prompt)
        speculative = generate(model, tokenizer, prompt, draft_tokens=draft_tokens)
        assert speculative.token_ids == plain.token_ids
        assert speculative.speculation.drafted <= draft_tokens * speculative.speculation.verify_forwards


@pytest.fixture(scope="module", params=["mimo", "mimo_v2_flash"])
def oracles(request, checkpoints, tmp_path_factory):
    source = checkpoints(request.param)
    made = {}
    for mode in ("copy", "negate"):
        directory = make_bigram_with_oracle_mtp(source, tmp_path_factory.mktemp(mode) / "ckpt", mtp=mode)
        made[mode] = (load_model(directory), ChatTokenizer(directory))
    return request.param, made


def test_drafts_accepted_at_every_position(oracles):
    family, made = oracles
    model, tokenizer = made["copy"]
    layers = len(model.mtp_layers)
    for draft_tokens in sorted({1, layers, layers + 1}):
        for prompt in PROMPTS:
            plain = generate(model, tokenizer, prompt, max_tokens=41)
            speculative = generate(model, tokenizer, prompt, draft_tokens=draft_tokens, max_tokens=41)
            assert speculative.token_ids == plain.token_ids
            stats = speculative.speculation
            assert stats.accepted == stats.drafted  # every draft taken
            assert stats.mean_accepted_length == draft_tokens + 1


def test_drafts_rejected_at_every_position(oracles):
    _, made = oracles
    model, tokenizer = made["negate"]
    for prompt in PROMPTS:
        plain = generate(model, tokenizer, prompt)
        speculative = generate(model, tokenizer, prompt, draft_tokens=2)
        assert speculative.token_ids == plain.token_ids
        assert speculative.speculation.accepted == 0
        assert speculative.speculation.mean_accepted_length == 1.0


def test_each_step_drafts_one_more_than_the_last_step_kept(oracles, monkeypatch):
    from mimo_local.speculative import MTPDrafter

    _, made = oracles
    depths = []
    draft = MTPDrafter.draft

    def recording(self, history, sampler, draft_tokens):
        depths.append(draft_tokens)
        return draft(self, history, sampler, draft_tokens)

    monkeypatch.setattr(MTPDrafter, "draft", recording)
    for mode, expected in (("copy", lambda steps: [3] * steps), ("negate", lambda steps: [3] + [1] * (steps - 1))):
        model, tokenizer = made[mode]
        depths.clear()
        stats = generate(model, tokenizer, PROMPTS[1], draft_tokens=3).speculation
        assert depths == expected(stats.verify_forwards) and stats.drafted == sum(depths)


def test_caches_after_rejections_equal_a_fresh_recompute(family_model):
    _, _, model, tokenizer = family_model
    prompt = PROMPTS[1]
    cache = model.new_cache(256, spare_slots=8)
    stats = generate(model, tokenizer, prompt, draft_tokens=3, cache=cache)
    assert stats.speculation.accepted < stats.speculation.drafted  # there were rejections
    everything = tokenizer.encode(prompt) + stats.token_ids
    assert cache.length == len(everything) - 1  # the newest token is not processed yet
    continued = model(torch.tensor([everything[-1:]]), cache).logits[0, -1]
    fresh = model(torch.tensor([everything]), model.new_cache(256)).logits[0, -1]
    assert (continued - fresh).abs().max().item() < 1e-4


def test_rejection_sampling_reproduces_the_target_distribution():
    """Tokens kept by accept_drafts follow the target distribution p, whatever the draft q is."""
    settings = SamplingSettings(temperature=1.0, top_p=1.0, seed=0)
    sampler = Sampler(settings)
    target = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    draft = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])  # deliberately unlike p
    history = torch.tensor([], dtype=torch.long)
    counts = torch.zeros(5)
    samples = 20000
    for _ in range(samples):
        token = int(torch.multinomial(draft, 1, generator=sampler.generator))
        kept = accept_drafts(target, [token], draft[None], sampler, history)
        counts[kept[0]] += 1
    empirical = counts / samples
    expected = torch.softmax(target[0], dim=-1)
    assert (empirical - expected).abs().sum().item() / 2 < 0.02  # total variation distance


def test_sampling_with_mtp_is_seeded_and_valid(family_model):
    _, _, model, tokenizer = family_model
    first = generate(model, tokenizer, PROMPTS[0], draft_tokens=2, temperature=0.8, seed=5)
    second = generate(model, tokenizer, PROMPTS[0], draft_tokens=2, temperature=0.8, seed=5)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 40


def test_draft_vocabulary_is_lossless(family_model):
    _, _, model, tokenizer = family_model
    for prompt in PROMPTS:
        plain = generate(model, tokenizer, prompt, repetition_penalty=1.3)
        limited = generate(model, tokenizer, prompt, draft_tokens=2, draft_vocab=300, repetition_penalty=1.3)
        assert limited.token_ids == plain.token_ids
    sampled = generate(model, tokenizer, PROMPTS[1], draft_tokens=2, draft_vocab=300, temperature=0.9,
                       repetition_penalty=1.3, seed=1)
    assert len(sampled.token_ids) == 40


def test_large_vocabularies_draft_over_their_frequent_ids_by_default(family_model, monkeypatch):
    from mimo_local.engine import DRAFT_VOCAB, Engine

    _, directory, model, tokenizer = family_model
    engine = Engine(model, tokenizer, directory)
    layers = len(model.mtp_layers)
    assert engine.speculation(None) == {"draft_tokens": layers, "draft_vocab": None}  # a tiny vocabulary: all of it
    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, vocab_size=151680))
    assert engine.speculation(None) == {"draft_tokens": layers, "draft_vocab": DRAFT_VOCAB}
    assert engine.speculation(None, draft_vocab=0)["draft_vocab"] is None  # 0: the whole vocabulary
    assert engine.speculation(True, 2, 500) == {"draft_tokens": 2, "draft_vocab": 500}
    assert engine.speculation(False) == {"draft_tokens": 0}


def test_draft_vocabulary_limits_the_drafts(family_model):
    _, _, model, tokenizer = family_model
    prompt = tokenizer.encode(PROMPTS[1])

    def drafts(vocab_limit):
        cache = model.new_cache(128)
        sampler = Sampler(SamplingSettings(temperature=0))
        decoder = SpeculativeDecoder(model, cache, sampler, 3, vocab_limit)
        # made with the decoder, before the timed decode (a float head's int8 rows take a while)
        vocabulary = decoder.drafter.vocabulary
        assert vocabulary is None if vocab_limit is None else vocabulary.first_rows is not None
        draft, made = decoder.drafter.draft, []

        def recording(history, sampler, draft_tokens):
            tokens, distributions = draft(history, sampler, draft_tokens)
            made.extend((token, set(history.tolist())) for token in tokens)  # with the ids used so far
            return tokens, distributions

        decoder.drafter.draft = recording
        history = torch.tensor(prompt)
        pending = decoder.first(prompt, history)
        for _ in range(8):
            history = torch.cat([history, torch.tensor(pending)])
            pending = decoder.next(history)
        return made

    assert all(token < 300 or token in used for token, used in drafts(300))
    assert any(token >= 300 and token not in used for token, used in drafts(None))


@pytest.mark.parametrize("head", [None, "int8", "int4", "nf4"])
def test_draft_vocabulary_scores_the_frequent_ids_and_those_of_the_conversation(checkpoints, head, tmp_path):
    from mimo_local.kernels.quant import dequantize_int8, quantize_int8
    from mimo_local.quant.linear import dequantized_linear_weight
    from mimo_local.speculative import DraftVocabulary, int8_first_rows

    recipe = tmp_path / "head.yaml"
    group = "\n    group_size: 32" if head == "int4" else ""
    recipe.write_text(f"name: head\nrules:\n  - match: '^lm_head\\.weight$'\n    scheme: {head}{group}\n")
    model = load_model(checkpoints("mimo"), torch.float32, quant=str(recipe) if head else None)
    assert head is None or model.lm_head.kind == head
    vocab_size = model.config.vocab_size
    vocabulary = DraftVocabulary(model.lm_head, 256, vocab_size, model.dtype)
    vocabulary.extend(torch.tensor([3, 700, 900, 700]))
    vocabulary.extend(torch.tensor([900, 1000]))
    assert vocabulary.extra_ids == [700, 900, 1000]
    hidden = torch.randn(1, 2, model.config.hidden_size)
    full, limited = model.mtp_logits(0, hidden), model.mtp_logits(0, hidden, vocabulary)
    scored = torch.zeros(vocab_size, dtype=torch.bool)
    scored[:256] = True
    scored[[700, 900, 1000]] = True
    assert limited.shape == full.shape and torch.isinf(limited[..., ~scored]).all()
    expected = full.clone()
    # An int8 / int4 head is read as it is; a float or nf4 head's first rows get an int8 copy, made once.
    assert (vocabulary.first_rows is None) == (head in ("int8", "int4"))
    if vocabulary.first_rows is not None:
        assert int8_first_rows(model.lm_head, 256) is vocabulary.first_rows
        normed = model.mtp_layers[0].final_norm(hidden)
        int8_scores = normed @ dequantize_int8(*quantize_int8(dequantized_linear_weight(model.lm_head)[:256])).T
        rescored = int8_scores.topk(DraftVocabulary.RESCORED, dim=-1).indices  # at the head's precision
        expected[..., :256] = int8_scores.scatter(-1, rescored, full[..., :256].gather(-1, rescored))
        assert torch.equal(limited[..., :256].argmax(-1), full[..., :256].argmax(-1))
    assert torch.allclose(limited[..., scored], expected[..., scored], atol=1e-4)


def test_heads_off_the_cpu_draft_from_their_own_rows():
    from mimo_local.models.layers import Linear
    from mimo_local.speculative import int8_first_rows

    assert int8_first_rows(Linear(64, 40, bias=False, device="meta"), 32) is None


def test_mtp_continues_a_conversation_on_the_same_cache(family_model):
    """Later turns (and a rewind to an earlier point, as chat's /regen does) reuse the cache with
    MTP on: the output equals plain decoding of the whole conversation from scratch."""
    _, _, model, tokenizer = family_model
    cache = model.new_cache(512, spare_slots=8)
    conversation: list[int] = []
    assert cache.drafter is None
    for turn, prompt in enumerate(PROMPTS):
        new_ids = tokenizer.encode(prompt)
        if turn == 2:  # rewind 3 positions (inside the sliding rings' spare slots) and go on from there
            conversation = conversation[: cache.length - 3]
            cache.truncate(len(conversation))
        prompt_ids = conversation[cache.length :] + new_ids  # starts with the last token never fed back
        settings = SamplingSettings(max_tokens=12, temperature=0)
        reused = list(stream(model, tokenizer, prompt_ids, settings, cache=cache, eos_ids=(), draft_tokens=2))
        reused = reused[-1].stats
        conversation = conversation + new_ids
        plain = list(stream(model, tokenizer, conversation, settings, eos_ids=()))[-1].stats
        assert reused.token_ids == plain.token_ids
        assert reused.speculation.verify_forwards > 0
        conversation += reused.token_ids
        assert cache.length == len(conversation) - 1


def test_mtp_refuses_a_cache_filled_without_it(family_model):
    _, _, model, tokenizer = family_model
    cache = model.new_cache(256)
    generate(model, tokenizer, PROMPTS[0], cache=cache, max_tokens=4)
    with pytest.raises(MimoError, match="MTP was off"):
        generate(model, tokenizer, PROMPTS[1], cache=cache, draft_tokens=2)


def test_drafts_stay_exact_on_a_continued_conversation(oracles):
    """With an MTP head that copies the target, every draft of a second turn on the same cache is
    accepted: the drafter picks up the right tokens and hidden states of the earlier turn."""
    _, made = oracles
    model, tokenizer = made["copy"]
    cache = model.new_cache(512, spare_slots=8)
    first = generate(model, tokenizer, PROMPTS[1], draft_tokens=2, cache=cache, max_tokens=20)
    settings = SamplingSettings(max_tokens=20, temperature=0)
    prompt_ids = first.token_ids[-1:] + tokenizer.encode(PROMPTS[3])
    second = list(stream(model, tokenizer, prompt_ids, settings, cache=cache, eos_ids=(), draft_tokens=2))[-1].stats
    assert second.speculation.accepted == second.speculation.drafted > 0


def test_int8_draft_scores_keep_the_heads_choice_between_near_ties():
    """Two head rows whose int8 copies are equal: the int8 scores tie (argmax would take the first),
    the head's own rows say the second is larger, and the draft must pick it."""
    from mimo_local.models.layers import Linear
    from mimo_local.speculative import DraftVocabulary

    hidden, vocab_size = 64, 40
    head = Linear(hidden, vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab_size, hidden, generator=torch.Generator().manual_seed(5)) * 0.1)
        head.weight[7] = head.weight[3] = torch.linspace(0.5, 1.0, hidden)
        head.weight[7, 10] += 1e-4  # far below the int8 step of 1/254, so both rows round alike
    x = torch.ones(1, 1, hidden)
    vocabulary = DraftVocabulary(head, 32, vocab_size, torch.float32)
    q, scales = vocabulary.first_rows
    assert torch.equal(q[3], q[7]) and scales[3] == scales[7]
    assert int(vocabulary.logits(x)[0, 0].argmax()) == 7 == int(head(x)[0, 0].argmax())
