"""One context budget: how large a KV cache is, how many spare ring slots it keeps, how many
tokens a prefill forward takes, and how much room is left to generate. generate, chat, serve, the
CLI's estimate and the planner all take these numbers from here."""

from __future__ import annotations

PREFILL_CHUNK = 512  # prompt tokens per prefill forward (bounds activation memory)
# Prompt tokens a batch step prefills at most, in whole chunks (llama-server's default batch): prompts
# that arrive together start decoding together, and a long one holds the others' step back no longer.
PREFILL_STEP = 4 * PREFILL_CHUNK
SPARE_SLOTS = 8  # sliding-window ring slots beyond the window: room for speculative tokens to roll back
REWIND_SLOTS = 128  # what a chat or a server keeps instead, so an edit or a new request can rewind that far
DEFAULT_CACHE_RAM = "8GiB"  # `mimo serve --cache-ram`: host memory for earlier requests' KV, as llama-server's
TEMPLATE_TOKENS = 64  # what a chat template adds around a one-message prompt, at most


def spare_slots(draft_tokens: int = 0, rewind: bool = False) -> int:
    """Ring slots beyond the window: a speculative step writes up to draft_tokens + 1 positions."""
    return max(REWIND_SLOTS if rewind else SPARE_SLOTS, draft_tokens + 2)


def cache_size(prompt_tokens: int, max_tokens: int, draft_tokens: int, model_positions: int) -> int:
    """Positions a one-shot generation's cache needs: the prompt, the answer and one verify step."""
    return min(prompt_tokens + max_tokens + draft_tokens + 1, model_positions)


def room_to_generate(cache_tokens: int, cache_length: int, prompt_tokens: int, draft_tokens: int) -> int:
    """Tokens that can still be generated after the prompt in a cache of `cache_tokens` positions
    that already holds `cache_length` (a verify step may write `draft_tokens` past the last one)."""
    return cache_tokens - cache_length - prompt_tokens - draft_tokens


def context_estimate(prompt_text: str, max_tokens: int) -> int:
    """The context a one-shot run needs, before tokenizing: byte-level BPE gives at most one token per
    byte; the template adds a few."""
    return len(prompt_text.encode()) + TEMPLATE_TOKENS + max_tokens + SPARE_SLOTS
