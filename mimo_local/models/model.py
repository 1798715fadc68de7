"""The decoder shell both families share: embeddings, decoder layers, final norm, lm_head, MTP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import SPARE_SLOTS
from ..cache import ModelCache
from ..config import AttentionSpec, MiMoConfig
from .layers import MLP, DecoderLayer, Linear, RMSNorm, RotaryEmbedding


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T', vocab] (T' = 1 when only the last position was asked for)
    hidden: torch.Tensor  # [B, T, hidden]: last decoder layer output before the final norm (MTP input)


class MTPLayer(nn.Module):
    """One multi-token-prediction layer: fuse (hidden state, next-token embedding), run one decoder
    block with its own KV cache, predict with the shared lm_head.

    MiMo-7B concatenates [hidden, embedding]; V2-Flash [embedding, hidden] (`embedding_first`).
    """

    def __init__(self, config: MiMoConfig, attention: AttentionSpec, rope: RotaryEmbedding, embedding_first: bool):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.embedding_first = embedding_first
        self.token_norm = RMSNorm(size, eps)
        self.hidden_norm = RMSNorm(size, eps)
        self.input_proj = Linear(2 * size, size, bias=False)
        self.block = DecoderLayer(size, eps, attention, MLP(size, config.intermediate_size), rope)
        self.final_norm = RMSNorm(size, eps)

    def forward(self, hidden: torch.Tensor, token_embeddings: torch.Tensor, start: int, cache) -> torch.Tensor:
        """The block output before `final_norm` (what a chained draft step takes as its hidden)."""
        return self.block(self._fused_input(hidden, token_embeddings), start, cache)

    def forward_batch(self, hidden, token_embeddings, starts: list[int], lengths: list[int], caches: list):
        """Several sequences' rows in one block (hidden [1, N, H]; see DecoderLayer.forward_batch)."""
        return self.block.forward_batch(self._fused_input(hidden, token_embeddings), starts, lengths, caches)

    def _fused_input(self, hidden: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        parts = [self.hidden_norm(hidden), self.token_norm(token_embeddings)]
        if self.embedding_first:
            parts.reverse()
        return self.input_proj(torch.cat(parts, dim=-1))


class MiMoForCausalLM(nn.Module):
    def __init__(self, config: MiMoConfig, layers: list[DecoderLayer], mtp_layers: list[MTPLayer]):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp_layers = nn.ModuleList(mtp_layers)
        self.cache_type = "bf16"  # what new_cache makes of the global layers' KV: "bf16" (model dtype) or "int8"

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def mtp_attention_specs(self) -> list[AttentionSpec]:
        return [layer.block.self_attn.spec for layer in self.mtp_layers]

    def new_cache(self, max_tokens: int, spare_slots: int = SPARE_SLOTS) -> ModelCache:
        return ModelCache.allocate(
            self.config,
            max_tokens,
            self.dtype,
            self.device,
            spare_slots=spare_slots,
            mtp_specs=self.mtp_attention_specs(),
            cache_type=self.cache_type,
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: ModelCache, all_logits: bool = False) -> ForwardOutput:
        """Run `input_ids` [B, T] at positions cache.length.. and commit them to the cache."""
        start = cache.length
        steps = input_ids.shape[1]
        if start + steps > cache.max_tokens:
            raise ValueError(f"context full: {start + steps} tokens > cache of {cache.max_tokens}")
        if cache.token_ids is not None and input_ids.shape[0] == 1:
            cache.token_ids[start : start + steps] = input_ids[0]
        x = self.embed_tokens(input_ids)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, start, layer_cache)
        cache.length = start + steps
        last = x if all_logits else x[:, -1:]
        return ForwardOutput(logits=self.lm_head(self.norm(last), float32_out=True), hidden=x)

    @torch.inference_mode()
    def forward_batch(self, tokens: list[torch.Tensor], caches: list[ModelCache],
                      last_only: bool = False) -> list[ForwardOutput]:
        """Several sequences in one forward, each its own tokens ([T_b]: one for a decode step, the
        last one and the drafts for a verify step, a whole prompt) at its own positions in its own
        cache (its own length, sliding windows, sinks): each weight is read once for all of them.
        Returns each sequence's output, with the logits of all its positions (`last_only`: of its
        last one, as a prefill needs)."""
        if len(tokens) == 1:
            return [self.forward(tokens[0].view(1, -1), caches[0], all_logits=not last_only)]
        lengths = [len(ids) for ids in tokens]
        for cache, steps in zip(caches, lengths):
            if cache.length + steps > cache.max_tokens:
                raise ValueError(f"context full: {cache.length + steps} tokens > cache of {cache.max_tokens}")
        starts = [cache.length for cache in caches]
        x = self.embed_tokens(torch.cat(tokens).view(1, -1))
        for index, layer in enumerate(self.layers):
            x = layer.forward_batch(x, starts, lengths, [cache.layers[index] for cache in caches])
        for cache, ids, start in zip(caches, tokens, starts):
            if cache.token_ids is not None:
                cache.token_ids[start : start + len(ids)] = ids
            cache.length = start + len(ids)
        if last_only:
            ends = torch.tensor(lengths).cumsum(0) - 1
            logits = self.lm_head(self.norm(x[:, ends]), float32_out=True).split(1, dim=1)
        else:
            logits = self.lm_head(self.norm(x), float32_out=True).split(lengths, dim=1)
        return [ForwardOutput(logits=rows, hidden=hidden) for rows, hidden in zip(logits, x.split(lengths, dim=1))]

    @torch.inference_mode()
    def mtp_hidden(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor, start: int, cache) -> torch.Tensor:
        """Run MTP layer `layer` on (hidden [B, T, H], next token ids [B, T]) at positions start.."""
        return self.mtp_layers[layer](hidden, self.embed_tokens(token_ids), start, cache)

    @torch.inference_mode()
    def mtp_hidden_batch(self, layer: int, inputs: list[tuple]) -> list[torch.Tensor]:
        """`mtp_hidden` of several sequences in one forward: `inputs` holds each one's (hidden
        [1, T, H], next token ids [1, T], start, layer cache)."""
        if len(inputs) == 1:
            return [self.mtp_hidden(layer, *inputs[0])]
        hidden = torch.cat([h for h, _, _, _ in inputs], dim=1)
        ids = torch.cat([i for _, i, _, _ in inputs], dim=1)
        lengths = [i.shape[1] for _, i, _, _ in inputs]
        out = self.mtp_layers[layer].forward_batch(hidden, self.embed_tokens(ids), [s for *_, s, _ in inputs], lengths,
                                                   [c for *_, c in inputs])
        return list(out.split(lengths, dim=1))

    @torch.inference_mode()
    def mtp_logits_batch(self, layer: int, hidden: torch.Tensor, vocabularies: list) -> torch.Tensor:
        """`mtp_logits` of several sequences' hidden states [B, 1, H], each over its own draft
        vocabulary (or all of the head: None): the rows they share are read once."""
        if len(vocabularies) == 1:
            return self.mtp_logits(layer, hidden, vocabularies[0])
        sizes = {None if v is None else v.size for v in vocabularies}
        if len(sizes) > 1:
            return torch.cat([self.mtp_logits(layer, h[None], v) for h, v in zip(hidden, vocabularies)])
        normed = self.mtp_layers[layer].final_norm(hidden)
        if sizes == {None}:
            return self.lm_head(normed, float32_out=True)
        out = vocabularies[0].first_logits(normed)
        for rows, row_normed, vocabulary in zip(out, normed, vocabularies):
            vocabulary.add_extra_logits(rows, row_normed)
        return out

    @torch.inference_mode()
    def mtp_logits(self, layer: int, hidden: torch.Tensor, vocabulary=None) -> torch.Tensor:
        """float32 logits of MTP layer `layer` through the shared lm_head, or only over a draft
        `vocabulary` (speculative.DraftVocabulary: cheaper drafts, still lossless)."""
        normed = self.mtp_layers[layer].final_norm(hidden)
        if vocabulary is None:
            return self.lm_head(normed, float32_out=True)
        return vocabulary.logits(normed)
