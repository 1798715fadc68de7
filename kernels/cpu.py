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


def load_compiled(source_path: Path) -> ctypes.CDLL | None:
    """Compile a kernel source for this CPU on first use (cached by source and CPU flags) and load
    it; None where that is impossible (no gcc, kernels turned off with MIMO_CPU_KERNELS=0)."""
    if os.environ.get("MIMO_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        return None
    digest = hashlib.sha256(source_path.read_bytes()).hexdigest()[:12]
    target = cache_dir() / f"{source_path.stem}-{digest}-{_cpu_signature()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
            temporary = handle.name
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source_path), "-o",
                   temporary, "-lm"]
        if subprocess.run(command, capture_output=True).returncode != 0:
            os.unlink(temporary)
            return None
        os.replace(temporary, target)
    torch.get_num_threads()  # torch's libgomp is loaded first, so the kernels share its threads
    return ctypes.CDLL(str(target))


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no gcc, not Linux/x86)."""
    lib = load_compiled(SOURCE)
    if lib is None:
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_f32.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_int, i64, i64]
    lib.linear_bf16.argtypes = [pointer, pointer, pointer, pointer, pointer, ctypes.c_int, i64, i64]
    for moe in (lib.moe_f32, lib.moe_bf16):
        moe.argtypes = [pointer] * 6 + [ctypes.c_int, ctypes.c_int, pointer, pointer, pointer, i64, i64]
    for swiglu in (lib.swiglu_f32, lib.swiglu_bf16):
        swiglu.argtypes = [pointer, pointer, ctypes.c_int, i64]
    for norm in (lib.rmsnorm_f32, lib.rmsnorm_bf16):
        norm.argtypes = [pointer, pointer, pointer, ctypes.c_int, i64, ctypes.c_float]
    integer, real = ctypes.c_int, ctypes.c_float
    for attention in (lib.attention_f32, lib.attention_bf16):
        attention.argtypes = [pointer, i64, integer, i64, pointer, pointer, pointer, pointer, pointer, i64, i64,
                              pointer, integer, integer, integer, integer, integer, real, real, pointer, pointer,
                              pointer]
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


def supports_contiguous(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`supports`, for the kernels that also need x itself contiguous (norms, activations)."""
    return supports(x, weight) and x.is_contiguous()


def moe_supports(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    return supports(x, gate_up[0])


def moe(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Routed SwiGLU experts for a few tokens: x [M, H], experts/weights [M, k] -> float32 [M, H].

    gate_up [E, 2I, H] (gate rows first), down [E, H, I]. One call per layer instead of a few
    dozen torch ops per expert. Callers check `moe_supports` first."""
    top_k = experts.shape[1]
    order = experts.reshape(-1).argsort(stable=True)
    return moe_pairs(x, gate_up, down, experts.reshape(-1)[order], order // top_k, weights.reshape(-1)[order])


def moe_pairs(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    pair_experts: torch.Tensor,
    pair_tokens: torch.Tensor,
    pair_weights: torch.Tensor,
) -> torch.Tensor:
    """`moe` for explicit (expert, token, weight) assignments, sorted by expert: out[token] +=
    weight * expert(x[token]). The experts of one group of a split layer (offload) come this way."""
    tokens, hidden, inter = x.shape[0], down.shape[1], down.shape[2]
    flat_experts = pair_experts.contiguous()
    flat_tokens = pair_tokens.contiguous()
    flat_weights = pair_weights.float().contiguous()
    x = x.contiguous()
    threads = torch.get_num_threads()
    out = torch.empty(tokens, hidden, dtype=torch.float32)
    partial = torch.empty(threads, tokens, hidden, dtype=torch.float32)
    scratch = torch.empty(threads, 3 * inter, dtype=torch.float32)  # 2I floats + I activations each
    kernel = library().moe_f32 if x.dtype == torch.float32 else library().moe_bf16
    kernel(x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), flat_experts.data_ptr(), flat_tokens.data_ptr(),
           flat_weights.data_ptr(), flat_experts.numel(), tokens, out.data_ptr(), partial.data_ptr(),
           scratch.data_ptr(), hidden, inter)
    return out


def reference_moe(x, gate_up, down, experts, weights) -> torch.Tensor:
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    for token in range(x.shape[0]):
        for expert, weight in zip(experts[token].tolist(), weights[token]):
            gate, up = F.linear(x[token], gate_up[expert]).chunk(2, dim=-1)
            out[token] += weight.float() * F.linear(F.silu(gate) * up, down[expert]).float()
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., gate | up] rows: one call instead of chunk, silu and mul."""
    inter = gate_up.shape[-1] // 2
    if not supports_contiguous(gate_up, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    kernel = library().swiglu_f32 if gate_up.dtype == torch.float32 else library().swiglu_bf16
    kernel(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], inter)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * cast(x * rsqrt(mean(x^2) + eps)) for a few rows. Callers check `supports_contiguous`."""
    out = torch.empty_like(x)
    kernel = library().rmsnorm_f32 if x.dtype == torch.float32 else library().rmsnorm_bf16
    kernel(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def attention_supports(qkv: torch.Tensor, cache, steps: int) -> bool:
    """Batch 1, CPU, and for ring buffers few enough new tokens that writing them first overwrites
    nothing a query of this step still sees."""
    spec = cache.spec
    return (
        qkv.device.type == "cpu"
        and qkv.dtype == cache.keys.dtype
        and qkv.dtype in (torch.float32, torch.bfloat16)
        and cache.keys.shape[0] == 1
        and steps <= MAX_ROWS
        and max(spec.head_dim, spec.v_head_dim) <= 1024
        and (not spec.is_sliding or steps <= cache.capacity - cache.window)
        and library() is not None
    )


def decode_attention(qkv, start: int, cos, sin, cache, sinks, scale: float) -> torch.Tensor:
    """Rotate, cache and attend for `steps` new tokens in one call. qkv [steps, q+k+v] (row-strided
    view allowed); cos/sin float32 [steps, rope_dim]. Returns [steps, heads * v_head_dim]."""
    spec = cache.spec
    steps = qkv.shape[0]
    slots = cache.capacity if spec.is_sliding else start + steps
    q_scratch = torch.empty(steps * spec.num_heads * spec.head_dim, dtype=torch.float32)
    score_scratch = torch.empty(steps * spec.num_heads * slots, dtype=torch.float32)
    out = torch.empty(steps, spec.num_heads * spec.v_head_dim, dtype=qkv.dtype)
    kernel = library().attention_f32 if qkv.dtype == torch.float32 else library().attention_bf16
    kernel(
        qkv.data_ptr(), qkv.stride(0), steps, start, cos.data_ptr(), sin.data_ptr(), cache.keys.data_ptr(),
        cache.values.data_ptr(), cache.slot_pos.data_ptr() if spec.is_sliding else None, cache.capacity,
        spec.sliding_window if spec.is_sliding else -1, None if sinks is None else sinks.data_ptr(),
        spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim, spec.rope_dim, scale, spec.value_scale,
        q_scratch.data_ptr(), score_scratch.data_ptr(), out.data_ptr(),
    )
    return out
