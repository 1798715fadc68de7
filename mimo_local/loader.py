"""Build a model for a checkpoint directory and stream its weights in, tensor by tensor."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .checkpoint import Checkpoint
from . import limits
from .config import MiMoConfig, load_config, read_raw_config
from .errors import MimoError
from .models import build_meta_model, family_module, meta_device
from .models.layers import RotaryEmbedding
from .models.model import MiMoForCausalLM
from .offload.placement import Placement, torch_device

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MimoError("--device cuda: no CUDA device is available (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MimoError(f"unknown device '{name}' (auto, cpu, cuda)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise MimoError(f"unknown dtype '{name}' (auto, float32, bfloat16, float16)") from None


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
    quant: str | None = None,
    placement: Placement | None = None,
) -> MiMoForCausalLM:
    """`quant`: a recipe (name or YAML file) that quantizes the float weights while loading.
    `placement` (from an offload plan): each module is allocated on the device the plan gives it
    (experts split into per-device groups), `device` becomes the plan's main device, and a
    placement without MTP skips the MTP layers."""
    from .quant import loading, manifest

    with limits.reading(model_dir):  # any failure interpreting the files is a one-line error
        raw_config = read_raw_config(model_dir) if os.path.lexists(Path(model_dir, "config.json")) else {}
        manifest.verify(Path(model_dir), raw_config)  # an interrupted `mimo quantize` output says so first
        config = load_config(model_dir)
        checkpoint = Checkpoint(model_dir, config.fp8_block_size, config)
        family = family_module(config)
        num_mtp = count_mtp_layers(config, checkpoint) if placement is None or placement.mtp else 0
        config = dataclasses.replace(config, num_mtp_layers=num_mtp)
        device = torch.device(device) if placement is None else torch_device(placement.main)

        model = build_meta_model(config, num_mtp, dtype)
        if placement is not None:
            with meta_device():
                placement.split_experts(model)
        targets = family.weight_map(model).targets
        quantized = loading.prepare(model, targets, checkpoint, quant)  # drops float weights it replaces
        check_coverage(model, quantized.plain_targets, checkpoint)  # before any memory is allocated
    if placement is None:
        model.to_empty(device=device)
    else:
        placement.materialize(model)
    model.requires_grad_(False)
    for param in model.parameters():
        if param.device.type == "cpu":
            advise_huge_pages(param)
    for rope in (m for m in model.modules() if isinstance(m, RotaryEmbedding)):
        rope.inv_freq = rope.compute_inv_freq(device)

    with limits.reading(model_dir):
        _stream_weights(model, quantized.plain_targets, checkpoint, show_progress)
        quantized.load(device)
    if placement is not None:
        placement.attach_hooks(model)
    return model.eval()


HUGE_PAGE = 2 << 20


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back a large, not yet touched CPU tensor with 2 MiB pages: decode streams every
    weight once per token, and fewer TLB misses let the prefetchers run ahead (a few % measured)."""
    libc = _libc()
    if libc is None or tensor.nbytes < 4 * HUGE_PAGE:
        return
    begin = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
    libc.madvise(begin, end - begin, 14)  # MADV_HUGEPAGE; a refusal only costs speed


def count_mtp_layers(config: MiMoConfig, checkpoint: Checkpoint) -> int:
    """MTP layers present in the checkpoint (at most limits.MAX_MTP_LAYERS)."""
    try:
        count = family_module(config).count_mtp_layers(config, checkpoint.names())
    except (ValueError, IndexError):
        raise MimoError(f"{checkpoint.dir}: an MTP tensor name has no layer number") from None
    if count > limits.MAX_MTP_LAYERS:
        raise MimoError(f"{checkpoint.dir}: {count} MTP layers is over the limit of {limits.MAX_MTP_LAYERS}")
    return count


def check_coverage(model: MiMoForCausalLM, targets: dict, checkpoint: Checkpoint) -> None:
    """On the meta model: every parameter is filled exactly by checkpoint tensors of the right shape,
    so a config that disagrees with the tensors present is refused before its memory is allocated."""
    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}
    for hub_name, target in targets.items():
        entry = checkpoint.entries.get(hub_name)
        if entry is None:
            raise MimoError(f"{checkpoint.dir}: missing tensor '{hub_name}'")
        destination = params[target.param][target.index] if target.index else params[target.param]
        if entry.shape != tuple(destination.shape):
            raise MimoError(
                f"{entry.file.name}: tensor '{hub_name}' has shape {list(entry.shape)}, the config gives {list(destination.shape)}"
            )
        filled[target.param] += destination.numel()
    for name, param in params.items():
        if filled[name] != param.numel():
            raise MimoError(f"{checkpoint.dir}: checkpoint does not provide all of '{name}'")


def _stream_weights(model: MiMoForCausalLM, targets: dict, checkpoint: Checkpoint, show_progress: bool) -> None:
    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}
    total = sum(checkpoint.entries[name].nbytes for name in targets)
    progress = Progress(
        TextColumn("loading"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not show_progress,
    )
    with progress, torch.no_grad():
        task = progress.add_task("load", total=total)
        for hub_name, target in targets.items():
            destination = params[target.param][target.index] if target.index else params[target.param]
            checkpoint.read_into(hub_name, destination)
            filled[target.param] += destination.numel()
            progress.advance(task, checkpoint.entries[hub_name].nbytes)
    for name, param in params.items():
        if filled[name] != param.numel():
            raise MimoError(f"{checkpoint.dir}: checkpoint does not provide all of '{name}'")

