"""Continuous batching: sequences decoded together, one forward per step, give each sequence the
tokens it gets alone (greedy and seeded sampling), whatever joins or leaves the batch."""

import pytest
import torch

from mimo_local.budget import PREFILL_CHUNK, PREFILL_STEP
from mimo_local.dev.tiny import make_bigram_with_oracle_mtp
from mimo_local.engine import Engine
from mimo_local.generate import Batch, DoneEvent, Generation, TokenEvent
from mimo_local.sampling import SamplingSettings
from mimo_local.speculative import SpeculationSwitch


def alone(engine, prompt, settings, **options):
    events = list(engine.stream(prompt, settings, **options))
    return [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0], events[-1].stats


def run_batched(engine, requests, joins, batch=None, **options):
    """`requests`: (prompt ids, settings); `joins[i]`: the step at which request i joins; `options`:
    Generation's (draft_tokens, ...)."""
    batch, produced, done, step = batch or Batch(), {}, {}, 0
    generations = {}
    while len(done) < len(requests):
        for index, (prompt, settings) in enumerate(requests):
            if joins[index] == step:
                generation = Generation(engine.model, engine.tokenizer, prompt, settings, **options)
                generations[index] = generation
                produced[index] = []
                batch.join(generation)
        for generation, events in batch.step() if batch.generations else []:
            index = next(i for i, g in generations.items() if g is generation)
            record(index, events, produced, done)
        step += 1
    return produced, done


def record(index, events, produced, done):
    for event in events:
        if isinstance(event, DoneEvent):
            done[index] = event.stats
        elif event.token_id >= 0:
            produced[index].append(event.token_id)


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_batched_sequences_equal_their_single_runs(checkpoints, family):
    engine = Engine.load(checkpoints(family), device="cpu", dtype="float32")
    generator = torch.Generator().manual_seed(3)
    # 1100: a prompt prefilled in three chunks while the others decode
    prompts = [torch.randint(5, 900, (length,), generator=generator).tolist() for length in (5, 17, 1100, 30, 3, 12)]
    settings = [
        SamplingSettings(temperature=0, max_tokens=12),
        SamplingSettings(temperature=0, max_tokens=5),
        SamplingSettings(temperature=0.8, top_p=0.9, seed=11, max_tokens=14),
        SamplingSettings(temperature=0, max_tokens=20, repetition_penalty=1.3),
        SamplingSettings(temperature=1.0, top_k=20, seed=5, max_tokens=9),
        SamplingSettings(temperature=0, max_tokens=16, stop=["the"]),
    ]
    requests = list(zip(prompts, settings))
    produced, done = run_batched(engine, requests, joins=[0, 0, 2, 3, 3, 7])
    for index, (prompt, setting) in enumerate(requests):
        expected, stats = alone(engine, prompt, setting)
        assert produced[index] == expected, index
        assert done[index].finish_reason == stats.finish_reason and done[index].text == stats.text


def test_a_batch_forward_equals_one_forward_per_sequence(checkpoints):
    engine = Engine.load(checkpoints("mimo_v2_flash"), device="cpu", dtype="float32")
    model = engine.model
    caches, singles = [], []
    for length in (3, 140, 20):  # 140: past the sliding window (ring buffers wrap)
        ids = torch.arange(length).remainder(800).add(7).view(1, -1)
        cache, single = model.new_cache(256), model.new_cache(256)
        model(ids, cache)
        model(ids, single)
        caches.append(cache)
        singles.append(single)
    tokens = [torch.tensor([11]), torch.tensor([22, 23, 24, 25]), torch.tensor([33, 34])]  # a decode, two verifies
    batched = model.forward_batch(tokens, caches)
    for ids, out, single, cache in zip(tokens, batched, singles, caches):
        alone_out = model(ids.view(1, -1), single, all_logits=True)
        torch.testing.assert_close(out.logits, alone_out.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.hidden, alone_out.hidden, rtol=1e-5, atol=1e-5)
        assert cache.length == single.length and torch.equal(cache.token_ids, single.token_ids)


class Alternating:
    """A speculation switch that drafts every other step: speculation pauses and resumes."""

    def __init__(self):
        self.steps = 0

    def drafts(self, sequences):
        self.steps += 1
        return self.steps % 2 == 1

    def record(self, *measured):
        pass


@pytest.fixture(scope="module", params=["mimo", "mimo_v2_flash"])
def family_checkpoints(request, checkpoints, tmp_path_factory):
    """(random tiny checkpoint: drafts rejected; its bigram copy whose MTP layers copy the target:
    drafts accepted)."""
    source = checkpoints(request.param)
    return source, make_bigram_with_oracle_mtp(source, tmp_path_factory.mktemp("oracle") / "ckpt", mtp="copy")


@pytest.mark.parametrize("weights", ["random", "oracle"])
@pytest.mark.parametrize("switch", [None, "alternating"])
def test_batched_mtp_sequences_equal_their_single_runs_with_and_without_mtp(family_checkpoints, weights, switch):
    engine = Engine.load(family_checkpoints[weights == "oracle"], device="cpu", dtype="float32")
    draft_tokens = len(engine.model.mtp_layers) + 1  # the last one chained
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, 900, (length,), generator=generator).tolist() for length in (5, 40, 600, 12, 3)]
    settings = [
        SamplingSettings(temperature=0, max_tokens=14),
        SamplingSettings(temperature=0, max_tokens=6, repetition_penalty=1.3),
        SamplingSettings(temperature=0, max_tokens=18),
        SamplingSettings(temperature=0.8, top_p=0.9, seed=11, max_tokens=12),  # seeded: drafts at every step
        SamplingSettings(temperature=0, max_tokens=16, stop=["the"]),
    ]
    requests = list(zip(prompts, settings))
    batch = Batch(Alternating() if switch else None)
    produced, done = run_batched(engine, requests, joins=[0, 0, 1, 4, 6], batch=batch, draft_tokens=draft_tokens)
    drafted = sum(stats.speculation.drafted for stats in done.values())
    accepted = sum(stats.speculation.accepted for stats in done.values())
    assert drafted > 0 and (accepted > drafted // 2 if weights == "oracle" else accepted < drafted)
    for index, (prompt, setting) in enumerate(requests):
        with_mtp, stats = alone(engine, prompt, setting, draft_tokens=draft_tokens)
        assert produced[index] == with_mtp, index
        assert done[index].finish_reason == stats.finish_reason and done[index].text == stats.text
        if setting.greedy:
            assert produced[index] == alone(engine, prompt, setting)[0], index


def test_the_switch_runs_the_faster_mode_per_batch_size_and_retries_the_other():
    switch = SpeculationSwitch()

    def steps(sequences, count, drafting_seconds, plain_seconds=0.01, accepted=2):
        """Run `count` steps at a batch size whose steps take these times; returns the modes chosen."""
        chosen = []
        for _ in range(count):
            drafts = switch.drafts(sequences)
            tokens = sequences * (accepted if drafts else 1)
            switch.record(sequences, drafts, tokens, drafting_seconds if drafts else plain_seconds)
            chosen.append(drafts)
        return chosen

    retry = switch.RETRY_EVERY
    assert steps(1, 3, 0.012) == [True, True, False]  # measured first: a warm-up drafting step, one more, a plain one
    assert switch.gain[1] > 0  # two tokens in 1.2x the time pay
    four = steps(4, retry, 0.03)  # a size not measured yet follows the nearest measured one until its retry
    assert four == [True] * (retry - 1) + [False] and switch.gain[4] < 0  # two tokens in 3x the time do not
    four = steps(4, 4 * retry, 0.03)
    assert 4 <= four.count(True) <= 8  # plain, but for two drafting steps a retry (the first one warms up)
    one = steps(1, 4 * retry, 0.012)
    assert 2 <= one.count(False) <= 4  # drafting, but for one plain step a retry
    steps(4, 8 * retry, 0.015)  # the text gets easier to draft: at 4 sequences drafts pay again
    assert steps(4, 4 * retry, 0.015).count(False) <= 4


def test_prompts_waiting_together_are_prefilled_in_one_step_up_to_the_step_budget(checkpoints):
    """Prompts that arrive together start decoding together (their first tokens come out of one
    step), as many whole chunks as fit PREFILL_STEP tokens; the next step takes the rest."""
    engine = Engine.load(checkpoints("mimo"), device="cpu", dtype="float32")
    settings = SamplingSettings(temperature=0, max_tokens=4)
    # the fourth fills the budget but 5 tokens: the fifth waits for the next step
    lengths = [PREFILL_CHUNK + 10, 7, 30, PREFILL_STEP - (PREFILL_CHUNK + 10) - 7 - 30 - 5, 20, 9]
    batch = Batch()
    generations = [Generation(engine.model, engine.tokenizer, [5 + i % 800 for i in range(length)], settings)
                   for length in lengths]
    for generation in generations:
        batch.join(generation)
    first = {id(g) for g, events in batch.step() if any(isinstance(e, TokenEvent) for e in events)}
    assert first == {id(g) for g in generations[:4]}
    second = [g for g, events in batch.step() if any(isinstance(e, TokenEvent) for e in events)]
    assert {id(g) for g in generations[4:]} <= {id(g) for g in second} and not batch.prefilling


def test_a_prompt_longer_than_the_step_budget_runs_one_budget_per_step(checkpoints):
    engine = Engine.load(checkpoints("mimo"), device="cpu", dtype="float32")
    generation = Generation(engine.model, engine.tokenizer, [5 + i % 800 for i in range(PREFILL_STEP + 3)],
                            SamplingSettings(temperature=0, max_tokens=2))
    batch = Batch()
    batch.join(generation)
    assert batch.step() == [] and generation.cache.length == PREFILL_STEP
    assert [g for g, _ in batch.step()] == [generation] and generation.cache.length == PREFILL_STEP + 3


def test_rope_tables_of_a_batchs_positions_are_made_once_per_step_and_equal_fresh_ones():
    """Every layer asks for each sequence's positions in turn: the tables of all of them are kept (a
    bounded number), not only the last one, and equal the ones made afresh."""
    from mimo_local.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(16, 10000.0)
    starts = [3, 40, 7, 900]
    first = [rope.cos_sin(start, 1, torch.float32) for start in starts]
    for _ in range(3):  # the next layers
        assert all(rope.cos_sin(start, 1, torch.float32)[0] is tables[0] for start, tables in zip(starts, first))
    for start, (cos, sin) in zip(starts, first):
        fresh = RotaryEmbedding(16, 10000.0).cos_sin(start, 1, torch.float32)
        assert torch.equal(cos, fresh[0]) and torch.equal(sin, fresh[1])
    for start in range(1000, 1000 + RotaryEmbedding.KEPT_TABLES):
        rope.cos_sin(start, 1, torch.float32)
    assert len(rope._tables) == RotaryEmbedding.KEPT_TABLES
    again = rope.cos_sin(3, 1, torch.float32)
    assert again[0] is not first[0][0] and torch.equal(again[0], first[0][0])


GROUP_SIZED = {  # every projection input a multiple of 128, so the fused quantized layers apply
    "mimo": dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2),
    "mimo_v2_flash": dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, head_dim=96,
                          v_head_dim=32, moe_intermediate_size=128),
}


@pytest.mark.parametrize("family,dtype,quant", [
    ("mimo", "float32", None), ("mimo", "bfloat16", None), ("mimo_v2_flash", "float32", None),
    ("mimo_v2_flash", "bfloat16", None), ("mimo", "bfloat16", "int4-g128"), ("mimo", "bfloat16", "int8"),
    ("mimo_v2_flash", "bfloat16", "v2flash-mixed"),
])
def test_a_batch_step_runs_each_layer_in_one_call_with_the_step_by_step_numbers(checkpoints, tmp_path, monkeypatch,
                                                                               family, dtype, quant):
    """The decoder layers of a batch step run as one kernel call for all of its sequences (per-row
    caches and positions; float or quantized weights) and give bit for bit the outputs and caches
    of the layers run step by step (norms, projections, each sequence's attention, MLP or MoE)."""
    from mimo_local.dev.tiny import make_checkpoint
    from mimo_local.kernels import cpu, quant as quant_kernels
    from mimo_local.ops import LayerPlan

    # the kernels on every projection, whatever torch measures on these tiny shapes here
    monkeypatch.setattr(cpu, "torch_is_faster", lambda *args: False)
    monkeypatch.setattr(quant_kernels, "int8_torch_is_faster", lambda *args: False)
    path = checkpoints(family) if quant is None else make_checkpoint(tmp_path / family, family,
                                                                     overrides=GROUP_SIZED[family])
    model = Engine.load(path, device="cpu", dtype=dtype, quant=quant).model
    caches = {True: [], False: []}
    for length in (3, 140, 20):  # 140: past the sliding window (ring buffers wrap)
        ids = torch.arange(length).remainder(800).add(7).view(1, -1)
        for fused in caches:
            caches[fused].append(model.new_cache(256))
            model(ids, caches[fused][-1])
    calls = []
    real = LayerPlan.run

    def step(fused: bool):
        def run(self, *args):
            out = real(self, *args) if fused else None
            calls.append(out is not None)
            return out

        monkeypatch.setattr(LayerPlan, "run", run)
        tokens = [torch.tensor([11]), torch.tensor([22, 23, 24, 25]), torch.tensor([33, 34])]  # a decode, two verifies
        return model.forward_batch(tokens, caches[fused])

    fused, step_by_step = step(True), step(False)
    assert calls == [True] * len(model.layers) + [False] * len(model.layers)
    for got, expected in zip(fused, step_by_step):
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.hidden, expected.hidden)
    for got, expected in zip(caches[True], caches[False]):
        for layer, other in zip(got.layers, expected.layers):
            assert torch.equal(layer.keys, other.keys) and torch.equal(layer.values, other.values)


def test_short_prompts_arriving_together_run_in_one_forward(checkpoints, monkeypatch):
    """Whole prompts of plain sequences waiting together go through one forward (each weight read once
    for all, the logits of their last positions only), up to PREFILL_CHUNK tokens in all; a prompt of
    a speculative sequence, or past that total, is prefilled on its own. Each sequence still gets
    the tokens it gets alone."""
    engine = Engine.load(checkpoints("mimo_v2_flash"), device="cpu", dtype="float32")
    generator = torch.Generator().manual_seed(4)
    lengths = [5, 40, 9, PREFILL_CHUNK - 50, 6, 30]
    prompts = [torch.randint(5, 900, (length,), generator=generator).tolist() for length in lengths]
    settings = SamplingSettings(temperature=0, max_tokens=6)
    batched = []
    original = engine.model.forward_batch

    def recording(tokens, caches, last_only=False):
        if last_only:
            batched.append([len(ids) for ids in tokens])
        return original(tokens, caches, last_only)

    monkeypatch.setattr(engine.model, "forward_batch", recording)
    produced, _ = run_batched(engine, [(prompt, settings) for prompt in prompts], joins=[0] * len(prompts))
    assert batched == [[5, 40, 9], [PREFILL_CHUNK - 50, 6, 30]]  # at most PREFILL_CHUNK tokens a forward
    for index, prompt in enumerate(prompts):
        assert produced[index] == alone(engine, prompt, settings)[0], index
    batched.clear()
    run_batched(engine, [(prompts[0], settings), (prompts[2], settings)], joins=[0, 0], draft_tokens=1)
    assert batched == []  # MTP layers catch up on each prompt's hidden states: one forward each
