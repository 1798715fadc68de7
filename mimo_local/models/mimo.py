"""MiMo-7B (model_type "mimo"): a Qwen2 decoder with q/k/v biases plus one MTP layer."""

from __future__ import annotations

from ..config import MiMoConfig
from .layers import MLP, DecoderLayer, RopeSet
from .model import MiMoForCausalLM, MTPLayer
from .weights import WeightMap


def build(config: MiMoConfig, num_mtp_layers: int) -> MiMoForCausalLM:
    size, eps = config.hidden_size, config.rms_norm_eps
    ropes = RopeSet()
    attention = config.global_attention
    layers = [
        DecoderLayer(size, eps, attention, MLP(size, config.intermediate_size), ropes(attention))
        for _ in range(config.num_layers)
    ]
    mtp = [MTPLayer(config, attention, ropes(attention), embedding_first=False) for _ in range(num_mtp_layers)]
    return MiMoForCausalLM(config, layers, mtp)


def count_mtp_layers(config: MiMoConfig, tensor_names: list[str]) -> int:
    present = {int(n.split(".")[2]) for n in tensor_names if n.startswith("model.mtp_layers.")}
    return min(config.num_mtp_layers, len(present))


def weight_map(model: MiMoForCausalLM) -> WeightMap:
    return WeightMap(model).add_model(
        "model.mtp_layers.", {"token_norm": "token_layernorm", "hidden_norm": "hidden_layernorm", "input_proj": "input_proj"}, mtp_post_norm="post_attention_layernorm"
    )
