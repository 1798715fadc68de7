"""Sampling settings and the logits -> token step (greedy, temperature, top-k, top-p, min-p,
repetition penalty)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import MimoError


@dataclass
class SamplingSettings:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingSettings":
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise MimoError(message)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repetition(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    logits = logits.clone()
    logits.scatter_(-1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution tokens are drawn from, after temperature and truncation. logits: [..., V]."""
    logits = logits.float() / max(settings.temperature, 1e-5)
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.min_p > 0:
        floor = probs.amax(dim=-1, keepdim=True) * settings.min_p
        probs = probs.masked_fill(probs < floor, 0.0)
    if settings.top_p < 1.0:
        probs = keep_top_p(probs, settings.top_p)
    return probs / probs.sum(dim=-1, keepdim=True)


TOP_P_CANDIDATES = 256


def keep_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token whose higher-ranked tokens already hold more than `top_p` of the mass.

    Sorting a 150k vocabulary costs more than a decode step, so the cut is looked for among the
    most likely candidates first: once they hold more than top_p, every token outside them is cut
    too (its mass before is at least theirs), and the result equals a full sort's. Flat
    distributions widen the candidates until they do, up to the whole vocabulary."""
    vocab = probs.shape[-1]
    limit = top_p * probs.sum(dim=-1, keepdim=True)
    size = min(vocab, TOP_P_CANDIDATES)
    while True:
        values, order = probs.topk(size, dim=-1)  # sorted, most likely first
        if size == vocab or bool((values.sum(dim=-1, keepdim=True) > limit).all()):
            mass_before = values.cumsum(dim=-1) - values
            kept = values.masked_fill(mass_before > limit, 0.0)
            return torch.zeros_like(probs).scatter_(-1, order, kept)
        size = min(vocab, size * 8)


class Sampler:
    def __init__(self, settings: SamplingSettings, device: torch.device | str = "cpu"):
        self.settings = settings
        self.generator = torch.Generator(device=device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def adjust(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return penalize_repetition(logits, history, self.settings.repetition_penalty)

    def pick(self, logits: torch.Tensor) -> int:
        """One token from adjusted logits [V]."""
        if self.settings.greedy:
            return int(logits.argmax())
        probs = probabilities(logits, self.settings)
        return int(torch.multinomial(probs, 1, generator=self.generator))
