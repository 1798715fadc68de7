"""Load-time side of quantization: find the linear weights a checkpoint stores quantized (GPTQ
layout, bitsandbytes) or a recipe quantizes in memory, swap their float modules for QuantLinear before
any float memory is allocated, and fill them part by part (fused q|k|v, gate|up, stacked experts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import MimoError
from ..models.layers import Linear
from . import runtime
from .linear import QuantLinear
from .recipes import Recipe, load_recipe


@dataclass
class Part:
    hub_base: str  # hub linear name without ".weight"
    index: tuple  # (expert row,) + (row slice,) inside the fused / stacked weight


@dataclass
class QuantizedModule:
    path: str  # module path of the Linear, or of the stack parameter for experts
    out_features: int
    in_features: int
    experts: int | None
    bias_dtype: torch.dtype | None
    parts: list[Part] = field(default_factory=list)
    bias_parts: list[tuple[str, tuple]] = field(default_factory=list)


def linear_targets(model: nn.Module, targets: dict) -> dict[str, tuple]:
    """hub weight name -> (module path, stack shape or None) for every target that is a linear
    projection (lm_head included when it is not tied to the embeddings) or a slice of a stacked
    expert weight: what quantization may replace."""
    found = {}
    modules = dict(model.named_modules())
    for hub_name, target in targets.items():
        if not hub_name.endswith(".weight"):
            continue
        owner_path, _, attribute = target.param.rpartition(".")
        owner = modules[owner_path]
        value = getattr(owner, attribute)
        if isinstance(owner, Linear) and attribute == "weight":
            found[hub_name] = (owner_path, None)
        elif isinstance(value, nn.Parameter) and value.dim() == 3:
            found[hub_name] = (target.param, tuple(value.shape))
    return found


class QuantizedLoad:
    """prepare() on the meta model; load() after the float weights are in."""

    def __init__(self, model: nn.Module, targets: dict, checkpoint: Checkpoint, recipe: Recipe | None):
        self.model, self.checkpoint, self.recipe = model, checkpoint, recipe
        self.modules: dict[str, QuantizedModule] = {}
        self.plain_targets = dict(targets)
        self.schemes = {}
        candidates = linear_targets(model, targets)
        if recipe is not None:
            shapes = {name: entry.shape for name, entry in checkpoint.entries.items() if not name.endswith("_scale_inv")}
            self.schemes = recipe.plan(shapes, set(candidates))
        for hub_name, (path, stack) in candidates.items():
            base = hub_name[: -len(".weight")]
            stored = runtime.stored_format(checkpoint, base)
            if stored is None and hub_name not in self.schemes:
                continue
            if stored is not None and hub_name in self.schemes:
                raise MimoError(f"'{base}' is already quantized ({stored}): --quant applies to float checkpoints")
            target = self.plain_targets.pop(hub_name)
            module = self.modules.get(path) or self._new_module(path, stack)
            self.modules[path] = module
            module.parts.append(Part(base, target.index))
            bias = base + ".bias"
            if bias in self.plain_targets:
                module.bias_parts.append((bias, self.plain_targets.pop(bias).index))
        self._check_fused_parts_agree(candidates)

    def _new_module(self, path: str, stack: tuple | None) -> QuantizedModule:
        if stack is not None:
            experts, out_features, in_features = stack
            return QuantizedModule(path, out_features, in_features, experts, None)
        linear = self.model.get_submodule(path)
        bias = linear.bias.dtype if linear.bias is not None else None
        return QuantizedModule(path, linear.out_features, linear.in_features, None, bias)

    def _check_fused_parts_agree(self, candidates: dict) -> None:
        """Fused / stacked parts share one module, so all of them must be quantized, or none."""
        covered = {path for path in self.modules}
        for hub_name, (path, _) in candidates.items():
            if path in covered and hub_name in self.plain_targets:
                raise MimoError(f"'{hub_name}' is fused with quantized weights at load: quantize all parts of {path}")

    def __bool__(self) -> bool:
        return bool(self.modules)

    def swap_placeholders(self) -> None:
        """Drop the float weights of quantized modules (on meta, before memory is allocated)."""
        for path in self.modules:
            set_module(self.model, path, nn.Module())

    def load(self, device: torch.device, progress=None) -> None:
        for module in self.modules.values():
            quantized = self._load_module(module, device).requires_grad_(False)
            with torch.no_grad():
                for bias_name, index in module.bias_parts:
                    self.checkpoint.read_into(bias_name, quantized.bias[index] if index else quantized.bias)
            set_module(self.model, module.path, quantized)
            if progress is not None:
                progress()

    def _load_module(self, module: QuantizedModule, device) -> QuantLinear:
        """Convert the parts one at a time, each straight into the module: memory beyond the model
        stays at one part's conversion, not a whole stack of experts."""
        quantized, first = None, None
        for part in module.parts:
            weight = self._runtime(part.hub_base)
            if quantized is None:
                first = weight
                quantized = QuantLinear(
                    weight.kind, module.in_features, module.out_features, experts=module.experts,
                    group_size=weight.group_size, blocksize=weight.blocksize, permuted=weight.perm is not None,
                    bias_dtype=module.bias_dtype, device=device,
                )
            _check_agrees(module, part, weight, first)
            _fill(quantized, module, part, weight)
        return quantized

    def _runtime(self, base: str) -> runtime.RuntimeWeight:
        hub_name = base + ".weight"
        if hub_name in self.schemes:
            entry = self.checkpoint.entries[hub_name]
            weight = torch.empty(entry.shape, dtype=torch.float32)
            self.checkpoint.read_into(hub_name, weight)
            return runtime.from_weight(weight, self.schemes[hub_name], base)
        return runtime.from_checkpoint(self.checkpoint, base)


def _check_agrees(module: QuantizedModule, part: Part, weight, first) -> None:
    """Fused / stacked parts share one QuantLinear: one layout, and one act-order permutation."""
    if (weight.kind, weight.group_size, weight.blocksize) != (first.kind, first.group_size, first.blocksize):
        raise MimoError(f"{module.path}: its fused parts are quantized differently ({part.hub_base})")
    if (weight.perm is None) != (first.perm is None) or (
        module.experts is None and weight.perm is not None and not torch.equal(weight.perm, first.perm)
    ):
        raise MimoError(f"{module.path}: act-order permutations of its fused parts differ")


def _fill(quantized: QuantLinear, module: QuantizedModule, part: Part, weight) -> None:
    with torch.no_grad():
        for name, tensor in weight.tensors.items():
            destination = getattr(quantized, name)
            destination = destination[part.index] if part.index else destination
            if destination.shape != tensor.shape:
                raise MimoError(f"'{part.hub_base}': quantized shape {list(tensor.shape)} does not fit {list(destination.shape)}")
            destination.copy_(tensor)
        if weight.perm is not None:
            (quantized.perm[part.index[0]] if module.experts else quantized.perm).copy_(weight.perm)
        if weight.code is not None:
            quantized.code.copy_(weight.code)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if name in owner._parameters:
        del owner._parameters[name]
    setattr(owner, name, module)


def prepare(model: nn.Module, targets: dict, checkpoint: Checkpoint, quant: str | Recipe | None) -> QuantizedLoad:
    recipe = load_recipe(quant) if isinstance(quant, str) else quant
    load = QuantizedLoad(model, targets, checkpoint, recipe)
    load.swap_placeholders()
    return load
