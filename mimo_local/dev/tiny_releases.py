"""Tiny checkpoints in the hub layout of MiMo-V2.5 and V2.6 (model_type "mimo_v2"), and their twin in
the V2-Flash layout holding the same weights.

What these releases do differently from V2-Flash, as their published files show (tests/data/SOURCES.md):
- config: model_type "mimo_v2", architectures MiMoV2ForCausalLM, attention_projection_layout
  "fused_qkv", vision_config / audio_config beside the text settings, no num_nextn_predict_layers
  (the checkpoints hold three MTP layers); V2.6 adds moe_router_dtype and index metadata tp_size;
- q/k/v fused into one FP8 `self_attn.qkv_proj.weight`, written shard by shard for tensor
  parallelism: each shard [its Q heads | its K heads | its V heads], quantized on its own 128x128
  blocks (scale rows restart at every shard); o_proj stays bf16, the router float32;
- encoder tensors (visual.*, speech_embeddings.*, audio_encoder.*) in the first shard, an
  audio_tokenizer/ folder (V2.5) or a dflash/ drafter (V2.6) beside the index, never listed in it;
- files model_pp0_ep{N}_shard1.safetensors (routed experts split over N) and model_mtp.safetensors;
- V2.6: routed experts in MXFP4 (quantization_config store_dtype "mxfp4"): `weight` uint8
  [out, in/2], element 2i in the low nibble, and `weight_scale` uint8 [out, in/32], E8M0.
Written here from the description above, independently of mimo_local/fused_qkv.py, on purpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint import INDEX_FILE, dequantize_fp8_blocks, quantize_fp8_blocks, write_safetensors

RELEASES = {"mimo_v2.5": "v2.5", "mimo_v2.6": "v2.6"}
# V2.5 and V2.6 ship the same template as far as the public record shows (templates/README.md)
RELEASE_TEMPLATES = {"v2.5": "mimo-v2.5.jinja", "v2.6": "mimo-v2.5.jinja"}
EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1 codes 0-7; 8-15 the negatives
QKV_PARTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
ENCODER_SHAPES = {  # a few tensors of each encoder, shrunk
    "visual.patch_embed.proj.weight": (16, 3, 2, 4, 4),
    "visual.blocks.0.attn.qkv.weight": (48, 16),
    "visual.blocks.0.attn.qkv.bias": (48,),
    "visual.blocks.0.attn.sinks": (4,),
    "visual.merger.mlp.2.weight": (64, 64),
    "speech_embeddings.0.weight": (32, 16),
    "speech_embeddings.1.weight": (32, 16),
    "audio_encoder.input_local_transformer.layers.0.self_attn.q_proj.weight": (16, 16),
    "audio_encoder.projection.mlp.0.weight": (64, 16),
}


def release_chat_template(release: str) -> str:
    return (Path(__file__).parent / "templates" / RELEASE_TEMPLATES[release]).read_text()


def release_config(flash_config: dict, release: str) -> dict:
    """The V2-Flash tiny config in the release's form (same shapes)."""
    config = dict(flash_config, architectures=["MiMoV2ForCausalLM"], model_type="mimo_v2",
                  attention_projection_layout="fused_qkv", sliding_window=flash_config["sliding_window_size"])
    config["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "store_dtype": "fp8",
        "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(config["num_hidden_layers"])],
        "weight_block_size": [128, 128],
    }
    config["vision_config"] = {"depth": 1, "hidden_size": 16, "num_heads": 4, "out_hidden_size": config["hidden_size"]}
    config["audio_config"] = {"input_local_dim": 16, "input_local_layers": 1, "out_hidden_size": config["hidden_size"]}
    if release == "v2.6":
        config["moe_router_dtype"] = "bfloat16"
        config["quantization_config"].update(store_dtype="mxfp4", mxfp4_block_size=32)
    return config


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, E8M0 scales) per 32 inputs: the scale is the power of two that brings the
    block's largest magnitude into [4, 8), each value the nearest e2m1 (6 at most)."""
    blocks = weight.float().view(weight.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=2.0**-120)
    exponent = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent)
    index = (scaled.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(-1)
    codes = (index + 8 * (scaled < 0)).to(torch.uint8).view(weight.shape)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), (exponent + 127).to(torch.uint8).view(weight.shape[0], -1)


def mxfp4_values(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    signed = torch.cat([FP4_MAGNITUDES, -FP4_MAGNITUDES])
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1).long()
    return (signed[codes].view(packed.shape[0], -1, 32) * torch.exp2(scales.float() - 127)[..., None]).view(codes.shape)


def tp_degree(config: dict) -> int:
    """The shards q/k/v are saved in: the global layers' KV heads, as in the real checkpoints (V2.5: 4)."""
    return config["num_key_value_heads"]


def release_tensors(config: dict, logical: dict[str, torch.Tensor], generator: torch.Generator,
                    is_fp8_weight) -> dict[str, torch.Tensor]:
    """The release's tensors from the float weights `logical` (split q/k/v, V2-Flash names)."""
    tp = tp_degree(config)
    mxfp4_experts = config["quantization_config"]["store_dtype"] == "mxfp4"
    tensors = {}
    for name, tensor in logical.items():
        if name.endswith(QKV_PARTS[1:]):
            continue
        if name.endswith(QKV_PARTS[0]):
            prefix = name[: -len(QKV_PARTS[0])]
            q, k, v = (logical[prefix + part].float() for part in QKV_PARTS)
            quantized = [quantize_fp8_blocks(torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]))
                         for r in range(tp)]
            tensors[prefix + "qkv_proj.weight"] = torch.cat([fp8 for fp8, _ in quantized])
            tensors[prefix + "qkv_proj.weight_scale_inv"] = torch.cat([scale for _, scale in quantized])
        elif mxfp4_experts and EXPERT.match(name):
            tensors[name], tensors[name + "_scale"] = quantize_mxfp4(tensor)
        elif name.endswith(("e_score_correction_bias", "mlp.gate.weight")):
            tensors[name] = tensor.float()
        elif is_fp8_weight(name):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensor)
        else:
            tensors[name] = tensor.to(torch.bfloat16)
    for name, shape in ENCODER_SHAPES.items():
        tensors[name] = torch.randn(shape, generator=generator).to(torch.bfloat16)
    return tensors


def write_release(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int, release: str,
                  generator: torch.Generator) -> None:
    """Shards named as the releases name them, the index (V2.6: with tp_size), and the folders a text
    runner must leave alone."""
    experts = config["n_routed_experts"]
    files: dict[str, dict] = {}
    for name, tensor in tensors.items():
        expert = EXPERT.match(name)
        if name.startswith("model.mtp."):
            file = "model_mtp.safetensors"
        else:
            group = int(expert.group(1)) * shards // experts if expert else 0
            file = f"model_pp0_ep{group}_shard1.safetensors"
        files.setdefault(file, {})[name] = tensor
    for file, group in files.items():
        write_safetensors(out_dir / file, group)
    metadata = {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}
    if release == "v2.6":
        metadata["tp_size"] = tp_degree(config)
    weight_map = {name: file for file, group in files.items() for name in group}
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
    side = out_dir / ("audio_tokenizer" if release == "v2.5" else "dflash")
    side.mkdir()
    (side / "config.json").write_text(json.dumps({"architectures": ["SideModel"], "hidden_size": 16}))
    write_safetensors(side / "model.safetensors",  # names a text runner would clash with if it read them
                      {"model.embed_tokens.weight": torch.randn(8, 16, generator=generator).to(torch.bfloat16)})


def flash_twin(config: dict, tensors: dict[str, torch.Tensor], qkv_shapes: dict[str, tuple]):
    """The same weights in the V2-Flash layout: split q/k/v, every FP8 or MXFP4 weight dequantized to
    float32 (shard by shard for the fused q/k/v), no encoders. `qkv_shapes`: the split q/k/v shapes."""
    tp = tp_degree(config)
    twin = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv") or name.split(".")[0] in ("visual", "speech_embeddings", "audio_encoder"):
            continue
        if name.endswith("_scale"):
            continue
        if tensor.dtype == torch.uint8:
            twin[name] = mxfp4_values(tensor, tensors[name + "_scale"])
            continue
        if tensor.dtype != torch.float8_e4m3fn:
            twin[name] = tensor
            continue
        scale = tensors[name + "_scale_inv"]
        if not name.endswith("qkv_proj.weight"):
            twin[name] = dequantize_fp8_blocks(tensor, scale)
            continue
        prefix = name[: -len("qkv_proj.weight")]
        sizes = [qkv_shapes[prefix + part][0] // tp for part in QKV_PARTS]
        shards = [dequantize_fp8_blocks(w, s) for w, s in zip(tensor.chunk(tp), scale.chunk(tp))]
        for index, part in enumerate(QKV_PARTS):
            twin[prefix + part] = torch.cat([shard.split(sizes)[index] for shard in shards])
    drop = ("attention_projection_layout", "quantization_config", "vision_config", "audio_config", "moe_router_dtype")
    twin_config = {key: value for key, value in config.items() if key not in drop}
    twin_config.update(architectures=["MiMoV2FlashForCausalLM"], model_type="mimo_v2_flash")
    return twin_config, twin
