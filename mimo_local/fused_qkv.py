"""The fused q|k|v projection of MiMo-V2.5, V2.5-Pro and V2.6 checkpoints
(attention_projection_layout "fused_qkv"): one `self_attn.qkv_proj.weight` per layer, stored as the
tensor-parallel shards it was saved from, each shard with its own FP8 scale blocks.

On disk, with T shards, H query heads and G KV heads:
    rows = [Q_0 | K_0 | V_0 | Q_1 | K_1 | V_1 | ... | Q_T-1 | K_T-1 | V_T-1]
    Q_r = query heads r*H/T .. (r+1)*H/T - 1, K_r and V_r = KV heads r*G/T .. (r+1)*G/T - 1,
    weight_scale_inv = T grids of ceil(rows per shard / 128) block rows: the blocks of each shard
    start at its first row, its last block only partly used.
Our qkv_proj parameter is [Q | K | V] over all heads, so reading regroups the rows.

Why this reading (sources checked 2026-12-02):
- The published MiMo-V2.5 shapes (tests/data/SOURCES.md, the tensor table of the hub checkpoint):
  global layers [13568, 4096] with [108, 32] scales = 4 x ceil(3392 / 128) = 4 x 27 (one grid
  over the whole tensor would have 106 rows); sliding layers, 8 KV heads, [14848, 4096] with
  [116, 32] = 4 x 29 block rows. MTP layers have the sliding shapes.
- llama.cpp conversion/mimo.py, MimoV2Model._tp_aware_qkv_dequant: per rank [Q_per | K_per | V_per]
  with Q_per = H*head_dim/T rows, one scale grid per rank, regrouped into [Q | K | V].
- SGLang models/mimo_v2.py (_deinterleave_qkv_shards, and get_mimo_v2_fused_qkv_expected_tp_size
  in configs/model_config.py): the same, with T = num_key_value_heads (V2.5: 4, Pro: 8).
- vLLM models/mimo_v2.py, _shard_fp8_qkv_proj, reads groups per KV head [Q_h | K_h | V_h] with one
  scale grid per KV head. When T equals the KV-head count (V2.5's global layers, every Pro layer)
  that is the same layout; for V2.5's sliding layers (8 KV heads over 4 shards) it would need
  8 x 27 = 216 scale rows where the checkpoint has 116, so the per-shard reading is the one the
  files fit. Within a shard of two KV heads the shapes cannot tell the orders apart; llama.cpp and
  SGLang both read [Q_r | K_r | V_r] there, as written above.
T: the index's metadata `tp_size` when it is there (V2.6), else the global layers' KV-head count
(SGLang's rule). A head count that T does not divide is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import AttentionSpec, MiMoConfig
from .errors import MimoError

QKV_KEY = re.compile(r"^model\.(?:layers\.(\d+)|mtp\.layers\.\d+)\.self_attn\.qkv_proj\.(?:weight|bias)$")
MAX_TP_DEGREE = 1024


@dataclass(frozen=True)
class QkvShards:
    """Rows of one fused q|k|v tensor as its tensor-parallel shards hold them."""

    shards: int
    q_rows: int  # per shard
    k_rows: int
    v_rows: int

    @property
    def shard_rows(self) -> int:
        return self.q_rows + self.k_rows + self.v_rows

    def to_fused(self, tensor: torch.Tensor) -> torch.Tensor:
        """Hub row order -> ours, [Q | K | V] over all heads (a weight or a bias)."""
        rest = tensor.shape[1:]
        parts = tensor.reshape(self.shards, self.shard_rows, *rest)
        q, k, v = parts.split([self.q_rows, self.k_rows, self.v_rows], dim=1)
        return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])

    def to_hub(self, tensor: torch.Tensor) -> torch.Tensor:
        """Ours -> hub row order (the inverse of to_fused)."""
        rest = tensor.shape[1:]
        q, k, v = tensor.split([self.shards * self.q_rows, self.shards * self.k_rows, self.shards * self.v_rows])
        parts = [part.reshape(self.shards, -1, *rest) for part in (q, k, v)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)


def tp_degree(config: MiMoConfig, metadata: dict) -> int:
    declared = metadata.get("tp_size")
    if declared is None:
        return config.global_attention.num_kv_heads
    try:
        value = int(declared) if isinstance(declared, (int, str)) and not isinstance(declared, bool) else None
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_TP_DEGREE:
        raise MimoError(f"index metadata tp_size {declared!r:.40} is not a tensor-parallel degree (1-{MAX_TP_DEGREE})")
    return value


def shards_of(spec: AttentionSpec, tp: int, name: str) -> QkvShards:
    if spec.num_heads % tp or spec.num_kv_heads % tp:
        raise MimoError(f"'{name}': {spec.num_heads} query and {spec.num_kv_heads} KV heads do not split into "
                        f"{tp} tensor-parallel shards")
    kv = spec.num_kv_heads // tp
    return QkvShards(tp, spec.num_heads // tp * spec.head_dim, kv * spec.head_dim, kv * spec.v_head_dim)


def layouts(config: MiMoConfig, names, metadata: dict) -> dict[str, QkvShards]:
    """The shard layout of every fused q|k|v tensor among `names` (decoder and MTP layers; the MTP
    layers attend like the sliding-window layers, as models/mimo_v2_flash.py builds them)."""
    if config.attention_projection_layout != "fused_qkv":
        return {}
    tp = tp_degree(config, metadata)
    mtp_spec = config.sliding_attention or config.global_attention
    found = {}
    for name in names:
        match = QKV_KEY.match(name)
        if match is None:
            continue
        layer = match.group(1)
        if layer is not None and int(layer) >= config.num_layers:
            continue  # not a tensor of the model: coverage reports what is missing, not what is extra
        spec = mtp_spec if layer is None else config.attention(int(layer))
        found[name] = shards_of(spec, tp, name)
    return found
