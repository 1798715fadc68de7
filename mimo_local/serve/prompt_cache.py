"""The server's prompt cache in host memory (`mimo serve --cache-ram SIZE`): copies of slots' KV
caches, taken when a slot moves on to another prompt, so that a later request sharing a long prefix
with an earlier one (an agent's system prompt and tools, a chat that another client interrupted)
prefills only the rest. Least recently used entries go first; the entries never take more than
SIZE bytes together. A sliding-window layer's copy is its ring as it was: a prefix whose window
the ring no longer holds cannot be resumed exactly, and counts as not cached."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from ..cache import ModelCache

KEEP_FRACTION = 0.5  # a slot that keeps less than this share of its tokens for a new request is saved first


def worth_saving(held: int, kept: int) -> bool:
    """Whether a slot holding `held` positions, about to keep `kept` of them, loses enough to be
    saved first (llama-server's rule: it loses more than half)."""
    return held > 0 and kept < KEEP_FRACTION * held


class PromptCache:
    def __init__(self, capacity: int, on_evict: Callable[[], None] | None = None):
        self.capacity = capacity  # bytes
        self.on_evict = on_evict
        self.entries: OrderedDict[int, ModelCache] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def save(self, cache: ModelCache) -> None:
        """Keep a copy of what `cache` holds, unless an entry already covers it or it alone is
        larger than the capacity; entries it covers and then the least recently used make room."""
        size = cache.copied_nbytes()
        ids = cache.token_ids[: cache.length].tolist()
        if not cache.length or size > self.capacity:
            return
        for key, entry in list(self.entries.items()):
            if entry.held_prefix(ids) == len(ids) and entry.can_truncate(len(ids)):
                self.entries.move_to_end(key)  # it holds all of this already
                return
            if cache.held_prefix(entry.token_ids.tolist()) == entry.length and cache.can_truncate(entry.length):
                self._drop(key)  # this holds all of that entry
        while self.nbytes + size > self.capacity:
            self._drop(next(iter(self.entries)))
            if self.on_evict is not None:
                self.on_evict()
        entry = cache.copied("cpu")
        self.entries[id(entry)] = entry
        self.nbytes += size

    def best(self, prompt_ids: list[int], needs_drafter: bool = False) -> tuple[ModelCache | None, int]:
        """The entry with the longest prefix of `prompt_ids` it can resume from (now the most
        recently used), and that length."""
        found, longest = None, 0
        for entry in self.entries.values():
            length = entry.reusable_prefix(prompt_ids, needs_drafter)
            if length > longest:
                found, longest = entry, length
        if found is not None:
            self.entries.move_to_end(id(found))
        return found, longest

    def _drop(self, key: int) -> None:
        entry = self.entries.pop(key)
        self.nbytes -= entry.copied_nbytes()
