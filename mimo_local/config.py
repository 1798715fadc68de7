"""MiMoConfig: one description of either MiMo family, read from the hub `config.json`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import limits
from .errors import MimoError
from .limits import json_type, positive_int

FAMILIES = {"mimo": "MiMo-7B", "mimo_v2_flash": "MiMo-V2-Flash"}
# config.json's model_type -> the family (backbone) that runs it. MiMo-V2.5, V2.5-Pro and V2.6 say
# "mimo_v2": the V2-Flash backbone, its text settings at the top level beside vision/audio encoders.
MODEL_TYPES = {"mimo": "mimo", "mimo_v2_flash": "mimo_v2_flash", "mimo_v2": "mimo_v2_flash"}
MODEL_TYPE_NAMES = {"mimo_v2": "MiMo-V2.5/V2.6"}
ENCODER_CONFIGS = ("vision_config", "audio_config")  # encoders a text runner never builds or counts
PROJECTION_LAYOUTS = ("split", "fused_qkv")
ROUTER_DTYPES = ("float32", "bfloat16")
EXPERT_STORE_DTYPES = ("fp8", "mxfp4")
RELEASED_V2_MTP_LAYERS = 3
KV_SCALE_BYTES = 2  # an int8 KV cache's scale per head and position, for keys and for values (bfloat16)  # V2-Flash and V2.5 configs do not say; the released checkpoints have three


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

    def kv_bytes_per_token(self, dtype_bytes: int, int8: bool = False) -> int:
        """Key and value bytes of one position; `int8`: one byte each plus a scale per head (cache.py)."""
        if int8:
            return self.num_kv_heads * (self.head_dim + self.v_head_dim + 2 * KV_SCALE_BYTES)
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
    family: str  # the backbone: "mimo" | "mimo_v2_flash" (model_type "mimo_v2" runs as mimo_v2_flash)
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
    model_type: str = ""  # as config.json says it ("mimo_v2" for V2.5/V2.6); empty: the family's own
    attention_projection_layout: str = "split"  # "fused_qkv": one qkv_proj tensor per layer on disk
    router_dtype: str = "float32"  # moe_router_dtype as declared (routing itself always runs in float32)
    mxfp4_block_size: int | None = None  # routed experts stored as MXFP4 (e2m1 + one E8M0 scale per block)
    ignored_encoders: tuple[str, ...] = ()  # vision_config / audio_config present and not part of our model

    def attention(self, layer: int) -> AttentionSpec:
        return self.sliding_attention if self.layer_is_sliding[layer] else self.global_attention

    @property
    def display_family(self) -> str:
        return MODEL_TYPE_NAMES.get(self.model_type) or FAMILIES[self.family]

    def kv_bytes_per_token(self, dtype_bytes: int = 2, cache_type: str = "bf16") -> int:
        """Bytes the KV cache grows by per token: global layers only (sliding ones are fixed);
        `cache_type` "int8" holds them in int8 (cache.QuantizedKVCache)."""
        return sum(
            self.attention(i).kv_bytes_per_token(dtype_bytes, int8=cache_type == "int8")
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
    """Reads hub config keys with their types and bounds checked: a missing or bad one is a one-line
    error naming it (and the limit it breaks), found before anything is built from it."""

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

    def _name(self, names: tuple[str, ...]) -> str:
        return next((n for n in names if self.raw.get(n) is not None), names[0])

    def need_int(self, *names: str, limit: int, minimum: int = 1) -> int:
        return self.integer(self._name(names), self.need(*names), limit, minimum)

    def get_int(self, name: str, default: int, limit: int, minimum: int = 1) -> int:
        return self.integer(name, self.get(name, default), limit, minimum)

    def integer(self, name: str, value, limit: int, minimum: int = 1) -> int:
        try:
            return positive_int(value, f"'{name}'", limit, minimum)
        except MimoError as error:
            raise MimoError(f"{self.source}: {error}") from None

    def need_float(self, *names: str, positive: bool = True) -> float:
        return self.number(self._name(names), self.need(*names), positive)

    def get_float(self, name: str, default: float, positive: bool = True) -> float:
        return self.number(name, self.get(name, default), positive)

    def number(self, name: str, value, positive: bool = True) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise MimoError(f"{self.source}: '{name}' must be a finite number, not {json_type(value)} ({value!r:.40})")
        if positive and value <= 0:
            raise MimoError(f"{self.source}: '{name}' must be positive (got {value})")
        return float(value)

    def get_bool(self, name: str, default: bool) -> bool:
        return self.flag(name, self.get(name, default))

    def flag(self, name: str, value) -> bool:
        if value not in (True, False) or type(value) not in (bool, int):  # 0 / 1 as some configs write them
            raise MimoError(f"{self.source}: '{name}' must be true or false, not {value!r:.40}")
        return bool(value)


def _eos_ids(raw: dict, generation_config: dict, vocab_size: int, source: str) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (generation_config.get("eos_token_id"), raw.get("eos_token_id")):
        if value is None:
            continue
        for token in value if isinstance(value, list) else [value]:
            if type(token) is not int or not 0 <= token < vocab_size:
                raise MimoError(f"{source}: eos_token_id {token!r:.40} is not a token id below vocab_size {vocab_size}")
            if token not in ids:
                ids.append(token)
    return tuple(ids)


def _fp8_block(keys: _Keys) -> tuple[int, int] | None:
    quant = keys.raw.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise MimoError(f"{keys.source}: 'quantization_config' must be an object, not {json_type(quant)}")
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size") or [128, 128]
    if not isinstance(block, list) or len(block) != 2:
        raise MimoError(f"{keys.source}: 'weight_block_size' must be a list of two integers, not {block!r:.40}")
    rows, cols = (keys.integer("weight_block_size", b, limits.MAX_FP8_BLOCK) for b in block)
    return rows, cols


def _attention_heads(keys: _Keys, prefix: str = "") -> tuple[int, int]:
    heads = keys.need_int(prefix + "num_attention_heads", limit=limits.MAX_HEADS)
    kv_heads = keys.need_int(prefix + "num_key_value_heads", limit=limits.MAX_HEADS)
    if heads % kv_heads:
        raise MimoError(f"{keys.source}: '{prefix}num_attention_heads' ({heads}) is not a multiple of "
                        f"'{prefix}num_key_value_heads' ({kv_heads})")
    return heads, kv_heads


def _layers(keys: _Keys) -> int:
    return keys.need_int("num_hidden_layers", limit=limits.MAX_LAYERS)


def _parse_mimo(keys: _Keys, raw: dict) -> dict:
    hidden = keys.need_int("hidden_size", limit=limits.MAX_HIDDEN_SIZE)
    heads, kv_heads = _attention_heads(keys)
    if raw.get("head_dim") is None and hidden % heads:
        raise MimoError(f"{keys.source}: 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads})")
    head_dim = keys.get_int("head_dim", hidden // heads, limit=limits.MAX_HEAD_DIM)
    if head_dim % 2:
        raise MimoError(f"{keys.source}: head dimension {head_dim} must be even (rotary embedding)")
    if raw.get("use_sliding_window") not in (None, False, 0):
        raise MimoError(f"{keys.source}: use_sliding_window=true is not a MiMo-7B layout")
    attention = AttentionSpec(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        rope_theta=keys.need_float("rope_theta"),
        rope_dim=head_dim,
        sliding_window=None,
        has_sink=False,
        bias=keys.get_bool("attention_bias", True),
    )
    layers = _layers(keys)
    return dict(
        global_attention=attention,
        sliding_attention=None,
        layer_is_sliding=(False,) * layers,
        layer_is_moe=(False,) * layers,
        moe=None,
        num_mtp_layers=keys.get_int("num_nextn_predict_layers", 0, limit=limits.MAX_MTP_LAYERS, minimum=0),
        rms_norm_eps=keys.need_float("rms_norm_eps"),
    )


def _parse_v2_flash(keys: _Keys, raw: dict) -> dict:
    layers = _layers(keys)
    pattern = keys.need("hybrid_layer_pattern")
    moe_freq = keys.need("moe_layer_freq")
    for name, values in (("hybrid_layer_pattern", pattern), ("moe_layer_freq", moe_freq)):
        if not isinstance(values, list) or len(values) != layers:
            raise MimoError(f"{keys.source}: '{name}' must list one entry per layer ({layers})")
        for value in values:
            keys.flag(name, value)
    rotary = keys.need_float("partial_rotary_factor")
    if rotary > 1:
        raise MimoError(f"{keys.source}: 'partial_rotary_factor' must be in (0, 1] (got {rotary})")
    value_scale = keys.get_float("attention_value_scale", 1.0)

    def spec(prefix: str, theta_key: str, sink_key: str, window: int | None) -> AttentionSpec:
        heads, kv_heads = _attention_heads(keys, prefix)
        head_dim = keys.need_int(prefix + "head_dim", limit=limits.MAX_HEAD_DIM)
        rope_dim = int(head_dim * rotary)
        if rope_dim < 2 or rope_dim % 2:
            raise MimoError(f"{keys.source}: '{prefix}head_dim' {head_dim} x partial_rotary_factor {rotary} gives "
                            f"{rope_dim} rotated dimensions (an even number >= 2 is needed)")
        return AttentionSpec(
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            v_head_dim=keys.need_int(prefix + "v_head_dim", limit=limits.MAX_HEAD_DIM),
            rope_theta=keys.need_float(theta_key),
            rope_dim=rope_dim,
            sliding_window=window,
            has_sink=keys.get_bool(sink_key, False),
            bias=keys.get_bool("attention_bias", False),
            value_scale=value_scale,
        )

    sliding = any(pattern)
    scoring = keys.get("scoring_func", "sigmoid")
    if not isinstance(scoring, str) or scoring != "sigmoid":
        raise MimoError(f"{keys.source}: scoring_func {scoring!r:.40} is not supported (MiMo uses sigmoid)")
    return dict(
        global_attention=spec("", "rope_theta", "add_full_attention_sink_bias", None),
        sliding_attention=spec(
            "swa_", "swa_rope_theta", "add_swa_attention_sink_bias",
            keys.need_int("sliding_window_size", "sliding_window", limit=limits.MAX_CONTEXT),
        )
        if sliding
        else None,
        layer_is_sliding=tuple(bool(p) for p in pattern),
        layer_is_moe=tuple(bool(m) for m in moe_freq),
        moe=_moe(keys, sum(bool(m) for m in moe_freq)) if any(moe_freq) else None,
        num_mtp_layers=0,  # not in the config: counted from the checkpoint's keys
        rms_norm_eps=keys.need_float("layernorm_epsilon", "rms_norm_eps"),
    )


def _parse_v2(keys: _Keys, raw: dict) -> dict:
    """model_type "mimo_v2" (MiMo-V2.5, V2.5-Pro, V2.6): the V2-Flash text settings plus the keys
    these releases add. vision_config / audio_config (and processor_config) describe encoders that a
    text runner neither builds nor counts: they are only noted, never read."""
    fields = _parse_v2_flash(keys, raw)
    shared = keys.get("n_shared_experts", 0)
    if shared != 0:
        raise MimoError(f"{keys.source}: n_shared_experts {shared!r:.40} is not supported (MiMo-V2 has none)")
    return dict(
        fields,
        # absent: three, as every converter assumes (the released V2.5 checkpoints hold model.mtp.layers.0-2)
        num_mtp_layers=keys.get_int("num_nextn_predict_layers", RELEASED_V2_MTP_LAYERS,
                                    limit=limits.MAX_MTP_LAYERS, minimum=0),
        attention_projection_layout=_choice(keys, "attention_projection_layout", "split", PROJECTION_LAYOUTS),
        router_dtype=_choice(keys, "moe_router_dtype", "float32", ROUTER_DTYPES),
        ignored_encoders=tuple(name.removesuffix("_config") for name in ENCODER_CONFIGS if raw.get(name) is not None),
    )


def _choice(keys: _Keys, name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = keys.get(name, default)
    if not isinstance(value, str) or value not in allowed:
        raise MimoError(f"{keys.source}: '{name}' {value!r:.40} is not supported ({', '.join(allowed)})")
    return value


def _mxfp4_block(keys: _Keys) -> int | None:
    """The MXFP4 block of routed experts that an FP8 checkpoint stores as MXFP4 (MiMo-V2.6:
    quant_method fp8 with store_dtype "mxfp4"), None when the experts are FP8 like the rest."""
    quant = keys.raw.get("quantization_config") or {}
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    store = quant.get("store_dtype")
    if store is None:
        return None
    if not isinstance(store, str) or store not in EXPERT_STORE_DTYPES:
        raise MimoError(f"{keys.source}: quantization_config store_dtype {store!r:.40} is not supported "
                        f"({', '.join(EXPERT_STORE_DTYPES)})")
    if store != "mxfp4":
        return None
    block = quant.get("mxfp4_block_size")
    block = 32 if block is None else keys.integer("mxfp4_block_size", block, limits.MAX_FP8_BLOCK)
    if block != 32:  # the OCP MX format: 32 e2m1 values share one E8M0 scale
        raise MimoError(f"{keys.source}: mxfp4_block_size {block} is not supported (MXFP4 blocks are 32 values)")
    return block


def _moe(keys: _Keys, moe_layers: int) -> MoESpec:
    experts = keys.need_int("n_routed_experts", limit=limits.MAX_EXPERTS)
    if experts * moe_layers > limits.MAX_EXPERT_MODULES:
        raise MimoError(f"{keys.source}: {experts} experts x {moe_layers} MoE layers is over the limit of "
                        f"{limits.MAX_EXPERT_MODULES} routed experts")
    groups = keys.get_int("n_group", 1, limit=experts)
    if experts % groups:
        raise MimoError(f"{keys.source}: 'n_routed_experts' ({experts}) is not a multiple of 'n_group' ({groups})")
    return MoESpec(
        num_experts=experts,
        experts_per_token=keys.need_int("num_experts_per_tok", limit=experts),
        intermediate_size=keys.need_int("moe_intermediate_size", limit=limits.MAX_INTERMEDIATE_SIZE),
        norm_topk_prob=keys.get_bool("norm_topk_prob", True),
        routed_scaling_factor=keys.get_float("routed_scaling_factor", 1.0),
        n_group=groups,
        topk_group=keys.get_int("topk_group", 1, limit=groups),
    )


def parse_config(raw: dict, source: str = "config.json", generation_config: dict | None = None) -> MiMoConfig:
    """Every key is type- and range-checked (limits.MAX_*) before anything is built from it."""
    if not isinstance(raw, dict):
        raise MimoError(f"{source}: expected a JSON object, found {json_type(raw)}")
    generation_config = generation_config or {}
    if not isinstance(generation_config, dict):
        raise MimoError(f"generation_config.json: expected a JSON object, found {json_type(generation_config)}")
    keys = _Keys(raw, source)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise MimoError(
            f"{source}: unknown model_type {model_type!r:.40} (supported: {', '.join(MODEL_TYPES)})"
        )
    parse = {"mimo": _parse_mimo, "mimo_v2_flash": _parse_v2_flash, "mimo_v2": _parse_v2}[model_type]
    family_fields = parse(keys, raw)
    vocab_size = keys.need_int("vocab_size", limit=limits.MAX_VOCAB_SIZE)
    return MiMoConfig(
        family=MODEL_TYPES[model_type],
        model_type=model_type,
        mxfp4_block_size=_mxfp4_block(keys),
        vocab_size=vocab_size,
        hidden_size=keys.need_int("hidden_size", limit=limits.MAX_HIDDEN_SIZE),
        num_layers=_layers(keys),
        intermediate_size=keys.need_int("intermediate_size", limit=limits.MAX_INTERMEDIATE_SIZE),
        max_position_embeddings=keys.need_int("max_position_embeddings", limit=limits.MAX_CONTEXT),
        tie_word_embeddings=keys.get_bool("tie_word_embeddings", False),
        eos_token_ids=_eos_ids(raw, generation_config, vocab_size, source),
        fp8_block_size=_fp8_block(keys),
        **family_fields,
    )


def load_config(model_dir: str | Path) -> MiMoConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MimoError(f"model directory not found: {model_dir}")
    generation_path = model_dir / "generation_config.json"
    generation = (
        limits.read_json_object(generation_path, limits.MAX_CONFIG_BYTES) if os.path.lexists(generation_path) else {}
    )
    config_path = model_dir / "config.json"
    return parse_config(limits.read_json_object(config_path, limits.MAX_CONFIG_BYTES), str(config_path), generation)


def read_raw_config(model_dir: str | Path) -> dict:
    """config.json of a model directory as a dict (size-capped, a regular file, a JSON object)."""
    return limits.read_json_object(Path(model_dir) / "config.json", limits.MAX_CONFIG_BYTES)
