"""The one token generator every front end consumes: prefill, decode, sample, detokenize, stop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .budget import PREFILL_CHUNK, PREFILL_STEP, cache_size, room_to_generate, spare_slots
from .cache import ModelCache
from .errors import MimoError
from .models.model import MiMoForCausalLM
from .sampling import Sampler, SamplingSettings
from .speculative import DraftStep, MTPDrafter, SpeculationStats, SpeculationSwitch, accept_drafts, draft_together
from .threads import tuner_for
from .tokenizer import ChatTokenizer, IncrementalDetokenizer



@dataclass
class TokenEvent:
    text: str  # the text this token adds (may be "" while UTF-8 or a possible stop string is pending)
    token_id: int
    logprob: float | None = None  # with `logprobs`: the model's log probability of this token
    top_logprobs: list[tuple[int, float]] | None = None  # with `logprobs` > 0: the likeliest (id, logprob)


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    speculation: SpeculationStats | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        produced = self.completion_tokens - 1  # the first token comes out of the prefill
        return produced / self.decode_seconds if self.decode_seconds and produced > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "finish_reason": self.finish_reason,
            **(
                {
                    "mtp_draft_tokens": self.speculation.drafted,
                    "mtp_accepted_tokens": self.speculation.accepted,
                    "mean_accepted_length": round(self.speculation.mean_accepted_length, 3),
                }
                if self.speculation
                else {}
            ),
        }


@dataclass
class DoneEvent:
    stats: GenerationStats


class StopMatcher:
    """Emits text as it grows but holds back any tail that could start a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to show now, whether a stop string was hit)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(self.text) - self._pending_prefix(), False
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        if stopped:
            self.text = self.text[:end]
        return out, stopped

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _pending_prefix(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def prefill_chunks(model: MiMoForCausalLM, cache: ModelCache, ids: list[int], observe=None):
    """Run the prompt a chunk at a time, yielding after each chunk; returns the last position's
    logits (a batch interleaves a long prompt's chunks with the decode steps of the others). Only
    one chunk's activations are alive at a time; an interrupt between chunks leaves the cache
    holding the chunks done (cache.length says how many tokens)."""
    device = model.device
    logits = None
    for begin in range(0, len(ids), PREFILL_CHUNK):
        start = cache.length
        out = model(torch.tensor([ids[begin : begin + PREFILL_CHUNK]], device=device), cache)
        if observe is not None:
            observe(out.hidden, start)
        logits = out.logits[0, -1]
        del out  # the next chunk's forward starts without this one's hidden states
        if begin + PREFILL_CHUNK < len(ids):
            yield
    return logits


def run_through(steps):
    """Run a generator of steps to its end; returns what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def prefill(model: MiMoForCausalLM, cache: ModelCache, ids: list[int], observe=None):
    """Run the whole prompt in chunks; returns the last position's logits."""
    return run_through(prefill_chunks(model, cache, ids, observe))


class PlainDecoder:
    """One target forward per token."""

    def __init__(self, model: MiMoForCausalLM, cache: ModelCache, sampler: Sampler):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.last_logits: torch.Tensor | None = None  # the model's logits the last token was picked from

    observe = None  # called with the hidden states of every prefill chunk

    def first(self, prompt_ids: list[int], history: torch.Tensor) -> list[int]:
        """Prefill the prompt; returns the first picked tokens."""
        return run_through(self.first_chunks(prompt_ids, history))

    def first_chunks(self, prompt_ids: list[int], history: torch.Tensor):
        """`first`, a prompt chunk per iteration."""
        logits = yield from prefill_chunks(self.model, self.cache, prompt_ids, observe=self.observe)
        return self.pick(logits, history)

    def next(self, history: torch.Tensor) -> list[int]:
        return self.pick(self.model(history[-1:].view(1, 1), self.cache).logits[0, -1], history)

    def settle(self, out, history: torch.Tensor, drafts=(), distributions=None) -> list[int]:
        """The tokens to keep from a forward of the last token (`out`, from decode_batch)."""
        return self.pick(out.logits[0, -1], history)

    def pick(self, logits: torch.Tensor, history: torch.Tensor) -> list[int]:
        self.last_logits = logits
        return [self.sampler.pick(self.sampler.adjust(logits, history))]


class SpeculativeDecoder(PlainDecoder):
    """Draft with the MTP layers, verify all drafts in one target forward (see speculative.py).

    Up to `draft_tokens` drafts a step: after a step that kept m drafts the next drafts m + 1,
    so rejected positions stop costing drafts and a wider verify (on MoE models every extra
    verified token reads its own experts). It depends on the tokens only, so seeded sampling
    stays reproducible, and greedy output stays identical to plain decoding."""

    def __init__(self, model, cache, sampler, draft_tokens: int, vocab_limit: int | None = None):
        super().__init__(model, cache, sampler)
        if cache.drafter is None:
            cache.drafter = MTPDrafter(model, cache)
        self.drafter = cache.drafter
        self.drafter.rewind(cache.length)
        self.drafter.use_vocabulary(vocab_limit)
        self.draft_tokens = draft_tokens
        self.depth = draft_tokens  # drafts in the next step
        self.stats = SpeculationStats()
        self.observe = self.drafter.observe

    def next(self, history):
        drafts, distributions = self.drafter.draft(history, self.sampler, self.depth)
        out = self.model(torch.cat([history[-1:], history.new_tensor(drafts)])[None], self.cache, all_logits=True)
        return self.settle(out, history, drafts, distributions)

    @property
    def may_pause(self) -> bool:
        """Whether a step without drafts leaves the output as it is: greedy picks the same tokens
        either way; seeded sampling would draw other ones, so that it stays reproducible whatever
        else is in a batch it always drafts."""
        return self.sampler.settings.greedy or self.sampler.settings.seed is None

    def settle(self, out, history, drafts=(), distributions=None):
        """The tokens to keep from the verify forward `out` of the last token and `drafts` (none:
        a plain step, speculation paused)."""
        processed = self.cache.length - out.hidden.shape[1]
        if not drafts:
            kept = self.pick(out.logits[0, -1], history)
        else:
            kept = accept_drafts(out.logits[0], list(drafts), distributions, self.sampler, history)
            self.depth = min(self.draft_tokens, len(kept))
            self.stats.drafted += len(drafts)
            self.stats.accepted += len(kept) - 1
            self.stats.verify_forwards += 1
            self.stats.produced += len(kept)
        self.cache.truncate(processed + len(kept))
        self.drafter.observe(out.hidden[:, : len(kept)], processed)
        return kept


def token_logprobs(logits: torch.Tensor, token: int, alternatives: int) -> tuple[float, list[tuple[int, float]]]:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    top = log_probs.topk(alternatives) if alternatives else None
    return float(log_probs[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


class Generation:
    """One sequence being generated: its cache, decoder, sampler, stop matching and statistics.
    `stream` drives one alone; `decode_batch` advances several in one forward per step. Both feed
    the picked tokens through `take`, so a sequence gives the same events either way."""

    def __init__(
        self,
        model: MiMoForCausalLM,
        tokenizer: ChatTokenizer,
        prompt_ids: list[int],
        settings: SamplingSettings,
        cache: ModelCache | None = None,
        eos_ids: tuple[int, ...] | None = None,
        draft_tokens: int = 0,
        draft_vocab: int | None = None,
        constraint=None,
        logprobs: int | None = None,
        on_prefill=None,
    ):
        settings.validate()
        if not prompt_ids:
            raise MimoError("the prompt is empty")
        if constraint is not None or logprobs is not None:
            draft_tokens = 0
        if draft_tokens and not model.mtp_layers:
            raise MimoError("this checkpoint has no MTP layers (use --no-mtp)")
        if draft_tokens and cache is not None and cache.length and cache.drafter is None:
            raise MimoError("MTP was off for the earlier turns on this cache: start from a fresh cache to turn it on")
        self.model, self.prompt_ids, self.constraint, self.logprobs = model, prompt_ids, constraint, logprobs
        self.eos_ids = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
        if cache is None:
            cache = model.new_cache(
                cache_size(len(prompt_ids), settings.max_tokens, draft_tokens, model.config.max_position_embeddings),
                spare_slots=spare_slots(draft_tokens),
            )
        room = room_to_generate(cache.max_tokens, cache.length, len(prompt_ids), draft_tokens)
        if room < 1:
            raise MimoError(
                f"the prompt ({len(prompt_ids)} tokens) does not fit the context ({cache.max_tokens - cache.length} left)"
            )
        self.cache, self.max_tokens = cache, min(settings.max_tokens, room)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        sampler = Sampler(settings, model.device, constraint=constraint, prompt_length=len(prompt_ids))
        if draft_tokens:
            self.decoder = SpeculativeDecoder(model, cache, sampler, draft_tokens, draft_vocab)
        else:
            self.decoder = PlainDecoder(model, cache, sampler)
            cache.drafter = None  # it would miss the hidden states of this turn
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(settings.stop)
        # Prompt and generated ids, preallocated: `history` is a view of its filled part.
        self.ids = torch.empty(len(prompt_ids) + self.max_tokens + draft_tokens + 1, dtype=torch.long,
                               device=model.device)
        self.ids[: len(prompt_ids)] = torch.tensor(prompt_ids)
        self.history = self.ids[: len(prompt_ids)]
        self._prefill = None  # the prompt's chunks still to run (see prefill_chunk)
        self.on_prefill = on_prefill  # called (tokens prefilled, prompt tokens) after each prompt chunk
        self._prefill_base = cache.length
        self.pending: list[int] = []  # tokens picked, not yet taken
        self.finished = False
        self.hit_stop_string = False

    @property
    def speculative(self) -> bool:
        return isinstance(self.decoder, SpeculativeDecoder)

    def prefill(self) -> None:
        while not self.prefill_chunk():
            pass

    @property
    def next_chunk(self) -> int:
        """Prompt tokens the next prefill_chunk runs."""
        return min(PREFILL_CHUNK, len(self.prompt_ids) - (self.cache.length - self._prefill_base))

    def prefill_chunk(self) -> bool:
        """Prefill the next chunk of the prompt; True once the prompt is done and the first token
        picked."""
        started = time.perf_counter()
        if self._prefill is None:
            self._prefill = self.decoder.first_chunks(self.prompt_ids, self.history)
        try:
            next(self._prefill)
            done = False
        except StopIteration as finished:
            self.pending, done = finished.value, True
        self._prefill_ran(time.perf_counter() - started, done)
        return done

    def _prefill_ran(self, seconds: float, done: bool) -> None:
        """After a prompt chunk (or the whole prompt): its time, the progress callback, and the
        decode clock's start once the first token is picked."""
        self.stats.prefill_seconds += seconds
        if self.on_prefill is not None:
            self.on_prefill(self.cache.length - self._prefill_base, len(self.prompt_ids))
        if done:
            self.decode_started = time.perf_counter()

    @property
    def prefills_in_one_forward(self) -> bool:
        """Whether prefill_together may run its whole prompt: one chunk, not started, no MTP layers
        to catch up on the prompt's hidden states."""
        return not self.speculative and self._prefill is None and len(self.prompt_ids) <= PREFILL_CHUNK

    def prefilled(self, logits: torch.Tensor, seconds: float) -> None:
        """The prompt was run (prefill_together): pick the first token from its last `logits`."""
        self.pending = self.decoder.pick(logits, self.history)
        self._prefill_ran(seconds, done=True)

    def decode_step(self) -> None:
        """This sequence alone: one decoder step (a target forward, or a draft and verify)."""
        self.pending = self.decoder.next(self.history)

    def take(self) -> Iterator[TokenEvent]:
        """Events of the pending tokens, up to the end of the generation; then the history grows by
        them, ready for the next step."""
        stats = self.stats
        for token in self.pending:
            stats.token_ids.append(token)
            stats.completion_tokens += 1
            if self.constraint is not None:
                self.constraint.advance(token)
            if token in self.eos_ids:
                stats.finish_reason = "stop"
                self.finished = True
                break
            text, self.hit_stop_string = self.stops.feed(self.detokenizer.add(token))
            event = TokenEvent(text, token)
            if self.logprobs is not None:
                event.logprob, event.top_logprobs = token_logprobs(self.decoder.last_logits, token, self.logprobs)
            yield event
            if self.hit_stop_string:
                stats.finish_reason = "stop"
                self.finished = True
                break
            if stats.completion_tokens >= self.max_tokens:
                self.finished = True
                break
        if not self.finished:
            filled = len(self.history)
            self.ids[filled : filled + len(self.pending)] = self.history.new_tensor(self.pending)
            self.history = self.ids[: filled + len(self.pending)]
        self.pending = []

    def finish(self) -> Iterator[TokenEvent | DoneEvent]:
        stats = self.stats
        stats.decode_seconds = time.perf_counter() - self.decode_started
        if self.speculative:
            stats.speculation = self.decoder.stats
        if not self.hit_stop_string:
            tail, self.hit_stop_string = self.stops.feed(self.detokenizer.flush())
            if not self.hit_stop_string:
                tail += self.stops.flush()
            if tail:
                yield TokenEvent(tail, -1)
        stats.text = self.stops.text
        yield DoneEvent(stats)


def stream(model: MiMoForCausalLM, tokenizer: ChatTokenizer, prompt_ids: list[int], settings: SamplingSettings,
           **options) -> Iterator[TokenEvent | DoneEvent]:
    """Generate after `prompt_ids`. With a `cache` holding earlier turns, only the new ids are
    prefilled. `draft_tokens` > 0 decodes speculatively with the model's MTP layers.
    `constraint` (e.g. a grammar) masks the logits before each pick and is told each token;
    `logprobs` (the number of alternatives, 0 for none) adds the model's log probabilities to each
    token. Both decode without speculation. `eos_ids`: the tokens that end it (default the model's).
    `on_prefill(done, total)` is told the prompt tokens prefilled after each chunk (a progress bar).
    Yields a TokenEvent per token, then one DoneEvent with the stats."""
    generation = Generation(model, tokenizer, prompt_ids, settings, **options)
    generation.prefill()
    while True:
        yield from generation.take()
        if generation.finished:
            break
        decode_batch([generation])
    yield from generation.finish()


class Batch:
    """Continuous batching: sequences join once their prompt is prefilled and leave when they end;
    each `step` advances every one of them by one decoder step in one forward together (the
    speculative ones with their drafts, drafted together). `switch` decides per step whether
    drafting pays at this batch size (None: always draft)."""

    def __init__(self, switch: SpeculationSwitch | None = None):
        self.prefilling: list[Generation] = []  # waiting for their prompt, a chunk per step, in order
        self.active: list[Generation] = []  # decoding
        self.switch = switch
        self._fresh: set[int] = set()  # ids of sequences before their first decode step

    @property
    def generations(self) -> list[Generation]:
        return self.prefilling + self.active

    def join(self, generation: Generation) -> None:
        self.prefilling.append(generation)

    def leave(self, generation: Generation) -> None:
        (self.active if generation in self.active else self.prefilling).remove(generation)

    def step(self) -> list[tuple[Generation, list[TokenEvent | DoneEvent]]]:
        """Chunks of the waiting prompts, in order, up to PREFILL_STEP tokens (at least one chunk),
        and one decode step of the others; returns the events of every sequence that produced some."""
        results = []
        budget = PREFILL_STEP
        while self.prefilling and (budget == PREFILL_STEP or self.prefilling[0].next_chunk <= budget):
            together = self._prompts_together(budget)
            if len(together) > 1:
                prefill_together(together)
                del self.prefilling[: len(together)]  # the head of the queue
                results += [(generation, self._taken(generation)) for generation in together]
                budget -= sum(len(generation.prompt_ids) for generation in together)
                continue
            generation = self.prefilling[0]
            budget -= generation.next_chunk
            if generation.prefill_chunk():
                self.prefilling.pop(0)
                results.append((generation, self._taken(generation)))
        decoding = [g for g in self.active if not g.finished]
        if decoding:
            self._decode(decoding)
        results += [(generation, self._taken(generation)) for generation in decoding]
        for generation, _ in results:
            if generation not in self.active and not generation.finished:
                self.active.append(generation)
                if generation.speculative:
                    self._fresh.add(id(generation))
            elif generation.finished and generation in self.active:
                self.active.remove(generation)
        return results

    def _prompts_together(self, budget: int) -> list[Generation]:
        """The waiting prompts at the head of the queue that one forward can run: whole prompts of
        plain sequences, PREFILL_CHUNK tokens in all (the activation memory the plan counts) and
        within the step's `budget`."""
        together, tokens = [], 0
        for generation in self.prefilling:
            tokens += len(generation.prompt_ids)
            if not generation.prefills_in_one_forward or tokens > min(PREFILL_CHUNK, budget):
                break
            together.append(generation)
        return together

    def _decode(self, decoding: list[Generation]) -> None:
        switch = self.switch if any(g.speculative and g.decoder.may_pause for g in decoding) else None
        drafting = switch is None or switch.drafts(len(decoding))
        started = time.perf_counter()
        decode_batch(decoding, drafting)
        drafted = {id(g) for g in decoding if drafts_this_step(g, drafting)}
        # A sequence's first drafts catch its MTP layers up over the whole prompt: not a step's cost.
        if switch is not None and not drafted & self._fresh:
            switch.record(len(decoding), drafting, sum(len(g.pending) for g in decoding),
                          time.perf_counter() - started)
        self._fresh -= drafted

    @staticmethod
    def _taken(generation: Generation) -> list[TokenEvent | DoneEvent]:
        events = list(generation.take())
        return events + list(generation.finish()) if generation.finished else events


def prefill_together(generations: list[Generation]) -> None:
    """The whole prompts of several sequences (Generation.prefills_in_one_forward) in one forward,
    each weight read once for all, as llama.cpp's server batches its slots' prompts; each picks its
    first token."""
    started = time.perf_counter()
    model = generations[0].model
    outs = model.forward_batch([torch.tensor(g.prompt_ids, device=model.device) for g in generations],
                               [g.cache for g in generations], last_only=True)
    seconds = time.perf_counter() - started
    for generation, out in zip(generations, outs):
        generation.prefilled(out.logits[0, -1], seconds)


def drafts_this_step(generation: Generation, drafting: bool) -> bool:
    """Whether a sequence drafts in a step where the batch drafts (`drafting`) or pauses drafting."""
    return generation.speculative and (drafting or not generation.decoder.may_pause)


def decode_batch(generations: list[Generation], drafting: bool = True) -> None:
    """One decode step for several sequences (none finished) in one target forward: a plain one
    feeds its last token, a speculative one its last token and its drafts, drafted together for
    all of them; each keeps what its own sampler accepts. `drafting` False pauses speculation for
    this step, except for the sequences that may not pause (`SpeculativeDecoder.may_pause`).
    On a CPU the step runs with the thread count its model's ThreadTuner finds fastest."""
    tuner = tuner_for(generations[0].model)
    if tuner is None:
        _decode_batch(generations, drafting)
        return
    rows = sum(1 + (g.decoder.depth if drafts_this_step(g, drafting) else 0) for g in generations)
    with tuner.step(rows):
        _decode_batch(generations, drafting)


def _decode_batch(generations: list[Generation], drafting: bool) -> None:
    if len(generations) == 1 and (drafts_this_step(generations[0], drafting) or not generations[0].speculative):
        generations[0].decode_step()
        return
    steps = {id(g): DraftStep(g.decoder.drafter, g.history, g.decoder.sampler, g.decoder.depth)
             for g in generations if drafts_this_step(g, drafting)}
    if steps:
        draft_together(list(steps.values()))
    tokens = [torch.cat([g.history[-1:], g.history.new_tensor(steps[id(g)].drafts if id(g) in steps else [])])
              for g in generations]
    outs = generations[0].model.forward_batch(tokens, [g.cache for g in generations])
    for generation, out in zip(generations, outs):
        step = steps.get(id(generation))
        drafted = (step.drafts, step.stacked_distributions()) if step else ()
        generation.pending = generation.decoder.settle(out, generation.history, *drafted)
