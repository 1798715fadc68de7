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

import math
import weakref
from dataclasses import dataclass

import torch

from .cache import ModelCache
from .kernels import cpu as cpu_kernels
from .models.model import MiMoForCausalLM
from .kernels import quant as quant_kernels
from .quant.linear import QuantLinear, dequantized_linear_weight
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


class SpeculationSwitch:
    """Whether a batch step drafts, decided by measurement. Drafts pay while a step costs about the
    same with them as without (reading the weights dominates); with more sequences in the batch the
    extra verify rows start to cost compute, and steps without drafts give more tokens per second.

    For each number of sequences decoding it keeps a moving average of the gain, log(tokens per
    second of a drafting step / those of a plain step), from steps that ran one right after the
    other (a busy machine slows both alike), runs the faster mode, and tries the other again every
    RETRY_EVERY steps at that size (acceptance changes with the text); a size not measured yet
    follows the nearest one that is until its first retry. A drafting step right after
    plain ones also catches the MTP layers up over the positions they skipped: it is not measured,
    so trying drafts means two drafting steps."""

    RETRY_EVERY = 16
    SMOOTHING = 0.3

    def __init__(self):
        self.gain: dict[int, float] = {}  # sequences -> moving average of log(drafting rate / plain rate)
        self.steps: dict[int, int] = {}  # steps decided, per number of sequences
        self.drafted: dict[int, int] = {}  # of which drafting
        self._planned: list[bool] = []  # the next steps' modes while the batch size stays
        self._planned_for = 0  # that batch size
        self._clock = 0  # steps decided
        self._last_drafted: bool | None = None  # what the previous step did
        self._last_rate: tuple[int, bool, float] | None = None  # (clock, drafted, tokens/s) of the previous step

    def drafts(self, sequences: int) -> bool:
        self._clock += 1
        step = self.steps[sequences] = self.steps.get(sequences, 0) + 1
        if sequences != self._planned_for:
            self._planned, self._planned_for = [], sequences
        planned = self._planned
        if not planned:
            gain = self._gain_near(sequences)
            if gain is None:
                planned += [True, True, False]  # measure: a drafting step (after a warm-up one), then a plain one
            elif step % self.RETRY_EVERY == 0:
                planned += [False] if gain >= 0 else [True, True]
            else:
                planned.append(gain >= 0)
        drafts = planned.pop(0)
        self.drafted[sequences] = self.drafted.get(sequences, 0) + drafts
        return drafts

    def _gain_near(self, sequences: int) -> float | None:
        """The gain measured at this batch size, else at the nearest one measured (batches grow and
        shrink a sequence at a time: each size's own measurement comes with its retries)."""
        if sequences in self.gain or not self.gain:
            return self.gain.get(sequences)
        return self.gain[min(self.gain, key=lambda measured: (abs(measured - sequences), measured))]

    def record(self, sequences: int, drafted: bool, tokens: int, seconds: float) -> None:
        """What the step just decided gave: `tokens` in `seconds`."""
        warming = drafted and not self._last_drafted
        self._last_drafted = drafted
        if warming or seconds <= 0:
            self._last_rate = None
            return
        rate, last = tokens / seconds, self._last_rate
        if last is not None and last[0] == self._clock - 1 and last[1] != drafted:
            sample = math.log(rate / last[2]) if drafted else math.log(last[2] / rate)
            gain = self.gain.get(sequences)
            self.gain[sequences] = sample if gain is None else gain + self.SMOOTHING * (sample - gain)
        self._last_rate = (self._clock, drafted, rate)


_INT8_FIRST_ROWS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def int8_first_rows(head, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 rows, scales) of the first `size` rows of a float or nf4 head on the CPU, made once per
    head and size (quantizing 32k rows takes ~0.2 s here, as long as a dozen decode steps); None
    where the head is read as it is (int8 or int4 already, or not on the CPU)."""
    quantized = isinstance(head, QuantLinear)
    device = head.device if quantized else head.weight.device
    if device.type != "cpu" or quantized and head.kind in ("int8", "int4"):
        return None
    made = _INT8_FIRST_ROWS.setdefault(head, {})
    if size not in made:
        rows = dequantized_linear_weight(head, torch.arange(size, device=device)) if quantized else head.weight[:size]
        made[size] = quant_kernels.quantize_int8(rows)
    return made[size]


class DraftVocabulary:
    """The token ids drafts are scored over: the first `size` ids (byte-level BPE gives the
    frequent merges the low ids) and every higher id the conversation has used, so that names,
    code identifiers and other scripts from the prompt still draft well while a draft reads a
    fraction of the head. Other ids get -inf: such a token is a missed draft, never another output.

    On the CPU a float head's first rows are scored from an int8 copy (`int8_first_rows`): half the
    bytes of bfloat16 for a draft, which only needs the top token and is verified at full precision."""

    MAX_EXTRA = 8192  # rows copied for conversation ids beyond `size`
    RESCORED = 4  # int8-scored ids whose logits are recomputed at the head's precision

    def __init__(self, head, size: int, vocab_size: int, dtype: torch.dtype):
        self.head, self.size, self.vocab_size, self.dtype = head, size, vocab_size, dtype
        self.extra_ids: list[int] = []
        self.extra_rows = None  # head rows of extra_ids, [n, hidden] in the activations' dtype
        self._known: set[int] = set()  # extra_ids, for lookups
        self._index = None  # extra_ids as a tensor
        self.first_rows = int8_first_rows(head, size)  # None: the head's own rows are read

    def extend(self, token_ids: torch.Tensor) -> None:
        fresh = [t for t in dict.fromkeys(token_ids.tolist()) if t >= self.size and t not in self._known]
        fresh = fresh[: self.MAX_EXTRA - len(self.extra_ids)]
        if not fresh:
            return
        index = torch.tensor(fresh, device=token_ids.device)
        rows = dequantized_linear_weight(self.head, index).to(self.dtype)
        self.extra_rows = rows if self.extra_rows is None else torch.cat([self.extra_rows, rows])
        self.extra_ids += fresh
        self._known.update(fresh)
        self._index = torch.tensor(self.extra_ids, device=token_ids.device)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., vocab_size] of the final-normed hidden states."""
        out = self.first_logits(normed)
        self.add_extra_logits(out, normed)
        return out

    def first_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits of the first `size` ids (the same for every conversation), -inf elsewhere."""
        out = torch.full((*normed.shape[:-1], self.vocab_size), float("-inf"), device=normed.device)
        if self.first_rows is None:
            out[..., : self.size] = self.head.first_rows(normed, self.size)
        else:
            out[..., : self.size] = self._int8_scores(normed)
        return out

    def add_extra_logits(self, out: torch.Tensor, normed: torch.Tensor) -> None:
        """Fill in the logits of the conversation's ids beyond the first `size`."""
        if self.extra_ids:
            out[..., self._index] = cpu_kernels.linear(normed, self.extra_rows, float32_out=True)

    def _int8_scores(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits of the first rows from their int8 copy, those of the RESCORED best recomputed from
        the head's own rows: near-ties that int8 rounding would swap still draft the head's choice."""
        scores = quant_kernels.int8_linear(normed, *self.first_rows, float32_out=True)
        best = scores.topk(min(self.RESCORED, self.size), dim=-1).indices
        rows = dequantized_linear_weight(self.head, best.reshape(-1)).view(*best.shape, -1)
        return scores.scatter_(-1, best, (rows * normed.float().unsqueeze(-2)).sum(-1))


class MTPDrafter:
    """Drafting state of one conversation. It lives in `cache.drafter`, so a later turn on the same
    cache goes on from it after the front end rewound the cache to the common prefix."""

    def __init__(self, model: MiMoForCausalLM, cache: ModelCache):
        self.model = model
        self.cache = cache
        self.final = [0] * len(model.mtp_layers)  # per layer: leading cache positions that are final
        self._hidden: list[torch.Tensor] = []  # target hidden states of positions hidden_start.., in pieces
        self.hidden_start = 0
        self.vocabulary: DraftVocabulary | None = None
        self.scanned = 0  # leading cache positions whose ids the vocabulary has seen

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
        self.scanned = min(self.scanned, length)

    @property
    def hidden(self) -> torch.Tensor | None:
        """Target hidden states [T, H] of positions hidden_start.., still needed."""
        if len(self._hidden) > 1:
            self._hidden = [torch.cat(self._hidden)]
        return self._hidden[0] if self._hidden else None

    @hidden.setter
    def hidden(self, states: torch.Tensor | None) -> None:
        self._hidden = [] if states is None else [states]

    def copied(self, cache: ModelCache, device) -> "MTPDrafter":
        """This state on `device`, for a copy of its cache (the draft vocabulary is made again
        from the ids)."""
        twin = MTPDrafter(self.model, cache)
        twin.final = list(self.final)
        twin.hidden = None if self.hidden is None else self.hidden.to(device, copy=True)
        twin.hidden_start = self.hidden_start
        return twin

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        """Keep the target's hidden states [1, T, H] of positions start..start+T-1 (anything kept
        from `start` on came from rejected drafts and is replaced)."""
        held = sum(len(states) for states in self._hidden)
        if not held:
            self.hidden, self.hidden_start = hidden[0], start
        elif start == self.hidden_start + held:  # appended as a piece: steps without drafts copy nothing
            self._hidden.append(hidden[0].clone())  # (a view would keep the whole batch's output)
        else:
            self.hidden = torch.cat([self.hidden[: start - self.hidden_start], hidden[0]])

    def use_vocabulary(self, size: int | None) -> None:
        """Score drafts over a DraftVocabulary of `size` ids from now on (None, or the whole
        vocabulary: over the whole head). Called before the timed decode: the first DraftVocabulary
        of a float head makes its int8 rows."""
        if size is None or size >= self.model.config.vocab_size:
            self.vocabulary = None
        elif self.vocabulary is None or self.vocabulary.size != size:
            self.vocabulary = DraftVocabulary(self.model.lm_head, size, self.model.config.vocab_size, self.model.dtype)
            self.scanned = 0

    def draft(self, history: torch.Tensor, sampler: Sampler, draft_tokens: int):
        """Draft tokens after x_P = history[-1] (the target has processed P = cache.length
        positions). Returns (draft ids, the draft distributions [n, V] when sampling, else None)."""
        step = DraftStep(self, history, sampler, draft_tokens)
        draft_together([step])
        return step.drafts, step.stacked_distributions()

    def _vocabulary_told(self, newest: torch.Tensor) -> DraftVocabulary | None:
        """The draft vocabulary, told every id of the conversation so far."""
        if self.vocabulary is not None:
            processed = self.cache.length
            self.vocabulary.extend(torch.cat([self.cache.token_ids[self.scanned : processed], newest]))
            self.scanned = processed
        return self.vocabulary

    def _catch_up_input(self, layer: int, sequence: torch.Tensor, base: int, processed: int) -> tuple:
        """Run `layer` alone over its positions not yet final but the last chunk (up to P-1), whose
        forward inputs (hidden, ids, start, cache) it returns. `sequence` holds the ids of positions base.."""
        cache = self.cache.mtp_layers[layer]
        begin = self.final[layer]
        last = begin + (processed - 1 - begin) // CATCH_UP_CHUNK * CATCH_UP_CHUNK
        for chunk in range(begin, last, CATCH_UP_CHUNK):
            self.model.mtp_hidden(layer, *self._inputs(layer, sequence, base, chunk, chunk + CATCH_UP_CHUNK), chunk, cache)
        self.final[layer] = max(begin, processed - layer)  # entries whose token x_{i+k+1} is accepted
        return (*self._inputs(layer, sequence, base, last, processed), last, cache)

    def _inputs(self, layer: int, sequence: torch.Tensor, base: int, begin: int, end: int):
        """Target hidden states and next ids [1, T] of MTP layer `layer` at positions begin..end-1."""
        hidden = self.hidden[begin - self.hidden_start : end - self.hidden_start][None]
        return hidden, sequence[begin + layer + 1 - base : end + layer + 1 - base][None]

    def _forget_before(self, position: int) -> None:
        if position > self.hidden_start:
            self.hidden = self.hidden[position - self.hidden_start :]
            self.hidden_start = position


class DraftStep:
    """One sequence's drafts of one decode step: `depth` tokens after x_P = history[-1]."""

    def __init__(self, drafter: MTPDrafter, history: torch.Tensor, sampler: Sampler, depth: int):
        self.drafter, self.history, self.sampler, self.depth = drafter, history, sampler, depth
        self.processed = drafter.cache.length  # P
        self.base = drafter.hidden_start
        self.sequence = torch.cat([drafter.cache.token_ids[self.base : self.processed], history[-1:]])  # x_base..x_P
        self.vocabulary = drafter._vocabulary_told(history[-1:])
        self.drafts: list[int] = []
        self.distributions: list[torch.Tensor] = []  # when sampling: what each draft was drawn from
        self.previous = None  # the MTP output the last draft came from

    def mtp_input(self, draft: int, layer: int) -> tuple:
        """(hidden, ids, start, layer cache) of the MTP forward that drafts token number `draft`."""
        chain = draft - layer
        if chain == 0:
            return self.drafter._catch_up_input(layer, self.sequence, self.base, self.processed)
        cache = self.drafter.cache.mtp_layers[layer]
        return self.previous, self.sequence[-1:].view(1, 1), self.processed - 1 + chain, cache

    def take(self, logits: torch.Tensor, last: torch.Tensor) -> None:
        """Pick the next draft from its logits [V] (`last`: the MTP output they came from)."""
        sampler = self.sampler
        if sampler.settings.repetition_penalty != 1.0:
            logits = sampler.adjust(logits, torch.cat([self.history, self.history.new_tensor(self.drafts)]))
        if sampler.settings.greedy:
            token = cpu_kernels.argmax_rows(logits)[0]
        else:
            distribution = probabilities(logits, sampler.settings)
            token = draw(distribution, sampler.generator)
            self.distributions.append(distribution)
        self.drafts.append(token)
        self.sequence = torch.cat([self.sequence, self.sequence.new_tensor([token])])
        self.previous = last

    def stacked_distributions(self) -> torch.Tensor | None:
        return torch.stack(self.distributions) if self.distributions else None


def draft_together(steps: list[DraftStep]) -> None:
    """The drafts of several sequences: for each draft position one MTP forward and one draft head
    for all the sequences that draft there (each weight read once), then each picks its own."""
    model = steps[0].drafter.model
    layers = len(model.mtp_layers)
    for draft in range(max(step.depth for step in steps)):
        layer = min(draft, layers - 1)
        drafting = [step for step in steps if step.depth > draft]
        outs = model.mtp_hidden_batch(layer, [step.mtp_input(draft, layer) for step in drafting])
        lasts = [out[:, -1:] for out in outs]
        logits = model.mtp_logits_batch(layer, torch.cat(lasts), [step.vocabulary for step in drafting])
        for step, row, last in zip(drafting, logits[:, -1], lasts):
            step.take(row, last)
    for step in steps:
        step.drafter._forget_before(min(step.drafter.final, default=step.processed))


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
        targets = cpu_kernels.argmax_rows(target_logits)
        accepted = 0
        while accepted < len(drafts) and targets[accepted] == drafts[accepted]:
            accepted += 1
        return drafts[:accepted] + [targets[accepted]]
    p_rows = probabilities(target_logits, sampler.settings)
    kept: list[int] = []
    for j, draft in enumerate(drafts):
        p, q = p_rows[j], draft_distributions[j]
        ratio = (p[draft] / q[draft]).item() if q[draft] > 0 else 0.0
        if torch.rand((), generator=sampler.generator, device=p.device).item() < ratio:
            kept.append(draft)
            continue
        residual = (p - q).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any rejection is impossible in exact arithmetic
            residual = p
        return kept + [draw(residual, sampler.generator)]
    return kept + [draw(p_rows[-1], sampler.generator)]
