"""Generate small random-weight checkpoints in the exact hub layout of both MiMo families.

Config keys, tensor names, shapes, dtypes, sharding with model.safetensors.index.json, FP8 e4m3
weights with 128x128 `weight_scale_inv` blocks and tokenizer files all follow the real
XiaomiMiMo repositories, so the loader is tested on what it will meet. The layout is written out
here independently of the model code on purpose.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import INDEX_FILE, quantize_fp8_blocks, write_safetensors_streamed
from ..errors import MimoError
from .tiny_releases import RELEASES, flash_twin, release_chat_template, release_config, release_tensors, write_release
from .tokenizer_files import CHATML_TEMPLATE, train_tokenizer, write_tokenizer_files

PRESETS = {
    "mimo": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=160, mtp_layers=1),
    # The full-size MiMo-7B layout (15.6 GB bf16): real-size load, start and decode measurements.
    "mimo-7b-full": dict(vocab_size=151680, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=11008, mtp_layers=1),
    "mimo-bench": dict(vocab_size=151680, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=2816, mtp_layers=1),
    "mimo_v2_flash": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                          num_key_value_heads=1, swa_num_key_value_heads=2, head_dim=32, v_head_dim=16,
                          intermediate_size=160, n_routed_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=32, sliding_window_size=8, mtp_layers=3),
    "mimo_v2_flash-bench": dict(vocab_size=152576, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                                num_key_value_heads=2, swa_num_key_value_heads=4, head_dim=96, v_head_dim=64,
                                intermediate_size=2816, n_routed_experts=64, num_experts_per_tok=8,
                                moe_intermediate_size=256, sliding_window_size=128, mtp_layers=3),
    # MiMo-V2.5 / V2.6 layouts (tiny_releases.py), always FP8 as published: q/k/v fused in 2 TP shards
    # (the global KV heads), each shard of the sliding layers holding 2 of their 4 KV heads
    "mimo_v2.5": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=2, swa_num_key_value_heads=4, head_dim=32, v_head_dim=16,
                      intermediate_size=160, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, sliding_window_size=8, mtp_layers=3),
}
PRESETS["mimo_v2.6"] = PRESETS["mimo_v2.5"]  # + routed experts in MXFP4, tp_size in the index, dflash/
TOKENIZER_VOCAB = 1024


def hub_config(family: str, shape: dict, fp8: bool) -> dict:
    common = {
        "vocab_size": shape["vocab_size"],
        "hidden_size": shape["hidden_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "intermediate_size": shape["intermediate_size"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    if family == "mimo":
        config = {
            "architectures": ["MiMoForCausalLM"],
            "model_type": "mimo",
            **common,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "max_position_embeddings": 32768,
            "max_window_layers": shape["num_hidden_layers"],
            "num_nextn_predict_layers": shape["mtp_layers"],
            "rms_norm_eps": 1e-5,
            "rope_scaling": None,
            "rope_theta": 640000,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "use_mrope": False,
        }
    else:
        layers = shape["num_hidden_layers"]
        config = {
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            **common,
            "head_dim": shape["head_dim"],
            "v_head_dim": shape["v_head_dim"],
            "swa_num_attention_heads": shape["num_attention_heads"],
            "swa_num_key_value_heads": shape["swa_num_key_value_heads"],
            "swa_head_dim": shape["head_dim"],
            "swa_v_head_dim": shape["v_head_dim"],
            "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(layers)],
            "moe_layer_freq": [0] + [1] * (layers - 1),
            "sliding_window_size": shape["sliding_window_size"],
            "add_swa_attention_sink_bias": True,
            "add_full_attention_sink_bias": False,
            "attention_value_scale": 0.707,
            "partial_rotary_factor": 0.334,
            "rope_theta": 5000000,
            "swa_rope_theta": 10000,
            "max_position_embeddings": 262144,
            "layernorm_epsilon": 1e-5,
            "attention_bias": False,
            "n_routed_experts": shape["n_routed_experts"],
            "num_experts_per_tok": shape["num_experts_per_tok"],
            "n_shared_experts": None,
            "moe_intermediate_size": shape["moe_intermediate_size"],
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": None,
        }
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    return config


def _attention_shapes(prefix: str, hidden: int, heads: int, kv: int, dim: int, v_dim: int, bias: bool, sink: bool):
    shapes = {
        prefix + "q_proj.weight": (heads * dim, hidden),
        prefix + "k_proj.weight": (kv * dim, hidden),
        prefix + "v_proj.weight": (kv * v_dim, hidden),
        prefix + "o_proj.weight": (hidden, heads * v_dim),
    }
    if bias:
        shapes.update({prefix + "q_proj.bias": (heads * dim,), prefix + "k_proj.bias": (kv * dim,),
                       prefix + "v_proj.bias": (kv * v_dim,)})
    if sink:
        shapes[prefix + "attention_sink_bias"] = (heads,)
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int):
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def tensor_shapes(config: dict, mtp_layers: int) -> dict[str, tuple]:
    """Every tensor of the hub checkpoint, in the order the real shards list them."""
    hidden = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
    if config["model_type"] == "mimo":
        dim = hidden // heads

        def block(prefix):
            out = {prefix + n: (hidden,) for n in norms}
            out.update(_attention_shapes(prefix + "self_attn.", hidden, heads, kv, dim, dim, True, False))
            out.update(_mlp_shapes(prefix + "mlp.", hidden, config["intermediate_size"]))
            return out

        for i in range(config["num_hidden_layers"]):
            shapes.update(block(f"model.layers.{i}."))
        for k in range(mtp_layers):
            p = f"model.mtp_layers.{k}."
            shapes.update({p + "token_layernorm.weight": (hidden,), p + "hidden_layernorm.weight": (hidden,),
                           p + "input_proj.weight": (hidden, 2 * hidden)})
            shapes.update(block(p))
            shapes[p + "final_layernorm.weight"] = (hidden,)
    else:
        dim, v_dim = config["head_dim"], config["v_head_dim"]
        swa_kv = config["swa_num_key_value_heads"]
        experts, inter = config["n_routed_experts"], config["moe_intermediate_size"]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            sliding = config["hybrid_layer_pattern"][i] == 1
            shapes.update({p + n: (hidden,) for n in norms})
            shapes.update(_attention_shapes(p + "self_attn.", hidden, heads, swa_kv if sliding else kv, dim, v_dim,
                                            False, sliding))
            if config["moe_layer_freq"][i]:
                shapes[p + "mlp.gate.weight"] = (experts, hidden)
                shapes[p + "mlp.gate.e_score_correction_bias"] = (experts,)
                for e in range(experts):
                    shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", hidden, inter))
            else:
                shapes.update(_mlp_shapes(p + "mlp.", hidden, config["intermediate_size"]))
        for k in range(mtp_layers):
            p = f"model.mtp.layers.{k}."
            shapes.update({p + "enorm.weight": (hidden,), p + "hnorm.weight": (hidden,),
                           p + "eh_proj.weight": (hidden, 2 * hidden), p + "input_layernorm.weight": (hidden,)})
            shapes.update(_attention_shapes(p + "self_attn.", hidden, heads, swa_kv, dim, v_dim, False, True))
            shapes[p + "pre_mlp_layernorm.weight"] = (hidden,)
            shapes.update(_mlp_shapes(p + "mlp.", hidden, config["intermediate_size"]))
            shapes[p + "final_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def random_tensor(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=generator)
    if name.endswith("attention_sink_bias") or name.endswith(".bias"):
        return 0.5 * torch.randn(shape, generator=generator)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


def is_fp8_weight(name: str) -> bool:
    """Which tensors the official FP8 checkpoints store in e4m3 (o_proj, router, norms, embeddings,
    lm_head and sinks stay bf16)."""
    return name.endswith("_proj.weight") and not any(
        part in name for part in ("o_proj", "input_proj", "eh_proj")
    ) and name.startswith("model.")


@functools.lru_cache(maxsize=2)
def _tokenizer(vocab: int):
    return train_tokenizer(vocab)


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "mimo",
    fp8: bool = False,
    shards: int = 2,
    seed: int = 0,
    overrides: dict | None = None,
    twin: bool = False,
) -> Path:
    """Write a random-weight checkpoint; returns its directory. Written to a temp dir, then renamed.
    The MiMo-V2.5 / V2.6 presets are FP8 whatever `fp8` says; with `twin`, the same weights in the
    V2-Flash layout (split q/k/v, FP8 dequantized to float32, no encoders)."""
    if preset not in PRESETS:
        raise MimoError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    release = RELEASES.get(preset)
    if twin and release is None:
        raise MimoError(f"preset '{preset}' is already in the V2-Flash layout (twin is for {', '.join(RELEASES)})")
    shape = {**PRESETS[preset], **(overrides or {})}
    family = "mimo" if preset.startswith("mimo") and not preset.startswith("mimo_v2") else "mimo_v2_flash"
    out_dir = Path(out_dir)
    temporary = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)

    config = hub_config(family, shape, fp8)
    if release is not None:
        config = release_config(config, release)
    template = release_chat_template(release) if release is not None else CHATML_TEMPLATE
    special = write_tokenizer_files(temporary, _tokenizer(min(TOKENIZER_VOCAB, shape["vocab_size"])), template)
    config.update(bos_token_id=None, eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"])
    generation = {"eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]], "transformers_version": "4.51.0"}
    (temporary / "generation_config.json").write_text(json.dumps(generation, indent=2))

    generator = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(config, shape["mtp_layers"])
    if release is not None:
        logical = {name: random_tensor(name, tensor_shape, generator) for name, tensor_shape in shapes.items()}
        tensors = release_tensors(config, logical, generator, is_fp8_weight)
        if twin:
            config, tensors = flash_twin(config, tensors, shapes)
            _write_tensors(temporary, tensors, shards)
        else:
            write_release(temporary, config, tensors, shards, release, generator)
    else:
        specs = {}
        for name, tensor_shape in shapes.items():
            if name.endswith("e_score_correction_bias"):
                specs[name] = (torch.float32, tensor_shape)
            elif fp8 and is_fp8_weight(name):
                specs[name] = (torch.float8_e4m3fn, tensor_shape)
                specs[name + "_scale_inv"] = (torch.float32, tuple(-(-size // 128) for size in tensor_shape))
            else:
                specs[name] = (torch.bfloat16, tensor_shape)

        def generated():  # one tensor at a time: a full-size layout is written in bounded memory
            for name, tensor_shape in shapes.items():
                tensor = random_tensor(name, tensor_shape, generator)
                if name.endswith("e_score_correction_bias"):
                    yield tensor.float()
                elif fp8 and is_fp8_weight(name):
                    yield from quantize_fp8_blocks(tensor)
                else:
                    yield tensor.to(torch.bfloat16)

        _write_shards(temporary, specs, generated(), shards)
    (temporary / "config.json").write_text(json.dumps(config, indent=2))

    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)
    return out_dir


def _write_tensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    _write_shards(out_dir, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}, iter(tensors.values()),
                  shards)


def _write_shards(out_dir: Path, specs: dict[str, tuple], tensors, shards: int) -> None:
    """Write tensors (name -> (dtype, shape) in `specs`, the tensors themselves from the iterator
    `tensors` in that order) into `shards` files of about equal size, indexed when more than one."""
    if shards <= 1:
        write_safetensors_streamed(out_dir / "model.safetensors", specs, tensors)
        return
    sizes = {name: dtype.itemsize * math.prod(shape) for name, (dtype, shape) in specs.items()}
    total = sum(sizes.values())
    per_shard = total / shards
    groups: list[dict] = [{}]
    size = 0
    for name, spec in specs.items():
        if size >= per_shard * len(groups) and len(groups) < shards:
            groups.append({})
        groups[-1][name] = spec
        size += sizes[name]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors_streamed(out_dir / file, group, tensors)
        weight_map.update({name: file for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def make_bigram_with_oracle_mtp(
    source: str | Path, out_dir: str | Path, mtp: str = "copy", frequent_ids: int | None = None
) -> Path:
    """A copy of a checkpoint whose target is a bigram model (every attention output and FFN
    output projection zeroed, so logits depend on the current token only) and whose MTP layers
    predict exactly what the target will (`mtp="copy"`: every draft is accepted) or the target's
    least likely token (`mtp="negate"`: every draft is rejected). For testing and measuring the
    speculative loop at known acceptance.

    `frequent_ids`: shrink the lm_head rows of later ids to a quarter, so the most likely token is
    among the first `frequent_ids` ids, as in trained byte-level BPE models whose low ids are the
    frequent merges (what `--draft-vocab` relies on)."""
    from ..checkpoint import Checkpoint

    source, out_dir = Path(source), Path(out_dir)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    hidden = config["hidden_size"]
    checkpoint = Checkpoint(source, (128, 128))
    tensors = {}
    for name, entry in checkpoint.entries.items():
        if name.endswith("_scale_inv"):
            continue
        tensor = torch.empty(entry.shape, dtype=torch.float32)
        checkpoint.read_into(name, tensor)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
        elif name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(("input_proj.weight", "eh_proj.weight")):
            # Keep only the token-embedding half: 7B concatenates [hidden, embedding], V2 [embedding, hidden].
            eye = torch.eye(hidden) * (1.0 if mtp == "copy" else -1.0)
            zero = torch.zeros(hidden, hidden)
            tensor = torch.cat([zero, eye] if name.endswith("input_proj.weight") else [eye, zero], dim=1)
        if name == "lm_head.weight" and frequent_ids:
            tensor[frequent_ids:] *= 0.25
        tensors[name] = tensor.to(torch.bfloat16) if entry.dtype != torch.float32 else tensor
    temporary = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(source / name, temporary / name)
    (temporary / "config.json").write_text(json.dumps(config, indent=2))
    _write_tensors(temporary, tensors, 1)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)
    return out_dir
