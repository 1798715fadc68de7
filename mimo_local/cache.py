"""Preallocated KV caches: full-length for global layers, a ring buffer for sliding-window layers.

Every cache is written at absolute token positions. `ModelCache.length` is the number of committed
tokens; speculative decoding rolls back by lowering it (`truncate`): entries past it are ignored
and overwritten by the next write. The ring buffer keeps `spare_slots` slots beyond the window so
that a write of up to that many speculative tokens never overwrites a key a rollback still needs.
"""

from __future__ import annotations

import copy
import math
import mmap
from dataclasses import dataclass

import torch

from .budget import SPARE_SLOTS
from .config import AttentionSpec, MiMoConfig
from .errors import MimoError

EMPTY_SLOT = -(2**40)
ON_DEMAND_BYTES = 1 << 20  # CPU caches from this size take their memory as positions are written


def zeros_on_demand(*shape: int, dtype, device) -> torch.Tensor:
    """torch.zeros, except that on the CPU a large one is anonymous memory, which the kernel hands
    out already zero as it is first written: a server's 32k-token slot neither spends seconds
    clearing gigabytes nor holds more memory than the positions it has used."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < ON_DEMAND_BYTES:
        return torch.zeros(*shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(*shape)  # the tensor keeps the mapping


@dataclass
class KeyView:
    """The keys and values a step's queries may attend to, in position order: entry i is position
    `first + i`, the step's own keys last. `valid` [S] is False where a ring buffer does not hold
    that position (rolled back, or never written); None when it holds all."""

    keys: torch.Tensor  # [B, Hkv, S, D]
    values: torch.Tensor  # [B, Hkv, S, Dv]
    first: int
    valid: torch.Tensor | None = None

    quantized = False  # int8 entries with scales (QuantizedKVView)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def span(self, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of entries begin..end-1."""
        return self.keys[:, :, begin:end], self.values[:, :, begin:end]

    def mask(self, start: int, steps: int, window: int | None) -> torch.Tensor | None:
        """[T, S] bool, True where query start+t may see entry s (causal, within the window); None
        when every query sees every entry."""
        if steps == 1 and self.valid is None and (window is None or self.first + window >= start):
            return None
        device = self.keys.device
        offset = torch.arange(start, start + steps, device=device)[:, None] - (
            self.first + torch.arange(self.length, device=device))[None, :]
        visible = offset >= 0
        if window is not None:
            visible &= offset <= window
        return visible if self.valid is None else visible & self.valid


class FullKVCache:
    def __init__(self, spec: AttentionSpec, capacity: int, batch: int, dtype, device):
        self.spec = spec
        self.capacity = capacity
        self.keys = zeros_on_demand(batch, spec.num_kv_heads, capacity, spec.head_dim, dtype=dtype, device=device)
        self.values = zeros_on_demand(batch, spec.num_kv_heads, capacity, spec.v_head_dim, dtype=dtype, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> "KeyView":
        """Store keys/values of positions start..start+T-1; return every position up to them."""
        end = start + keys.shape[2]
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return KeyView(self.keys[:, :, :end], self.values[:, :, :end], first=0)

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


CACHE_TYPES = ("bf16", "int8")  # bf16: keys and values in the model's dtype; int8: global layers quantized
SCALE_DTYPE = torch.bfloat16  # one scale per (head, position): config.KV_SCALE_BYTES


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along the last dim, one scale per row: x ~ q * scale (|error| <= scale / 2)."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127).to(SCALE_DTYPE).clamp_min(1e-30)
    return (x.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8), scale


class QuantizedKVCache(FullKVCache):
    """A global layer's cache in int8 with one scale per head and position (a write never
    requantizes what is stored): about half the bytes of bfloat16. Attention reads it a tile at a
    time (chunk_attention), dequantizing only that tile."""

    def __init__(self, spec: AttentionSpec, capacity: int, batch: int, dtype, device):
        self.spec, self.capacity, self.dtype = spec, capacity, dtype
        shape = (batch, spec.num_kv_heads, capacity)
        self.keys = zeros_on_demand(*shape, spec.head_dim, dtype=torch.int8, device=device)
        self.values = zeros_on_demand(*shape, spec.v_head_dim, dtype=torch.int8, device=device)
        self.key_scales = zeros_on_demand(*shape, 1, dtype=SCALE_DTYPE, device=device)
        self.value_scales = zeros_on_demand(*shape, 1, dtype=SCALE_DTYPE, device=device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> "QuantizedKeyView":
        end = start + keys.shape[2]
        self.keys[:, :, start:end], self.key_scales[:, :, start:end] = quantize_rows(keys)
        self.values[:, :, start:end], self.value_scales[:, :, start:end] = quantize_rows(values)
        return QuantizedKeyView(self.keys[:, :, :end], self.values[:, :, :end], first=0,
                                key_scales=self.key_scales[:, :, :end], value_scales=self.value_scales[:, :, :end],
                                dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.key_scales.nbytes + self.value_scales.nbytes

    def copied(self, length: int, device) -> "QuantizedKVCache":
        """A copy of positions 0..length-1 (entries and their scales) on `device`."""
        def part(tensor):
            return tensor[:, :, :length].to(device, copy=True)
        return _replaced(self, capacity=length, keys=part(self.keys), values=part(self.values),
                         key_scales=part(self.key_scales), value_scales=part(self.value_scales))

    def restore(self, saved: "QuantizedKVCache", length: int) -> None:
        super().restore(saved, length)
        self.key_scales[:, :, :length] = saved.key_scales[:, :, :length]
        self.value_scales[:, :, :length] = saved.value_scales[:, :, :length]


@dataclass
class QuantizedKeyView(KeyView):
    """A KeyView of int8 entries: `span` dequantizes the entries asked for, nothing more."""

    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None
    dtype: torch.dtype = torch.bfloat16

    quantized = True

    def span(self, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys[:, :, begin:end].float() * self.key_scales[:, :, begin:end].float()
        values = self.values[:, :, begin:end].float() * self.value_scales[:, :, begin:end].float()
        return keys.to(self.dtype), values.to(self.dtype)


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

    def update(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> "KeyView":
        """Store keys/values of positions start..start+T-1 and return what their queries may see:
        the window before `start`, gathered from the ring in position order, then the new ones.
        The gather comes first, so a step longer than the spare slots overwrites nothing it reads."""
        steps = keys.shape[2]
        device = keys.device
        first = max(0, start - self.window)
        held = torch.arange(first, start, device=device)
        slots = held % self.capacity
        # A slot holds position p only if p was written there and not rolled back (p < start).
        valid = torch.cat([self.slot_pos[slots] == held, torch.ones(steps, dtype=torch.bool, device=device)])
        view = KeyView(torch.cat([self.keys[:, :, slots], keys], dim=2),
                       torch.cat([self.values[:, :, slots], values], dim=2), first=first,
                       valid=None if bool(valid.all()) else valid)
        kept = min(steps, self.capacity)
        positions = torch.arange(start + steps - kept, start + steps, device=device)
        slots = positions % self.capacity
        self.keys[:, :, slots] = keys[:, :, -kept:]
        self.values[:, :, slots] = values[:, :, -kept:]
        self.slot_pos[slots] = positions
        return view

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


def make_layer_cache(spec: AttentionSpec, max_tokens: int, spare_slots: int, batch: int, dtype, device,
                     cache_type: str = "bf16"):
    if spec.is_sliding:
        return SlidingWindowKVCache(spec, spare_slots, batch, dtype, device)
    if cache_type == "int8":
        return QuantizedKVCache(spec, max_tokens, batch, dtype, device)
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
        cache_type: str = "bf16",
    ) -> "ModelCache":
        """`cache_type` "int8" holds the global layers' keys and values in int8 (QuantizedKVCache)."""
        if cache_type not in CACHE_TYPES:
            raise MimoError(f"unknown cache type '{cache_type}' (choose from {', '.join(CACHE_TYPES)})")
        layers = [
            make_layer_cache(config.attention(i), max_tokens, spare_slots, batch, dtype, device, cache_type)
            for i in range(config.num_layers)
        ]
        mtp = [make_layer_cache(s, max_tokens, spare_slots, batch, dtype, device, cache_type) for s in mtp_specs or []]
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
