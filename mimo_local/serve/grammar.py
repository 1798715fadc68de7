"""Structured output: llguidance token masks applied to the logits before each pick, so the answer
always parses (and validates against a JSON schema).

A reasoning model thinks first: with `after` set (e.g. "</think>"), tokens pass unconstrained until
the decoded text contains it, and the grammar governs everything after."""

from __future__ import annotations

import json
import weakref

import llguidance
import numpy as np
import torch

from ..errors import MimoError
from ..tokenizer import ChatTokenizer

_grammar_tokenizers: "weakref.WeakKeyDictionary[ChatTokenizer, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer: ChatTokenizer, eos_id: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (about a second on a 150k vocabulary: made once)."""
    if tokenizer not in _grammar_tokenizers:
        _grammar_tokenizers[tokenizer] = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), eos_token=eos_id)
    return _grammar_tokenizers[tokenizer]


def json_schema_grammar(schema: dict | None) -> str:
    """A grammar for any JSON object (`schema` None: response_format json_object) or for `schema`."""
    schema = {"type": "object"} if schema is None else schema
    # Compact separators: flexible whitespace lets a model pad forever instead of answering.
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                            overrides={"whitespace_flexible": False})
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise MimoError(f"invalid JSON schema: {error}")
    return grammar


def lark_grammar(lark: str) -> str:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise MimoError(f"invalid grammar: {error}")
    return grammar


class GrammarConstraint:
    def __init__(self, tokenizer: ChatTokenizer, grammar: str, eos_id: int, vocab_size: int, after: str | None = None):
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, eos_id), grammar)
        if self.matcher.is_error():
            raise MimoError(f"grammar: {self.matcher.get_error()}")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.waiting_for, self.preamble = after, ""

    @property
    def active(self) -> bool:
        return self.waiting_for is None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        size = min(self.vocab_size, len(bits))
        allowed[:size] = torch.from_numpy(bits[:size].astype(bool))
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, token_id: int) -> None:
        if self.active:
            if not self.matcher.consume_token(token_id):
                raise MimoError(f"grammar: token {token_id} not allowed ({self.matcher.get_error()})")
            return
        self.preamble += self.tokenizer.decode([token_id], skip_special_tokens=False)
        if self.waiting_for in self.preamble:
            self.waiting_for = None
