"""The one token generator every front end consumes: prefill, decode, sample, detokenize, stop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .cache import ModelCache
from .errors import MimoError
from .models.model import MiMoForCausalLM
from .sampling import Sampler, SamplingSettings
from .tokenizer import ChatTokenizer, IncrementalDetokenizer

PREFILL_CHUNK = 512


@dataclass
class TokenEvent:
    text: str  # the text this token adds (may be "" while UTF-8 or a possible stop string is pending)
    token_id: int


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # target forwards after prefill
    finish_reason: str = "length"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""

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


def prefill(model: MiMoForCausalLM, cache: ModelCache, ids: list[int]):
    """Run the prompt in chunks; returns the last ForwardOutput."""
    device = model.device
    out = None
    for begin in range(0, len(ids), PREFILL_CHUNK):
        chunk = torch.tensor([ids[begin : begin + PREFILL_CHUNK]], device=device)
        out = model(chunk, cache)
    return out


def stream(
    model: MiMoForCausalLM,
    tokenizer: ChatTokenizer,
    prompt_ids: list[int],
    settings: SamplingSettings,
    cache: ModelCache | None = None,
    eos_ids: tuple[int, ...] | None = None,
) -> Iterator[TokenEvent | DoneEvent]:
    """Generate after `prompt_ids`. With a `cache` holding earlier turns, only the new ids are
    prefilled. Yields a TokenEvent per token, then one DoneEvent with the stats."""
    settings.validate()
    if not prompt_ids:
        raise MimoError("the prompt is empty")
    eos_ids = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    if cache is None:
        cache = model.new_cache(min(len(prompt_ids) + settings.max_tokens, model.config.max_position_embeddings))
    room = cache.max_tokens - cache.length - len(prompt_ids)
    if room < 1:
        raise MimoError(
            f"the prompt ({len(prompt_ids)} tokens) does not fit the context ({cache.max_tokens - cache.length} left)"
        )
    max_tokens = min(settings.max_tokens, room)

    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    sampler = Sampler(settings, model.device)
    detokenizer = IncrementalDetokenizer(tokenizer)
    stops = StopMatcher(settings.stop)
    history = torch.tensor(prompt_ids, device=model.device)

    started = time.perf_counter()
    logits = prefill(model, cache, prompt_ids).logits[0, -1]
    token = sampler.pick(sampler.adjust(logits, history))
    stats.prefill_seconds = time.perf_counter() - started

    decode_started = time.perf_counter()
    hit_stop_string = False
    while True:
        stats.token_ids.append(token)
        stats.completion_tokens += 1
        if token in eos_ids:
            stats.finish_reason = "stop"
            break
        text, hit_stop_string = stops.feed(detokenizer.add(token))
        yield TokenEvent(text, token)
        if hit_stop_string:
            stats.finish_reason = "stop"
            break
        if stats.completion_tokens >= max_tokens:
            break
        history = torch.cat([history, history.new_tensor([token])])
        logits = model(history[-1:].view(1, 1), cache).logits[0, -1]
        stats.decode_steps += 1
        token = sampler.pick(sampler.adjust(logits, history))
    stats.decode_seconds = time.perf_counter() - decode_started
    if not hit_stop_string:
        tail, hit_stop_string = stops.feed(detokenizer.flush())
        if not hit_stop_string:
            tail += stops.flush()
        if tail:
            yield TokenEvent(tail, -1)
    stats.text = stops.text
    yield DoneEvent(stats)
