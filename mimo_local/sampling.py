"""Sampling settings and the logits -> token step (greedy, temperature, top-k, top-p, min-p,
repetition penalty)."""

from __future__ import annotations

import torch

from .kernels import cpu as cpu_kernels
from .sampling_settings import SamplingSettings  # noqa: F401 - the settings live beside the sampler


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
        probs = keep_top_p(probs, settings.top_p, scores=logits)
    return probs / probs.sum(dim=-1, keepdim=True)


TOP_P_CANDIDATES = 256
TOP_P_BUCKETS = 4096


def keep_top_p(probs: torch.Tensor, top_p: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Zero every token whose higher-ranked tokens already hold more than `top_p` of the mass.

    Sorting a 150k vocabulary costs more than a decode step. Usually the 256 likeliest tokens hold
    more than top_p, and then every token outside them is cut. Otherwise tokens are binned by log
    probability (as llama.cpp's top-p does): bins wholly above the cut are kept and bins below it
    dropped without looking inside; only the bin the cut falls in is sorted. Equal to a full sort
    up to float rounding at the cut, for peaked and flat distributions alike. `scores`: the log
    probabilities up to a constant (the scaled logits), if at hand: log() of tiny probabilities is
    slow."""
    if probs.dim() > 1:
        rows = probs.reshape(-1, probs.shape[-1])
        score_rows = [None] * len(rows) if scores is None else scores.reshape(rows.shape)
        return torch.stack([keep_top_p(row, top_p, score) for row, score in zip(rows, score_rows)]).view(probs.shape)
    total = probs.sum()
    limit = top_p * total
    values, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]))
    if values.sum() > limit:  # peaked (the usual case): the cut is among the likeliest tokens
        kept = values.masked_fill(values.cumsum(dim=0) - values > limit, 0.0)
        return torch.zeros_like(probs).scatter_(0, order, kept)
    positive = probs > 0
    scores = probs.log() if scores is None else scores
    highest = scores.max()
    lowest = torch.where(positive, scores, highest).min()
    width = ((highest - lowest) / TOP_P_BUCKETS).clamp(min=1e-12)
    # bin 0 holds the likeliest tokens; zero-probability tokens go to a bin of their own at the end
    bins = ((highest - scores) / width).nan_to_num(0.0, TOP_P_BUCKETS, 0.0).long().clamp(max=TOP_P_BUCKETS - 1)
    bins = torch.where(positive, bins, TOP_P_BUCKETS)
    mass = torch.bincount(bins, weights=probs, minlength=TOP_P_BUCKETS + 1).to(probs.dtype)
    cumulative = mass.cumsum(dim=0)
    cut = min(int(torch.searchsorted(cumulative, limit, right=True)), TOP_P_BUCKETS - 1)
    keep = bins < cut
    members = (bins == cut).nonzero().squeeze(1)
    values, order = probs[members].sort(descending=True)
    above = cumulative[cut - 1] if cut > 0 else total.new_zeros(())
    keep[members[order]] = above + values.cumsum(dim=0) - values <= limit
    return probs.masked_fill(~keep, 0.0)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id from a distribution [V] (not necessarily normalized), by inverse CDF: one cumsum
    instead of torch.multinomial, which costs milliseconds on a 150k vocabulary."""
    cumulative = probs.float().cumsum(dim=0)
    point = torch.rand((), generator=generator, device=probs.device) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, point, right=True))
    # `point` rounded up to the total: the last token with any mass
    return min(index, int((cumulative < cumulative[-1]).sum()))


def penalize_presence(logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    if (presence == 0 and frequency == 0) or generated.numel() == 0:
        return logits
    counts = torch.bincount(generated, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class Sampler:
    """`constraint`: masks disallowed tokens (a grammar) after the penalties. `prompt_length`: how
    many ids of the history are prompt; presence and frequency penalties count only the rest."""

    def __init__(self, settings: SamplingSettings, device: torch.device | str = "cpu", constraint=None,
                 prompt_length: int = 0):
        self.settings = settings
        self.constraint, self.prompt_length = constraint, prompt_length
        self.generator = torch.Generator(device=device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def adjust(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        logits = penalize_repetition(logits, history, self.settings.repetition_penalty)
        logits = penalize_presence(logits, history[self.prompt_length :], self.settings.presence_penalty,
                                   self.settings.frequency_penalty)
        return logits if self.constraint is None else self.constraint.mask(logits)

    def pick(self, logits: torch.Tensor) -> int:
        """One token from adjusted logits [V]."""
        if self.settings.greedy:
            return cpu_kernels.argmax_rows(logits)[0]
        probs = probabilities(logits, self.settings)
        return draw(probs, self.generator)
