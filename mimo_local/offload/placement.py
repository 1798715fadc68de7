"""Applying a plan to a model: split each MoE layer's experts into per-device groups while the model
is still on meta, allocate every module where the plan puts it, and let modules moved off the main
device by --override-tensor compute where their weights are (accelerate's AlignDevicesHook moves
the activations in and out; the weights never move)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import MimoError
from ..models.layers import MoE

GROUP_NAME = re.compile(r"^layers\.(\d+)\.mlp\.groups\.(\d+)$")
TORCH_DEVICES = {"gpu": "cuda", "cpu": "cpu"}


def torch_device(plan_device: str) -> torch.device:
    return torch.device(TORCH_DEVICES[plan_device])


@dataclass
class Placement:
    """Where every part of a model goes, in plan device names ("gpu", "cpu")."""

    main: str  # non-expert weights, KV cache, activations
    experts: dict[int, list[str]] = field(default_factory=dict)  # MoE layer -> device of each expert
    modules: dict[str, str] = field(default_factory=dict)  # leaf modules placed apart from `main`
    mtp: bool = True  # whether the MTP layers are loaded at all

    def devices(self) -> set[str]:
        """The plan devices anything is placed on."""
        return {self.main, *self.modules.values(), *(d for row in self.experts.values() for d in row)}

    def check_available(self) -> None:
        if "gpu" in self.devices() and not torch.cuda.is_available():
            raise MimoError("the plan puts weights on the GPU but no CUDA device is available (use --device cpu)")

    def split_experts(self, model) -> None:
        """On the meta model: one ExpertGroup per device, the main device's group first."""
        for index, layer in enumerate(model.layers):
            if isinstance(layer.mlp, MoE) and index in self.experts:
                devices = self.experts[index]
                if len(set(devices)) > 1:
                    order = sorted(set(devices), key=lambda d: d != self.main)
                    layer.mlp.place([order.index(d) for d in devices])

    def device_of(self, module_name: str, module) -> torch.device:
        if module_name in self.modules:
            return torch_device(self.modules[module_name])
        group = GROUP_NAME.match(module_name)
        if group and int(group.group(1)) in self.experts:
            return torch_device(self.experts[int(group.group(1))][module.experts[0]])
        return torch_device(self.main)

    def materialize(self, model) -> None:
        """Allocate (uninitialised) every module's own tensors on its device."""
        for name, module in model.named_modules():
            module.to_empty(device=self.device_of(name, module), recurse=False)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight

    def attach_hooks(self, model) -> None:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module  # 0.1-0.2 s to import: only when offloading

        modules = dict(model.named_modules())
        for name, device in self.modules.items():
            if device != self.main:
                add_hook_to_module(modules[name], AlignDevicesHook(execution_device=torch_device(device), io_same_device=True))
