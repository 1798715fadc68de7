"""The placement flags every front end shares (run, chat, bench): typer options and their parsing
into a PlanRequest, plus the budgets detected when a flag is left out."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from .. import sizes

# torch, accelerate and the planner are imported where used: this module is read at CLI start-up.

UNITS_HELP = "G = GB = GiB = 2^30 bytes: every unit is a power of 1024; a unit is required, 0 excepted"
GPU_MEM_HELP = f"GPU memory budget, e.g. 24G, 1500MiB or 0 ({UNITS_HELP}; default: the free memory of GPU 0, 0 without CUDA)."
CPU_MEM_HELP = f"CPU memory budget, e.g. 96G or 1.5T ({UNITS_HELP}; default: the available RAM)."
CPU_MOE_HELP = "Keep every routed expert on the CPU (computed there)."
N_CPU_MOE_HELP = "Keep the routed experts of the first N MoE layers on the CPU."
OVERRIDE_HELP = "REGEX=DEVICE: put tensors whose hub name matches on cpu or gpu (repeatable)."


def gpu_mem_option():
    return typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP)


def cpu_mem_option():
    return typer.Option(None, "--cpu-mem", help=CPU_MEM_HELP)


def cpu_moe_option():
    return typer.Option(False, "--cpu-moe", help=CPU_MOE_HELP)


def n_cpu_moe_option():
    return typer.Option(0, "--n-cpu-moe", help=N_CPU_MOE_HELP)


def override_tensor_option():
    return typer.Option([], "--override-tensor", "-ot", help=OVERRIDE_HELP)


def parse_size(text: Optional[str], flag: str) -> Optional[int]:
    """'24G', '24GiB', '1.5T', '512M' (powers of 1024) or 0; None stays None (detect)."""
    return None if text is None else sizes.parse_size(text, flag)


def placement_request(
    gpu_mem: Optional[str] = None,
    cpu_mem: Optional[str] = None,
    cpu_moe: bool = False,
    n_cpu_moe: int = 0,
    override_tensor: Optional[list[str]] = None,
    **fields,
):
    """A PlanRequest from the flags; budgets left out are None until `with_budgets` detects them."""
    from .plan import PlanRequest, parse_overrides

    return PlanRequest(
        gpu_mem=parse_size(gpu_mem, "--gpu-mem"),
        cpu_mem=parse_size(cpu_mem, "--cpu-mem"),
        cpu_moe=cpu_moe,
        n_cpu_moe=n_cpu_moe,
        overrides=parse_overrides(list(override_tensor or [])),
        **fields,
    )


def with_budgets(request, device=None):
    """Fill budgets left out: the free memory of GPU 0 and the available RAM, as accelerate's
    get_max_memory reads them. A run on the CPU has no GPU budget whatever --gpu-mem says."""
    import psutil
    import torch

    gpu_mem, cpu_mem = request.gpu_mem, request.cpu_mem
    if device is not None and device.type != "cuda":
        gpu_mem = 0
    if gpu_mem is None:
        gpu_mem = torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else 0
    if cpu_mem is None:
        cpu_mem = psutil.virtual_memory().available
    return dataclasses.replace(request, gpu_mem=gpu_mem, cpu_mem=cpu_mem)
