"""Where each hub tensor goes in our modules: a parameter, or a slice of a fused/stacked one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import MLP, Attention, DecoderLayer, MoE

# MiMo-V2.5's vision and audio encoders: in the same shards as the text model, targets of nothing here, so
# never read, never counted and never missing (the audio_tokenizer/ and dflash/ folders are not in the index)
ENCODER_PREFIXES = ("visual.", "speech_embeddings.", "audio_encoder.")


def is_encoder_tensor(hub_name: str) -> bool:
    return hub_name.startswith(ENCODER_PREFIXES)


@dataclass(frozen=True)
class Target:
    param: str
    index: tuple = ()  # ints/slices selecting the part of the parameter this tensor fills


class WeightMap:
    def __init__(self, model: nn.Module):
        self.model = model
        self.targets: dict[str, Target] = {}

    def add(self, hub_name: str, param: str, *index) -> None:
        self.targets[hub_name] = Target(param, tuple(index))

    def add_model(self, mtp_prefix: str, mtp_names: dict[str, str], mtp_post_norm: str) -> "WeightMap":
        """Everything of a MiMo checkpoint: embeddings, decoder layers, final norm, lm_head, and the
        MTP layers under `mtp_prefix`{k}., whose hub names for token_norm / hidden_norm /
        input_proj / the block's post-attention norm differ between the families."""
        model = self.model
        self.add_shell("model.", tied=model.config.tie_word_embeddings)
        for i, layer in enumerate(model.layers):
            self.add_decoder_layer(f"model.layers.{i}.", f"layers.{i}.", layer)
        for k, layer in enumerate(model.mtp_layers):
            hub, ours = f"{mtp_prefix}{k}.", f"mtp_layers.{k}."
            for name, hub_name in mtp_names.items():
                self.add(f"{hub}{hub_name}.weight", f"{ours}{name}.weight")
            self.add_decoder_layer(hub, ours + "block.", layer.block, post_norm=mtp_post_norm)
            self.add(hub + "final_layernorm.weight", ours + "final_norm.weight")
        return self

    def add_shell(self, prefix: str, tied: bool) -> None:
        self.add(prefix + "embed_tokens.weight", "embed_tokens.weight")
        self.add(prefix + "norm.weight", "norm.weight")
        if not tied:  # a tied lm_head shares the embedding parameter
            self.add("lm_head.weight", "lm_head.weight")

    def add_decoder_layer(self, hub: str, ours: str, layer: DecoderLayer, post_norm="post_attention_layernorm"):
        self.add(hub + "input_layernorm.weight", ours + "input_layernorm.weight")
        self.add(hub + post_norm + ".weight", ours + "post_attention_layernorm.weight")
        self._add_attention(hub + "self_attn.", ours + "self_attn.", layer.self_attn)
        if isinstance(layer.mlp, MoE):
            self._add_moe(hub + "mlp.", ours + "mlp.", layer.mlp)
        else:
            self._add_mlp(hub + "mlp.", ours + "mlp.", layer.mlp)

    def _add_attention(self, hub: str, ours: str, attention: Attention) -> None:
        if self.model.config.attention_projection_layout == "fused_qkv":  # rows regrouped on read: fused_qkv.py
            self.add(hub + "qkv_proj.weight", ours + "qkv_proj.weight")
            if attention.spec.bias:
                self.add(hub + "qkv_proj.bias", ours + "qkv_proj.bias")
        else:
            self._add_split_qkv(hub, ours, attention)
        self.add(hub + "o_proj.weight", ours + "o_proj.weight")
        if attention.sinks is not None:
            self.add(hub + "attention_sink_bias", ours + "sinks")

    def _add_split_qkv(self, hub: str, ours: str, attention: Attention) -> None:
        sizes = {"q": attention.q_size, "k": attention.k_size, "v": attention.v_size}
        begin = 0
        for name, size in sizes.items():
            part = slice(begin, begin + size)
            self.add(f"{hub}{name}_proj.weight", ours + "qkv_proj.weight", part)
            if attention.spec.bias:
                self.add(f"{hub}{name}_proj.bias", ours + "qkv_proj.bias", part)
            begin += size

    def _add_mlp(self, hub: str, ours: str, mlp: MLP) -> None:
        inter = mlp.intermediate_size
        self.add(hub + "gate_proj.weight", ours + "gate_up_proj.weight", slice(0, inter))
        self.add(hub + "up_proj.weight", ours + "gate_up_proj.weight", slice(inter, 2 * inter))
        self.add(hub + "down_proj.weight", ours + "down_proj.weight")

    def _add_moe(self, hub: str, ours: str, moe: MoE) -> None:
        self.add(hub + "gate.weight", ours + "gate.weight")
        self.add(hub + "gate.e_score_correction_bias", ours + "gate.e_score_correction_bias")
        inter = moe.spec.intermediate_size
        for e in range(moe.spec.num_experts):
            expert = f"{hub}experts.{e}."
            group, row = moe.expert_location(e)  # experts are stacked per device group (offload)
            stack = f"{ours}groups.{group}."
            self.add(expert + "gate_proj.weight", stack + "gate_up_proj", row, slice(0, inter))
            self.add(expert + "up_proj.weight", stack + "gate_up_proj", row, slice(inter, 2 * inter))
            self.add(expert + "down_proj.weight", stack + "down_proj", row)
