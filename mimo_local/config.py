"""MiMoConfig: one description of either MiMo family, read from the hub `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import MimoError

FAMILIES = {"mimo": "MiMo-7B", "mimo_v2_flash": "MiMo-V2-Flash"}


@dataclass(frozen=True)
class AttentionSpec:
    """Geometry of one kind of attention layer (global or sliding)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int  # queries and keys
    v_head_dim: int
    rope_theta: float
    rope_dim: int  # leading dims of each head that are rotated (rotate-half style)
    sliding_window: int | None  # number of PREVIOUS tokens a query sees; None = global
    has_sink: bool
    bias: bool
    value_scale: float = 1.0

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * dtype_bytes


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    experts_per_token: int
    intermediate_size: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int
    topk_group: int


@dataclass(frozen=True)
class MiMoConfig:
    family: str  # "mimo" | "mimo_v2_flash"
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    global_attention: AttentionSpec
    sliding_attention: AttentionSpec | None
    layer_is_sliding: tuple[bool, ...]
    layer_is_moe: tuple[bool, ...]
    moe: MoESpec | None
    num_mtp_layers: int
    eos_token_ids: tuple[int, ...] = ()
    fp8_block_size: tuple[int, int] | None = None

    def attention(self, layer: int) -> AttentionSpec:
        return self.sliding_attention if self.layer_is_sliding[layer] else self.global_attention

    @property
    def display_family(self) -> str:
        return FAMILIES[self.family]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes the KV cache grows by per token: global layers only (sliding ones are fixed)."""
        return sum(
            self.attention(i).kv_bytes_per_token(dtype_bytes)
            for i in range(self.num_layers)
            if not self.layer_is_sliding[i]
        )

    def kv_fixed_bytes(self, dtype_bytes: int = 2, extra_slots: int = 0) -> int:
        """Bytes of the sliding-window ring buffers, independent of the context length."""
        if self.sliding_attention is None:
            return 0
        spec = self.sliding_attention
        slots = spec.sliding_window + extra_slots
        return sum(self.layer_is_sliding) * slots * spec.kv_bytes_per_token(dtype_bytes)


class _Keys:
    """Reads hub config keys, turning a missing one into a one-line error naming it."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def need(self, *names: str):
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                return self.raw[name]
        raise MimoError(f"{self.source}: missing config key '{names[0]}'")

    def get(self, name: str, default):
        value = self.raw.get(name)
        return default if value is None else value


def _eos_ids(raw: dict, generation_config: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (generation_config.get("eos_token_id"), raw.get("eos_token_id")):
        if value is None:
            continue
        for token in value if isinstance(value, list) else [value]:
            if token not in ids:
                ids.append(int(token))
    return tuple(ids)


def _fp8_block(raw: dict) -> tuple[int, int] | None:
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


def _parse_mimo(keys: _Keys, raw: dict) -> dict:
    hidden = keys.need("hidden_size")
    heads = keys.need("num_attention_heads")
    head_dim = keys.get("head_dim", hidden // heads)
    if raw.get("use_sliding_window"):
        raise MimoError(f"{keys.source}: use_sliding_window=true is not a MiMo-7B layout")
    attention = AttentionSpec(
        num_heads=heads,
        num_kv_heads=keys.need("num_key_value_heads"),
        head_dim=head_dim,
        v_head_dim=head_dim,
        rope_theta=float(keys.need("rope_theta")),
        rope_dim=head_dim,
        sliding_window=None,
        has_sink=False,
        bias=bool(keys.get("attention_bias", True)),
    )
    layers = keys.need("num_hidden_layers")
    return dict(
        global_attention=attention,
        sliding_attention=None,
        layer_is_sliding=(False,) * layers,
        layer_is_moe=(False,) * layers,
        moe=None,
        num_mtp_layers=int(keys.get("num_nextn_predict_layers", 0)),
        rms_norm_eps=float(keys.need("rms_norm_eps")),
    )


def _parse_v2_flash(keys: _Keys, raw: dict) -> dict:
    layers = keys.need("num_hidden_layers")
    pattern = keys.need("hybrid_layer_pattern")
    moe_freq = keys.need("moe_layer_freq")
    for name, values in (("hybrid_layer_pattern", pattern), ("moe_layer_freq", moe_freq)):
        if not isinstance(values, list) or len(values) != layers:
            raise MimoError(f"{keys.source}: '{name}' must list one entry per layer ({layers})")
    rotary = float(keys.need("partial_rotary_factor"))
    value_scale = float(keys.get("attention_value_scale", 1.0))

    def spec(prefix: str, theta_key: str, sink_key: str, window: int | None) -> AttentionSpec:
        head_dim = keys.need(prefix + "head_dim")
        return AttentionSpec(
            num_heads=keys.need(prefix + "num_attention_heads"),
            num_kv_heads=keys.need(prefix + "num_key_value_heads"),
            head_dim=head_dim,
            v_head_dim=keys.need(prefix + "v_head_dim"),
            rope_theta=float(keys.need(theta_key)),
            rope_dim=int(head_dim * rotary),
            sliding_window=window,
            has_sink=bool(keys.get(sink_key, False)),
            bias=bool(keys.get("attention_bias", False)),
            value_scale=value_scale,
        )

    sliding = any(pattern)
    scoring = keys.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise MimoError(f"{keys.source}: scoring_func '{scoring}' is not supported (MiMo uses sigmoid)")
    return dict(
        global_attention=spec("", "rope_theta", "add_full_attention_sink_bias", None),
        sliding_attention=spec(
            "swa_", "swa_rope_theta", "add_swa_attention_sink_bias", keys.need("sliding_window_size")
        )
        if sliding
        else None,
        layer_is_sliding=tuple(bool(p) for p in pattern),
        layer_is_moe=tuple(bool(m) for m in moe_freq),
        moe=MoESpec(
            num_experts=keys.need("n_routed_experts"),
            experts_per_token=keys.need("num_experts_per_tok"),
            intermediate_size=keys.need("moe_intermediate_size"),
            norm_topk_prob=bool(keys.get("norm_topk_prob", True)),
            routed_scaling_factor=float(keys.get("routed_scaling_factor", 1.0)),
            n_group=int(keys.get("n_group", 1)),
            topk_group=int(keys.get("topk_group", 1)),
        )
        if any(moe_freq)
        else None,
        num_mtp_layers=0,  # not in the config: counted from the checkpoint's keys
        rms_norm_eps=float(keys.need("layernorm_epsilon", "rms_norm_eps")),
    )


def parse_config(raw: dict, source: str = "config.json", generation_config: dict | None = None) -> MiMoConfig:
    keys = _Keys(raw, source)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise MimoError(
            f"{source}: unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})"
        )
    family_fields = (_parse_mimo if model_type == "mimo" else _parse_v2_flash)(keys, raw)
    return MiMoConfig(
        family=model_type,
        vocab_size=keys.need("vocab_size"),
        hidden_size=keys.need("hidden_size"),
        num_layers=keys.need("num_hidden_layers"),
        intermediate_size=keys.need("intermediate_size"),
        max_position_embeddings=keys.need("max_position_embeddings"),
        tie_word_embeddings=bool(keys.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids(raw, generation_config or {}),
        fp8_block_size=_fp8_block(raw),
        **family_fields,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MimoError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MimoError(f"{path}: not valid JSON ({error})") from None


def load_config(model_dir: str | Path) -> MiMoConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MimoError(f"model directory not found: {model_dir}")
    generation_path = model_dir / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.exists() else {}
    config_path = model_dir / "config.json"
    return parse_config(_read_json(config_path), str(config_path), generation)
