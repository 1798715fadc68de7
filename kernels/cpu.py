"""CPU decode matmuls from cpu_linear.c, compiled on first use, with a pure-torch reference.

`linear(x, weight, bias)` is F.linear for the few-token case (decode, speculative verify): it
streams the weights once at memory bandwidth, which torch's bf16 GEMV on CPU does not reach.
Any case it does not cover (GPU tensors, many tokens, other dtypes, no compiler) goes to F.linear.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu_linear.c")
MAX_ROWS = 16


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mimo-local" / "kernels"


def _cpu_signature() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256((flags + platform.machine()).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no gcc, not Linux/x86)."""
    if os.environ.get("MIMO_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    target = cache_dir() / f"cpu_linear-{digest}-{_cpu_signature()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
            temporary = handle.name
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", temporary]
        if subprocess.run(command, capture_output=True).returncode != 0:
            os.unlink(temporary)
            return None
        os.replace(temporary, target)
    torch.get_num_threads()  # torch's libgomp is loaded first, so the kernels share its threads
    lib = ctypes.CDLL(str(target))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_f32.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_int, i64, i64]
    lib.linear_bf16.argtypes = [pointer, pointer, pointer, pointer, pointer, ctypes.c_int, i64, i64]
    return lib


def _address(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and rows <= MAX_ROWS
        and x.dtype == weight.dtype
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.is_contiguous()
        and library() is not None
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the bandwidth-bound kernel when it applies."""
    if not supports(x, weight):
        return F.linear(x, weight, bias)
    lib = library()
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features).contiguous()
    rows = flat.shape[0]
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    bias = None if bias is None else bias.to(weight.dtype).contiguous()
    if weight.dtype == torch.float32:
        lib.linear_f32(flat.data_ptr(), weight.data_ptr(), _address(bias), out.data_ptr(), rows, out_features, in_features)
    else:
        lib.linear_bf16(flat.data_ptr(), weight.data_ptr(), _address(bias), None, out.data_ptr(), rows,
                        out_features, in_features)
    return out


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `linear` computes: fp32 accumulation, rounded once to the output dtype."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
