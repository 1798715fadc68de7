"""Preallocated KV caches: full-length for global layers, a ring buffer for sliding-window layers.

Every cache is written at absolute token positions. `ModelCache.length` is the number of committed
tokens; speculative decoding rolls back by lowering it (`truncate`): entries past it are ignored
and overwritten by the next write. The ring buffer keeps `spare_slots` slots beyond the window so
that a write of up to that many speculative tokens never overwrites a key a rollback still needs.
"""

from __future__ import annotations

import copy

import torch

from .budget import SPARE_SLOTS
from .config import AttentionSpec, MiMoConfig

EMPTY_SLOT = -(2**40)


class FullKVCache:
    def __init__(self, spec: AttentionSpec, capacity: int, batch: int, dtype, device):
        self.spec = spec
        self.capacity = capacity
        self.keys = torch.zeros(batch, spec.num_kv_heads, capacity, spec.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, spec.num_kv_heads, capacity, spec.v_head_dim, dtype=dtype, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        """Store keys/values of positions start..start+T-1; return all keys, values and the mask
        (True = may attend, shape [T, S]; None when every query sees every key)."""
        steps = keys.shape[2]
        end = start + steps
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        if steps == 1:
            return self.keys[:, :, :end], self.values[:, :, :end], None
        query_pos = torch.arange(start, end, device=keys.device)
        key_pos = torch.arange(end, device=keys.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        return self.keys[:, :, :end], self.values[:, :, :end], mask

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def copied_nbytes(self, length: int) -> int:
        return self.nbytes // self.capacity * length

    def copied(self, length: int, device) -> "FullKVCache":
        """A copy of positions 0..length-1 on `device` (its capacity is `length`)."""
        return _replaced(self, capacity=length, keys=self.keys[:, :, :length].to(device, copy=True),
                         values=self.values[:, :, :length].to(device, copy=True))

    def restore(self, saved: "FullKVCache", length: int) -> None:
        """Take positions 0..length-1 from a `copied` cache."""
        self.keys[:, :, :length] = saved.keys[:, :, :length]
        self.values[:, :, :length] = saved.values[:, :, :length]


class SlidingWindowKVCache:
    """Ring buffer of the last `window + spare_slots` positions of one sliding-window layer."""

    def __init__(self, spec: AttentionSpec, spare_slots: int, batch: int, dtype, device):
        self.spec = spec
        self.window = spec.sliding_window
        self.capacity = self.window + spare_slots
        self.keys = torch.zeros(batch, spec.num_kv_heads, self.capacity, spec.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(
            batch, spec.num_kv_heads, self.capacity, spec.v_head_dim, dtype=dtype, device=device
        )
        self.slot_pos = torch.full((self.capacity,), EMPTY_SLOT, dtype=torch.long, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        steps = keys.shape[2]
        device = keys.device
        query_pos = torch.arange(start, start + steps, device=device)
        # Stored slots are valid only below `start`: anything at or past it was rolled back.
        stored_pos = torch.where(self.slot_pos < start, self.slot_pos, EMPTY_SLOT)
        all_keys = torch.cat([self.keys, keys], dim=2)
        all_values = torch.cat([self.values, values], dim=2)
        key_pos = torch.cat([stored_pos, query_pos])
        offset = query_pos[:, None] - key_pos[None, :]
        mask = (offset >= 0) & (offset <= self.window)

        kept = min(steps, self.capacity)
        slots = query_pos[-kept:] % self.capacity
        self.keys[:, :, slots] = keys[:, :, -kept:]
        self.values[:, :, slots] = values[:, :, -kept:]
        self.slot_pos[slots] = query_pos[-kept:]
        return all_keys, all_values, mask

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.slot_pos.nbytes

    def copied_nbytes(self, length: int) -> int:
        return self.nbytes

    def copied(self, length: int, device) -> "SlidingWindowKVCache":
        """A copy of the whole ring on `device` (what it needs to resume is checked by
        `holds_window_before`)."""
        return _replaced(self, keys=self.keys.to(device, copy=True), values=self.values.to(device, copy=True),
                         slot_pos=self.slot_pos.to(device, copy=True))

    def restore(self, saved: "SlidingWindowKVCache", length: int) -> None:
        if saved.capacity != self.capacity:
            raise ValueError(f"a ring of {saved.capacity} slots does not restore into one of {self.capacity}")
        self.keys.copy_(saved.keys)
        self.values.copy_(saved.values)
        self.slot_pos.copy_(saved.slot_pos)

    def holds_window_before(self, length: int) -> bool:
        """Whether a query at `length` could still see its window: no slot it needs was overwritten
        by a later position (slots never written are fine: that layer never saw those tokens)."""
        needed = torch.arange(max(0, length - self.window), length, device=self.slot_pos.device)
        return bool((self.slot_pos[needed % self.capacity] <= needed).all())


def _replaced(cache, **tensors):
    """A shallow copy of a layer cache with some tensors swapped."""
    twin = copy.copy(cache)
    twin.__dict__.update(tensors)
    return twin


def make_layer_cache(spec: AttentionSpec, max_tokens: int, spare_slots: int, batch: int, dtype, device):
    if spec.is_sliding:
        return SlidingWindowKVCache(spec, spare_slots, batch, dtype, device)
    return FullKVCache(spec, max_tokens, batch, dtype, device)


class ModelCache:
    """The caches of every decoder layer (and of each MTP layer) plus the committed length."""

    def __init__(self, layers: list, mtp_layers: list | None = None, token_ids: torch.Tensor | None = None):
        self.layers = layers
        self.mtp_layers = mtp_layers or []
        self.length = 0
        self.token_ids = token_ids  # [max_tokens] ids of the positions written so far (batch 1)
        self.drafter = None  # MTP drafter state that continues over the turns of a conversation

    @classmethod
    def allocate(
        cls,
        config: MiMoConfig,
        max_tokens: int,
        dtype,
        device,
        batch: int = 1,
        spare_slots: int = SPARE_SLOTS,
        mtp_specs: list[AttentionSpec] | None = None,
    ) -> "ModelCache":
        layers = [
            make_layer_cache(config.attention(i), max_tokens, spare_slots, batch, dtype, device)
            for i in range(config.num_layers)
        ]
        mtp = [make_layer_cache(s, max_tokens, spare_slots, batch, dtype, device) for s in mtp_specs or []]
        return cls(layers, mtp, torch.zeros(max_tokens, dtype=torch.long, device=device))

    @property
    def max_tokens(self) -> int:
        full = [c.capacity for c in self.layers if isinstance(c, FullKVCache)]
        if self.token_ids is not None:
            full.append(len(self.token_ids))
        return min(full) if full else 2**62

    def held_prefix(self, ids: list[int]) -> int:
        """How many leading `ids` this cache holds (it records the id of every position it was fed)."""
        held = self.token_ids[: self.length].tolist()
        n = min(len(held), len(ids))
        return next((i for i in range(n) if held[i] != ids[i]), n)

    def reusable_prefix(self, prompt_ids: list[int], needs_drafter: bool = False) -> int:
        """The longest prefix of `prompt_ids` it holds and can rewind to exactly. The last prompt
        token is always fed again (its logits pick the first answer token); MTP drafts
        (`needs_drafter`) need the drafter state that went with the positions held."""
        reused = min(self.held_prefix(prompt_ids), len(prompt_ids) - 1)
        if not self.can_truncate(reused) or (needs_drafter and self.drafter is None):
            return 0
        return reused

    def rewind_for(self, prompt_ids: list[int], needs_drafter: bool = False) -> int:
        """Rewind to `reusable_prefix`; returns that length."""
        reused = self.reusable_prefix(prompt_ids, needs_drafter)
        self.truncate(reused)
        return reused

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def can_truncate(self, length: int) -> bool:
        """Whether rewinding to `length` keeps every layer exact. Full caches always do; a ring keeps
        only window + spare_slots positions, so a rewind further back than its spare slots is not."""
        if not 0 <= length <= self.length:
            return False
        rings = [c for c in self.layers + self.mtp_layers if isinstance(c, SlidingWindowKVCache)]
        return all(ring.holds_window_before(length) for ring in rings)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers + self.mtp_layers)

    def copied_nbytes(self) -> int:
        """The bytes `copied` takes."""
        length = self.length
        drafter = 0 if self.drafter is None or self.drafter.hidden is None else self.drafter.hidden.nbytes
        return sum(c.copied_nbytes(length) for c in self.layers + self.mtp_layers) + 8 * length + drafter

    def copied(self, device="cpu") -> "ModelCache":
        """A copy of what it holds (its committed positions and MTP drafter state) on `device`,
        e.g. in host memory while this cache goes on with another prompt."""
        length = self.length
        twin = ModelCache([c.copied(length, device) for c in self.layers],
                          [c.copied(length, device) for c in self.mtp_layers],
                          self.token_ids[:length].to(device, copy=True))
        twin.length = length
        if self.drafter is not None:
            twin.drafter = self.drafter.copied(twin, device)
        return twin

    def restore(self, saved: "ModelCache", length: int) -> None:
        """Hold the first `length` positions of a `copied` cache (`saved.can_truncate(length)`)."""
        if length > self.max_tokens or not saved.can_truncate(length):
            raise ValueError(f"cannot restore {length} positions of a saved cache of {saved.length}")
        for mine, theirs in zip(self.layers + self.mtp_layers, saved.layers + saved.mtp_layers):
            mine.restore(theirs, length)
        self.token_ids[:length] = saved.token_ids[:length]
        self.length = length
        self.drafter = None if saved.drafter is None else saved.drafter.copied(self, self.token_ids.device)
