"""Every placeable piece of a model and its size, from config.json alone: the model is built on the
meta device (models.build_meta_model) and each hub tensor is sized through the weight map."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MiMoConfig, load_config, parse_config, read_raw_config
from ..errors import MimoError
from ..models import build_meta_model, family_module
from ..models.layers import MoE, Router
from ..models.model import MiMoForCausalLM
from ..quant.loading import linear_targets
from .schemes import runtime_bytes

RELEASED_V2_MTP_LAYERS = 3  # V2-Flash's config does not say; the released checkpoints have three
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
COMPONENTS = ("embeddings", "attention", "norms", "dense_ffn", "router", "experts", "mtp", "lm_head")


@dataclass(frozen=True)
class Unit:
    """What is placed as a whole: the weights of one leaf module, or one routed expert."""

    name: str  # our module name, or "layers.{i}.mlp.experts.{e}"
    component: str
    nbytes: int
    params: int
    hub_names: tuple[str, ...]
    layer: int | None = None  # experts: their decoder layer
    expert: int | None = None
    movable: bool = True  # Linear / Embedding / Router leaves and experts; norms and sinks stay with their layer


@dataclass
class Inventory:
    config: MiMoConfig
    dtype: torch.dtype
    units: list[Unit]

    @property
    def experts(self) -> list[Unit]:
        return [u for u in self.units if u.expert is not None]

    @property
    def others(self) -> list[Unit]:
        return [u for u in self.units if u.expert is None]

    @property
    def total_params(self) -> int:
        """The model's own parameters (the published count): MTP layers are reported apart."""
        return sum(u.params for u in self.units if u.component != "mtp")

    @property
    def mtp_params(self) -> int:
        return sum(u.params for u in self.units if u.component == "mtp")

    @property
    def active_params_per_token(self) -> int:
        moe = self.config.moe
        expert_params = sum(u.params for u in self.experts)
        active_share = moe.experts_per_token / moe.num_experts if moe else 0.0
        return self.total_params - expert_params + round(expert_params * active_share)


@dataclass
class ModelSource:
    """What the planner reads of a model: its config (parsed and as written) and, when the weights
    are there, the safetensors headers (what each tensor really is)."""

    path: Path  # the model directory, or a config.json given alone
    config: MiMoConfig
    raw: dict
    model_dir: Path | None
    entries: dict | None = None  # hub tensor name -> checkpoint entry


def read_model_source(source: str | Path) -> ModelSource:
    """A model directory, or a config.json file given directly."""
    path = Path(source)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MimoError(f"{path}: not valid JSON ({error})") from None
        return ModelSource(path, parse_config(raw, str(path)), raw, None)
    config, raw = load_config(path), read_raw_config(path)
    entries = None
    if any(path.glob("*.safetensors")):
        from ..checkpoint import Checkpoint
        from ..quant.manifest import check_complete

        check_complete(path, raw)  # before the headers: a half-written output says so, not what it lacks
        entries = Checkpoint(path).entries
    return ModelSource(path, config, raw, path, entries)


def count_mtp_layers(model: ModelSource) -> int:
    """From the checkpoint's tensor names when there is one, else from what the config implies."""
    config = model.config
    if model.entries is not None:
        return family_module(config).count_mtp_layers(config, list(model.entries))
    declared = config.family == "mimo" or config.model_type == "mimo_v2"  # mimo_v2: declared, else 3
    return config.num_mtp_layers if declared else RELEASED_V2_MTP_LAYERS


def _component(module_name: str) -> str:
    if module_name.startswith("mtp_layers."):
        return "mtp"
    if module_name in ("embed_tokens", "lm_head"):
        return "embeddings" if module_name == "embed_tokens" else "lm_head"
    if module_name.endswith("norm"):
        return "norms"
    if ".self_attn" in module_name:
        return "attention"
    if module_name.endswith(".mlp.gate"):
        return "router"
    return "dense_ffn"


def take_inventory(config: MiMoConfig, num_mtp: int, dtype: torch.dtype, quantization=None) -> Inventory:
    """`quantization`: a Recipe (--quant) or the StoredQuantization of a quantized checkpoint;
    its plan gives the scheme of each quantizable weight, sized in its runtime layout."""
    model = build_meta_model(config, num_mtp, dtype)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    targets = family_module(config).weight_map(model).targets
    shapes = {}
    for hub_name, target in targets.items():
        param = params[target.param]
        shapes[hub_name] = tuple(param[target.index].shape) if target.index else tuple(param.shape)
    schemes = quantization.plan(shapes, set(linear_targets(model, targets))) if quantization is not None else {}
    grouped: dict[str, dict] = {}
    for hub_name, target in targets.items():
        itemsize = params[target.param].element_size()
        shape = shapes[hub_name]
        scheme = schemes.get(hub_name)
        nbytes = runtime_bytes(scheme, shape, itemsize) if scheme else math.prod(shape) * itemsize
        expert = EXPERT_KEY.match(hub_name)
        if expert:
            layer, index = int(expert.group(1)), int(expert.group(2))
            key, extra = f"layers.{layer}.mlp.experts.{index}", dict(layer=layer, expert=index, component="experts")
        else:
            key = target.param.rsplit(".", 1)[0]
            module = modules[key]
            movable = isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Router))
            extra = dict(component=_component(key), movable=movable)
        entry = grouped.setdefault(key, dict(nbytes=0, params=0, hub_names=[], **extra))
        entry["nbytes"] += nbytes
        entry["params"] += math.prod(shape)
        entry["hub_names"].append(hub_name)
    units = [Unit(name=k, **{**v, "hub_names": tuple(v["hub_names"])}) for k, v in grouped.items()]
    return Inventory(config, dtype, units)


def moe_layers(config: MiMoConfig) -> list[int]:
    return [i for i, is_moe in enumerate(config.layer_is_moe) if is_moe]


def is_moe(module) -> bool:
    return isinstance(module, MoE)
