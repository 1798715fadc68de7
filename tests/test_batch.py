"""Continuous batching: sequences decoded together, one forward per step, give each sequence the
tokens it gets alone (greedy and seeded sampling), whatever joins or leaves the batch."""

import pytest
import torch

from mimo_local.engine import Engine
from mimo_local.generate import Batch, DoneEvent, Generation, TokenEvent
from mimo_local.sampling import SamplingSettings


def alone(engine, prompt, settings, **options):
    events = list(engine.stream(prompt, settings, **options))
    return [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0], events[-1].stats


def run_batched(engine, requests, joins):
    """`requests`: (prompt ids, settings); `joins[i]`: the step at which request i joins."""
    batch, produced, done, step = Batch(), {}, {}, 0
    generations = {}
    while len(done) < len(requests):
        for index, (prompt, settings) in enumerate(requests):
            if joins[index] == step:
                generation = Generation(engine.model, engine.tokenizer, prompt, settings)
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
    tokens = torch.tensor([11, 22, 33])
    batched = model.forward_batch(tokens, caches).logits[:, -1]
    for index, single in enumerate(singles):
        alone_logits = model(tokens[index].view(1, 1), single).logits[0, -1]
        torch.testing.assert_close(batched[index], alone_logits, rtol=1e-5, atol=1e-5)
        assert caches[index].length == single.length
