"""MiMo-V2-Flash (model_type "mimo_v2_flash"): hybrid global/sliding attention with sinks,
sigmoid-routed MoE after a dense layer 0, and three MTP layers (counted from the checkpoint)."""

from __future__ import annotations

import re

from ..config import MiMoConfig
from .layers import MLP, DecoderLayer, MoE, RopeSet
from .model import MiMoForCausalLM, MTPLayer
from .weights import WeightMap

MTP_KEY = re.compile(r"^model\.mtp\.layers\.(\d+)\.")


def build(config: MiMoConfig, num_mtp_layers: int) -> MiMoForCausalLM:
    size, eps = config.hidden_size, config.rms_norm_eps
    ropes = RopeSet()
    layers = []
    for i in range(config.num_layers):
        mlp = MoE(size, config.moe) if config.layer_is_moe[i] else MLP(size, config.intermediate_size)
        layers.append(DecoderLayer(size, eps, config.attention(i), mlp, ropes(config.attention(i))))
    mtp_attention = config.sliding_attention or config.global_attention
    mtp = [
        MTPLayer(config, mtp_attention, ropes(mtp_attention), embedding_first=True) for _ in range(num_mtp_layers)
    ]
    return MiMoForCausalLM(config, layers, mtp)


def count_mtp_layers(config: MiMoConfig, tensor_names: list[str]) -> int:
    return len({m.group(1) for n in tensor_names if (m := MTP_KEY.match(n))})


def weight_map(model: MiMoForCausalLM) -> WeightMap:
    return WeightMap(model).add_model(
        "model.mtp.layers.", {"token_norm": "enorm", "hidden_norm": "hnorm", "input_proj": "eh_proj"}, mtp_post_norm="pre_mlp_layernorm"
    )
