"""The memory plan: where every weight, the KV cache and the activations go, per device and per
component, and whether that fits the budgets. Policy: non-expert weights, KV cache and activations
on the GPU first, then the hottest experts while they fit, the rest of the experts on the CPU."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..budget import PREFILL_CHUNK, SPARE_SLOTS
from ..cache import CACHE_TYPES
from ..config import MiMoConfig
from ..errors import MimoError
from ..models.chunk_attention import KEY_TILE, MIN_QUERY_BLOCK
from .hotness import ExpertStats, load_stats
from .inventory import COMPONENTS, Inventory, ModelSource, count_mtp_layers, moe_layers, read_model_source, take_inventory
from .placement import Placement
from .schemes import weight_quantization

GIB = 1 << 30
DEVICES = ("gpu", "cpu")
# What a prefill chunk's peak RSS holds beyond the tensors counted: GEMM packing, the attention
# kernel's blocks, allocator slack (measured at one thread: tests/test_long_prefill.py).
RUNTIME_SCRATCH = 8 << 20
FOUR_BIT_RECIPE = "int4-g128"  # the recipe the advice names: it fits every MiMo shape (quant.recipes.Scheme.fit)


@dataclass
class PlanRequest:
    """What `mimo plan` and the run/chat/bench placement flags ask for (budgets in bytes)."""

    gpu_mem: int | None = 0  # None: detect (options.with_budgets)
    cpu_mem: int | None = 0
    ctx: int = 32768
    quant: str | None = None
    mtp: bool | None = None  # None: on when the model has MTP layers
    dtype: torch.dtype = torch.bfloat16
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    overrides: list[tuple[re.Pattern, str]] = field(default_factory=list)  # (regex, "gpu" | "cpu")
    clamp_ctx: bool = False  # a run's estimate: cut to the model's positions instead of refusing
    sequences: int = 1  # KV caches of `ctx` positions each (a server's --parallel slots)
    ctx_flag: str | None = "--ctx"  # the flag that sets the context, for advice (None: the front end has none)
    cache_type: str = "bf16"  # the global layers' KV: "bf16" (the model's dtype) or "int8"


@dataclass
class MemoryPlan:
    config: MiMoConfig
    request: PlanRequest
    inventory: Inventory
    mtp_layers: int
    main: str
    weights: dict[str, dict[str, int]]  # device -> component -> bytes
    kv: dict[str, int]  # device -> bytes
    workspace: dict[str, int]
    kv_bytes_per_token: int
    kv_fixed_bytes: int
    placement: Placement
    experts_on_gpu: int = 0
    experts_total: int = 0
    source: ModelSource | None = None  # what was planned (None: a bare inventory, as in tests)
    stats: ExpertStats | None = None
    weights_format: str = ""  # how the weights are held, e.g. 'int4-g128' or 'gptq 4-bit g128'

    @property
    def budgets(self) -> dict[str, int]:
        return {"gpu": self.request.gpu_mem, "cpu": self.request.cpu_mem}

    def used(self, device: str) -> int:
        return sum(self.weights[device].values()) + self.kv[device] + self.workspace[device]

    def over(self, device: str) -> int:
        return self.used(device) - self.budgets[device]

    @property
    def devices(self) -> list[str]:
        return [d for d in DEVICES if self.budgets[d] > 0 or self.used(d) > 0]

    @property
    def fits(self) -> bool:
        return all(self.over(d) <= 0 for d in self.devices)

    @property
    def weight_bytes(self) -> int:
        return sum(sum(per.values()) for per in self.weights.values())

    def _ctx_room(self, device: str) -> int | None:
        """The largest context (a multiple of 512, at least 512) whose KV cache fits `device`."""
        per_token = self.kv_bytes_per_token * self.request.sequences
        fixed = self.used(device) - per_token * self.request.ctx
        room = (self.budgets[device] - fixed) // max(per_token, 1)
        return room // 512 * 512 if 512 <= room < self.request.ctx else None

    def _candidates(self) -> list[tuple[str, dict]]:
        """Changes that could make the plan fit: (the flag as the user types it, request fields)."""
        candidates = []
        ctx_device = "gpu" if self.over("gpu") > 0 else "cpu" if self.over("cpu") > 0 and self.main == "cpu" else None
        room = self._ctx_room(ctx_device) if ctx_device and self.request.ctx_flag else None
        if room:
            candidates.append((f"{self.request.ctx_flag} {room}", {"ctx": room}))
        if self.over("gpu") > 0 and self.experts_on_gpu:
            candidates.append(("--cpu-moe", {"cpu_moe": True}))
        if self.over("gpu") > 0 and all(device == "cpu" for _, device in self.request.overrides):
            candidates.append(("--gpu-mem 0 (all on the CPU)", {"gpu_mem": 0}))
        if self.over("cpu") > 0 and self.budgets["gpu"] > 0 and self.over("gpu") < 0 and not self.request.cpu_moe:
            larger = -(-(self.budgets["gpu"] + self.over("cpu")) // GIB)
            if larger * GIB <= _gpu_free():  # only what the GPU has
                candidates.append((f"a larger --gpu-mem ({larger}G)", {"gpu_mem": larger * GIB}))
        stored = self.source is not None and weight_quantization(self.source, None) is not None
        all_params = self.inventory.total_params + self.inventory.mtp_params
        if not stored and self.request.quant != FOUR_BIT_RECIPE and self.weight_bytes > 0.75 * all_params:
            candidates.append((f"a 4-bit recipe (--quant {FOUR_BIT_RECIPE})", {"quant": FOUR_BIT_RECIPE}))
        return candidates

    def _fits_with(self, changes: dict) -> bool:
        request = dataclasses.replace(self.request, **changes)
        try:
            inventory = self.inventory
            if request.quant != self.request.quant:
                quantization = weight_quantization(self.source, request.quant)
                inventory = take_inventory(self.config, self.mtp_layers, request.dtype, quantization)
            return place(self.config, request, inventory, self.mtp_layers, self.stats, self.source).fits
        except MimoError:  # the change conflicts with another flag: not a suggestion
            return False

    @functools.cached_property
    def advice(self) -> list[str]:
        """What to change so that a plan that does not fit would: only changes checked to make it
        fit, so every suggestion works for this model (none when no single change does)."""
        if self.fits or self.source is None:
            return []
        return [label for label, changes in self._candidates() if self._fits_with(changes)]

    def verdict(self) -> str:
        """One line: fits (with what is left) or not (by how much, and what to change)."""
        parts = [f"{d} {_gib(self.used(d))} of {_gib(self.budgets[d])}" for d in self.devices]
        if self.fits:
            free = ", ".join(f"{d} {_gib(-self.over(d))} free" for d in self.devices)
            return f"fits: {', '.join(parts)} ({free})"
        over = [f"{d} needs {_gib(self.used(d))} of {_gib(self.budgets[d])} ({_gib(self.over(d))} over)"
                for d in self.devices if self.over(d) > 0]
        tips = self.advice
        return f"does not fit: {'; '.join(over)}" + (f"; try {_join_or(tips)}" if tips else "")

    def oom_message(self, device: str = "gpu") -> str:
        kv = self.kv[device]
        weights = sum(self.weights[device].values())
        return (
            f"CUDA out of memory: the plan puts {_gib(self.used(device))} on the {device} of {_gib(self.budgets[device])} "
            f"(weights {_gib(weights)}, KV cache {_gib(kv)}, activations {_gib(self.workspace[device])}); "
            f"lower --gpu-mem, use --n-cpu-moe/--cpu-moe or a smaller context"
        )

    def to_json(self) -> dict:
        inventory = self.inventory
        return {
            "family": self.config.display_family,
            "ctx": self.request.ctx,
            "dtype": str(self.request.dtype).removeprefix("torch."),
            "quant": self.request.quant,
            "weights_format": self.weights_format,
            "mtp_layers": self.mtp_layers,
            "total_params": inventory.total_params,
            "active_params_per_token": inventory.active_params_per_token,
            "mtp_params": inventory.mtp_params,
            "weight_bytes": {d: {**self.weights[d], "total": sum(self.weights[d].values())} for d in DEVICES},
            "cache_type": self.request.cache_type,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_fixed_bytes": self.kv_fixed_bytes,
            "kv_cache_bytes": dict(self.kv),
            "workspace_bytes": dict(self.workspace),
            "budget_bytes": self.budgets,
            "used_bytes": {d: self.used(d) for d in DEVICES},
            "experts_on_gpu": self.experts_on_gpu,
            "experts_total": self.experts_total,
            "fits": self.fits,
            "verdict": self.verdict(),
        }


def _gpu_free() -> int:
    return torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else 0


def _join_or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB / 100 else f"{nbytes / (1 << 20):.1f} MiB"


def kv_geometry(config: MiMoConfig, mtp_layers: int, itemsize: int, cache_type: str = "bf16") -> tuple[int, int]:
    """(bytes per token, fixed bytes) of the whole cache: global layers grow with the context (in
    int8 with `cache_type` "int8"), sliding-window layers are ring buffers of window + spare slots;
    each MTP layer has its own."""
    per_token = config.kv_bytes_per_token(itemsize, cache_type)
    fixed = config.kv_fixed_bytes(itemsize, extra_slots=SPARE_SLOTS)
    mtp = config.global_attention if config.family == "mimo" else (config.sliding_attention or config.global_attention)
    if mtp.is_sliding:
        fixed += mtp_layers * (mtp.sliding_window + SPARE_SLOTS) * mtp.kv_bytes_per_token(itemsize)
    else:
        per_token += mtp_layers * mtp.kv_bytes_per_token(itemsize, int8=cache_type == "int8")
    return per_token, fixed


def workspace_bytes(config: MiMoConfig, ctx: int, itemsize: int, mtp_layers: int) -> int:
    """Activations of the largest step, a prefill chunk: an estimate from the shapes (the residual
    stream and its copies, fused qkv, FFN intermediates, the MoE fp32 accumulator, the attention's
    tiles, and the logits the sampler works on). None of it grows with the context."""
    steps = min(PREFILL_CHUNK, ctx)
    hidden = config.hidden_size
    specs = [config.global_attention] + ([config.sliding_attention] if config.sliding_attention else [])
    qkv = max(s.num_heads * s.head_dim + s.num_kv_heads * (s.head_dim + s.v_head_dim) for s in specs)
    ffn = max(config.intermediate_size, config.moe.intermediate_size if config.moe else 0)
    total = steps * hidden * itemsize * 4 + steps * qkv * itemsize * 2 + steps * ffn * itemsize * 3
    total += steps * hidden * 4 * 2 if config.moe else 0
    total += max(attention_workspace_bytes(s, steps, itemsize) for s in specs)
    total += config.vocab_size * 4 * (mtp_layers + 1) * 3
    return total + RUNTIME_SCRATCH


def attention_workspace_bytes(spec, steps: int, itemsize: int) -> int:
    """What chunk_attention holds at once for `steps` queries: a part's output (values padded to
    the key size for the fused kernel), the float32 merge, and the keys it copies: a tile of the
    context (dequantized or padded), or a sliding window's band with its block mask. This also
    covers the global layers' C kernel (prefill_attention.c): float32 outputs and softmax state per
    query and head, and KEY_TILE (= its PACK_KEYS) positions of keys and values repacked."""
    padded = max(spec.head_dim, spec.v_head_dim)
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    total = steps * heads * (padded * itemsize + spec.v_head_dim * (8 + itemsize))
    if spec.is_sliding:
        window = spec.sliding_window
        block = min(steps, max(window, MIN_QUERY_BLOCK))
        total += (window + steps) * kv_heads * (spec.head_dim + spec.v_head_dim) * itemsize * 2
        total += block * (window + block) * (8 + 1 + itemsize)  # offsets, mask, additive bias
    else:
        total += KEY_TILE * kv_heads * (spec.head_dim + padded) * itemsize
    return total


def _parse_device(text: str) -> str:
    name = text.strip().lower()
    if name in ("gpu", "cuda") or re.fullmatch(r"cuda:0", name):
        return "gpu"
    if name == "cpu":
        return "cpu"
    raise MimoError(f"--override-tensor: unknown device '{text}' (cpu, gpu, cuda)")


def parse_overrides(specs: list[str]) -> list[tuple[re.Pattern, str]]:
    overrides = []
    for spec in specs:
        pattern, sep, device = spec.rpartition("=")
        if not sep or not pattern:
            raise MimoError(f"--override-tensor '{spec}': expected REGEX=DEVICE")
        try:
            overrides.append((re.compile(pattern), _parse_device(device)))
        except re.error as error:
            raise MimoError(f"--override-tensor '{spec}': bad regex ({error})") from None
    return overrides


def _override(unit, overrides) -> str | None:
    for pattern, device in overrides:
        if any(pattern.search(name) for name in unit.hub_names):
            return device
    return None


def make_plan(source: str | Path, request: PlanRequest, stats: ExpertStats | None = None) -> MemoryPlan:
    """Plan a model directory (or a bare config.json) for the budgets in `request`. Weights are
    counted as they will be held: under the --quant recipe, as a quantized checkpoint stores them
    (its tensors, or its quantization_config when there are none), FP8 dequantized to `dtype`."""
    model = read_model_source(source)
    config = model.config
    available_mtp = count_mtp_layers(model)
    if request.mtp and not available_mtp:
        raise MimoError(f"{Path(source).name} has no MTP layers: --mtp is not possible")
    mtp_layers = available_mtp if request.mtp is not False else 0
    if request.ctx < 1:
        raise MimoError("--ctx must be at least 1")
    if request.cache_type not in CACHE_TYPES:
        raise MimoError(f"--cache-type must be one of {', '.join(CACHE_TYPES)}, not '{request.cache_type}'")
    if request.clamp_ctx:
        request = dataclasses.replace(request, ctx=min(request.ctx, config.max_position_embeddings))
    if request.ctx > config.max_position_embeddings:
        raise MimoError(f"--ctx {request.ctx} is beyond the model's {config.max_position_embeddings} positions")
    if request.n_cpu_moe < 0:
        raise MimoError("--n-cpu-moe must be >= 0")
    inventory = take_inventory(config, mtp_layers, request.dtype, weight_quantization(model, request.quant))
    if stats is None:
        stats = load_stats(model.model_dir)
    return place(config, request, inventory, mtp_layers, stats, model)


def _weights_format(request: PlanRequest, model: ModelSource | None) -> str:
    dtype = str(request.dtype).removeprefix("torch.")
    if request.quant:
        return request.quant
    stored = weight_quantization(model, None) if model is not None else None
    if stored is not None:
        return stored.name
    if model is not None and model.config.fp8_block_size:
        return f"fp8 -> {dtype} (dequantized on load)"
    return dtype


def place(config, request: PlanRequest, inventory: Inventory, mtp_layers: int, stats: ExpertStats | None,
          source: ModelSource | None = None) -> MemoryPlan:
    has_gpu = request.gpu_mem > 0
    main = "gpu" if has_gpu else "cpu"
    itemsize = request.dtype.itemsize
    weights = {d: dict.fromkeys(COMPONENTS, 0) for d in DEVICES}
    kv_per_token, kv_fixed = kv_geometry(config, mtp_layers, itemsize, request.cache_type)
    kv = {d: 0 for d in DEVICES}
    kv[main] = (kv_per_token * request.ctx + kv_fixed) * request.sequences
    workspace = {d: 0 for d in DEVICES}
    workspace[main] = workspace_bytes(config, request.ctx, itemsize, mtp_layers)
    placement = Placement(main=main, mtp=mtp_layers > 0)

    def check(device: str, what: str) -> str:
        if device == "gpu" and not has_gpu:
            raise MimoError(f"--override-tensor puts {what} on the GPU, but the GPU budget is 0 (--gpu-mem)")
        return device

    for unit in inventory.others:
        device = _override(unit, request.overrides)
        if device is not None and not unit.movable:
            raise MimoError(f"--override-tensor: {unit.hub_names[0]} stays with its layer (norms and sinks cannot move)")
        device = check(device, unit.hub_names[0]) if device else main
        weights[device][unit.component] += unit.nbytes
        if device != main:
            placement.modules[unit.name] = device

    moe = moe_layers(config)
    cpu_layers = set(moe if request.cpu_moe else moe[: request.n_cpu_moe])
    free = []
    expert_devices = {layer: [main] * config.moe.num_experts for layer in moe} if config.moe else {}
    for unit in inventory.experts:
        device = _override(unit, request.overrides)
        if device is None and (unit.layer in cpu_layers or not has_gpu):
            device = "cpu"
        if device is None:
            free.append(unit)
            continue
        expert_devices[unit.layer][unit.expert] = check(device, unit.name)
        weights[device]["experts"] += unit.nbytes
    gpu_used = sum(weights["gpu"].values()) + kv["gpu"] + workspace["gpu"]
    # Hottest first (share of its layer's selections); without statistics, later layers first, as
    # --n-cpu-moe keeps the first layers on the CPU.
    share = (lambda u: stats.share(u.layer, u.expert)) if stats else (lambda u: 0.0)
    for unit in sorted(free, key=lambda u: (-share(u), -u.layer, u.expert)):
        device = "gpu" if gpu_used + unit.nbytes <= request.gpu_mem else "cpu"
        gpu_used += unit.nbytes if device == "gpu" else 0
        expert_devices[unit.layer][unit.expert] = device
        weights[device]["experts"] += unit.nbytes
    cpu_experts = sum(d == "cpu" for row in expert_devices.values() for d in row)
    if has_gpu and cpu_experts:  # CPU experts compute a prefill chunk's routed tokens on the CPU
        workspace["cpu"] = min(PREFILL_CHUNK, request.ctx) * config.hidden_size * (itemsize + 8)
    placement.experts = expert_devices
    on_gpu = sum(d == "gpu" for row in expert_devices.values() for d in row)
    return MemoryPlan(config, request, inventory, mtp_layers, main, weights, kv, workspace, kv_per_token, kv_fixed,
                      placement, experts_on_gpu=on_gpu, experts_total=len(inventory.experts), source=source,
                      stats=stats, weights_format=_weights_format(request, source))
