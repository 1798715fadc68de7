"""Multi-token-prediction (MTP) speculative decoding: draft with the checkpoint's MTP layers,
verify every draft in one target forward, keep the longest valid prefix.

Indexing: the target has processed positions 0..P-1 (hidden states h_i) and the newest token x_P
is known. MTP layer k at position i reads (h_i, x_{i+k+1}) and predicts x_{i+k+2}, so drafting
x_{P+1+k} runs layer k at position P-1. Layer k's cache entries are final once x_{i+k+1} is
accepted; later ones are provisional and recomputed next round. With more drafts than layers
(MiMo-7B has one), the last layer is chained: its own output hidden and the newest draft, at the
next position (EAGLE style).

Acceptance: greedy keeps drafts while they equal the target's argmax, so the output is exactly
the non-speculative one. Sampling uses standard speculative rejection sampling (accept d with
probability min(1, p(d)/q(d)), else draw from max(0, p - q)), so tokens follow the target's
distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import ModelCache
from .models.model import MiMoForCausalLM
from .sampling import Sampler, draw, probabilities

CATCH_UP_CHUNK = 512


@dataclass
class SpeculationStats:
    drafted: int = 0
    accepted: int = 0
    verify_forwards: int = 0
    produced: int = 0  # tokens from verify forwards: accepted drafts + one target token each

    @property
    def mean_accepted_length(self) -> float:
        return self.produced / self.verify_forwards if self.verify_forwards else 0.0


class MTPDrafter:
    """Drafting state of one conversation. It lives in `cache.drafter`, so a later turn on the same
    cache goes on from it after the front end rewound the cache to the common prefix."""

    def __init__(self, model: MiMoForCausalLM, cache: ModelCache):
        self.model = model
        self.cache = cache
        self.final = [0] * len(model.mtp_layers)  # per layer: leading cache positions that are final
        self.hidden = None  # target hidden states [T, H] of positions hidden_start.., still needed
        self.hidden_start = 0

    def rewind(self, length: int) -> None:
        """The target cache now holds `length` positions; new tokens follow from there. Entry i of
        MTP layer k read token i+k+1, so entries from length-k-1 on are recomputed. Entries whose
        target hidden state was already dropped stay as they are: near a deep rewind the drafts
        may be a little worse, the output never changes."""
        if self.hidden is not None:
            self.hidden = self.hidden[: max(0, length - self.hidden_start)]
        if self.hidden is None or not len(self.hidden):
            self.hidden, self.hidden_start = None, length
        self.final = [max(min(final, length - k - 1), self.hidden_start) for k, final in enumerate(self.final)]

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        """Keep the target's hidden states [1, T, H] of positions start..start+T-1 (anything kept
        from `start` on came from rejected drafts and is replaced)."""
        if self.hidden is None:
            self.hidden, self.hidden_start = hidden[0], start
        else:
            self.hidden = torch.cat([self.hidden[: start - self.hidden_start], hidden[0]])

    def draft(self, history: torch.Tensor, sampler: Sampler, draft_tokens: int, vocab_limit: int | None = None):
        """Draft tokens after x_P = history[-1] (the target has processed P = cache.length
        positions). Returns (draft ids, the draft distributions [n, V] when sampling, else None)."""
        model, layers = self.model, len(self.model.mtp_layers)
        processed = self.cache.length
        base = self.hidden_start
        sequence = torch.cat([self.cache.token_ids[base:processed], history[-1:]])  # x_base..x_P
        drafts: list[int] = []
        distributions = []
        previous = None
        for j in range(draft_tokens):
            layer = min(j, layers - 1)
            chain = j - layer
            if chain == 0:
                last = self._catch_up(layer, sequence, base, processed)
            else:
                ids = sequence[-1:].view(1, 1)
                last = model.mtp_hidden(layer, previous, ids, processed - 1 + chain, self.cache.mtp_layers[layer])
            logits = model.mtp_logits(layer, last, vocab_limit)[0, -1]
            if sampler.settings.repetition_penalty != 1.0:
                seen = torch.cat([history, history.new_tensor(drafts)])
                logits = sampler.adjust(logits, seen[seen < logits.shape[-1]])  # a draft vocab may be smaller
            if sampler.settings.greedy:
                token = int(logits.argmax())
            else:
                distribution = probabilities(logits, sampler.settings)
                token = draw(distribution, sampler.generator)
                distributions.append(distribution)
            drafts.append(token)
            sequence = torch.cat([sequence, sequence.new_tensor([token])])
            previous = last
        self._forget_before(min(self.final, default=processed))
        return drafts, (torch.stack(distributions) if distributions else None)

    def _catch_up(self, layer: int, sequence: torch.Tensor, base: int, processed: int) -> torch.Tensor:
        """Run `layer` from its first non-final position to P-1; returns the output at P-1.
        `sequence` holds the ids of positions base.."""
        model, cache = self.model, self.cache.mtp_layers[layer]
        begin = self.final[layer]
        out = None
        for chunk in range(begin, processed, CATCH_UP_CHUNK):
            end = min(chunk + CATCH_UP_CHUNK, processed)
            hidden = self.hidden[chunk - self.hidden_start : end - self.hidden_start][None]
            ids = sequence[chunk + layer + 1 - base : end + layer + 1 - base][None]
            out = model.mtp_hidden(layer, hidden, ids, chunk, cache)
        self.final[layer] = max(begin, processed - layer)  # entries whose token x_{i+k+1} is accepted
        return out[:, -1:]

    def _forget_before(self, position: int) -> None:
        if position > self.hidden_start:
            self.hidden = self.hidden[position - self.hidden_start :]
            self.hidden_start = position


def accept_drafts(
    target_logits: torch.Tensor,
    drafts: list[int],
    draft_distributions: torch.Tensor | None,
    sampler: Sampler,
    history: torch.Tensor,
) -> list[int]:
    """Tokens to keep from one verify forward: accepted drafts, then one token from the target.

    target_logits [n+1, V]: row j is the target's prediction after the j-th draft (row 0 after
    the last committed token). All rows are adjusted and turned into choices or distributions in
    one batch: one argmax or one softmax per verify forward instead of one per row."""
    rows = len(drafts) + 1
    if sampler.settings.repetition_penalty != 1.0:
        candidates = torch.cat([history, history.new_tensor(drafts)])
        # Row j follows drafts[:j]: it is penalized for those too (they are what was kept if it is used).
        target_logits = torch.stack([sampler.adjust(target_logits[j], candidates[: len(history) + j]) for j in range(rows)])
    if sampler.settings.greedy:
        targets = target_logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafts) and targets[accepted] == drafts[accepted]:
            accepted += 1
        return drafts[:accepted] + [targets[accepted]]
    p_rows = probabilities(target_logits, sampler.settings)
    kept: list[int] = []
    for j, draft in enumerate(drafts):
        p = p_rows[j]
        q = torch.zeros_like(p)
        q[: draft_distributions.shape[1]] = draft_distributions[j]
        ratio = (p[draft] / q[draft]).item() if q[draft] > 0 else 0.0
        if torch.rand((), generator=sampler.generator, device=p.device).item() < ratio:
            kept.append(draft)
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any rejection is impossible in exact arithmetic
            residual = p
        return kept + [draw(residual, sampler.generator)]
    return kept + [draw(p_rows[-1], sampler.generator)]
