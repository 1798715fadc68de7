"""CPU decode matmuls from cpu_linear.c, compiled on first use, with a pure-torch reference.

`linear(x, weight, bias)` is F.linear for the few-token case (decode, speculative verify): it
streams the weights once at memory bandwidth, which torch's bf16 GEMV on CPU does not reach.
Any case it does not cover (GPU tensors, many tokens, other dtypes, no compiler) goes to F.linear.
The library is built for the best ISA level the CPU runs (build.py: AVX-512, AVX2, NEON, generic), and
a weight shape on which torch's own op is faster on this machine goes to torch (choice.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from . import build, choice, signatures

SOURCE = Path(__file__).with_name("cpu_linear.c")
MAX_ROWS = 16


def load_compiled(source_path: Path) -> ctypes.CDLL | None:
    """`source_path` built for the best ISA level this CPU runs (see build.py) and loaded; None
    where the kernels are off or cannot be built."""
    loaded = build.load(source_path)
    if loaded is None:
        return None
    lib = loaded[0]
    # measured matmul choices (choice.py) hold for this build and this torch only
    lib.choice_key = f"{Path(lib._name).stem}+torch{torch.__version__}"
    return lib


def active_isa() -> str:
    """The ISA level of the kernels that run (a name of build.LEVEL_NAMES), or "torch" where none do."""
    lib = library()
    return "torch" if lib is None else lib.isa_name


_POINTER, _I64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_PER_DTYPE = {
    "linear": [_POINTER] * 5 + [_INT, _I64, _I64],
    "moe": [_POINTER] * 6 + [_INT, _INT, _POINTER, _POINTER, _POINTER, _I64, _I64],
    "swiglu": [_POINTER, _POINTER, _INT, _I64],
    "mlp": [_POINTER] * 6 + [_INT, _I64, _I64],
    "rmsnorm": [_POINTER, _POINTER, _POINTER, _INT, _I64, _FLOAT],
    "attention_batch": [_POINTER, _INT] + [_POINTER] * 5,
    "decoder_layer_batch": [_POINTER, _INT, _POINTER, _I64, _FLOAT] + [_POINTER] * 3 + [_I64] + [_POINTER] * 4 + [_I64]
    + [_POINTER] * 8,
}
# Every entry point of cpu_linear.c: (argtypes, restype), checked against the C source by the tests.
DECLARATIONS: dict[str, signatures.Declaration] = {
    **{f"{name}_{suffix}": (types, None) for name, types in _PER_DTYPE.items() for suffix in ("f32", "bf16")},
    "argmax_rows_f32": ([_POINTER, _INT, _I64, _POINTER], None),
    "moe_scratch_floats": ([_I64, _I64], _I64),
    "attention_prefill_bf16": ([_POINTER, _I64, _I64, _POINTER, _I64, _POINTER, _I64, _POINTER, _POINTER, _INT, _INT,
                                _INT, _I64, _INT, _INT, _FLOAT], _INT),
    "attention_prefill_vectorized": ([], _INT),
    "kernel_isa": ([], ctypes.c_char_p),
}


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no gcc, not Linux/x86)."""
    lib = load_compiled(SOURCE)
    if lib is None:
        return None
    signatures.declare(lib, DECLARATIONS)
    lib.isa_name = lib.kernel_isa().decode()
    return lib


class AttentionArgs(ctypes.Structure):
    """`attention_args` of cpu_linear.c: the geometry and buffers of one attention call."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("qkv_stride", "start", "capacity", "window")],
        *[(name, ctypes.c_void_p) for name in ("cos", "sin", "sinks", "slot_pos")],
        *[(name, ctypes.c_int) for name in ("heads", "kv_heads", "dim", "v_dim", "rope_dim")],
        ("scale", ctypes.c_float),
        ("value_scale", ctypes.c_float),
        ("q_scratch", ctypes.c_void_p),
        ("score_scratch", ctypes.c_void_p),
    ]


def _kernel(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{'f32' if dtype == torch.float32 else 'bf16'}")


def _address(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU tensors of one float32 or bfloat16 dtype, the weight contiguous, and kernels built."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.is_contiguous()
        and library() is not None
    )


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.numel() // x.shape[-1] <= MAX_ROWS and _takes(x, weight)


def torch_is_faster(weight: torch.Tensor) -> bool:
    """Whether F.linear beats the kernel on this weight's shape here (measured once: choice.py)."""

    def contenders():
        x = torch.randn(1, weight.shape[1]).to(weight.dtype)
        return (lambda: _kernel_linear(x, weight, None, False)), (lambda: F.linear(x, weight))

    return choice.prefers_torch(f"linear-{str(weight.dtype).removeprefix('torch.')}", *weight.shape,
                                library().choice_key, contenders)


def torch_rows(function, x: torch.Tensor, *args) -> torch.Tensor:
    """function(x, *args) one row of x at a time: each token gets the arithmetic of a one-token call
    however many a call has (torch's GEMM may block several rows otherwise)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([function(flat[i : i + 1], *args) for i in range(flat.shape[0])])
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           float32_out: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), through the bandwidth-bound kernel when it applies. With
    `float32_out` the result is float32 (the bfloat16 kernel then skips the rounding: logits)."""
    if not supports(x, weight):
        if bfloat16_gemm_is_emulated(x, weight):
            return bfloat16_linear_in_float32(x, weight, bias, float32_out)
        out = F.linear(x, weight, bias)
        return out.float() if float32_out else out
    if torch_is_faster(weight):
        out = torch_rows(F.linear, x, weight, bias)
        return out.float() if float32_out else out
    return _kernel_linear(x, weight, bias, float32_out)


# Weight rows converted to float32 at a time (1-4 MB): the panel stays in cache while torch's GEMM reads it.
PANEL_ROWS = 256
# CPU features with which torch's bfloat16 GEMM has bfloat16 dot-product instructions to run on.
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def bfloat16_gemm_is_emulated(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether F.linear on these bfloat16 CPU tensors would run torch's bfloat16 GEMM without bfloat16
    instructions (AVX2, or ARM without BF16): measured 5.3 GMAC/s a core against 36 for float32.
    MIMO_CPU_KERNELS=0 and MIMO_CPU_MATMUL=torch keep torch's own op."""
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and not NATIVE_BFLOAT16_FLAGS & build.cpu_flags() and build.kernels_enabled()
            and choice.mode() != "torch")


def bfloat16_linear_in_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               float32_out: bool = False) -> torch.Tensor:
    """F.linear of bfloat16 tensors as torch's float32 GEMM computes it, the weight converted PANEL_ROWS
    rows at a time: the same arithmetic as a bfloat16 GEMM (exact products, float32 sums, one rounding
    at the end), 7x faster where the CPU has no bfloat16 instructions (prefill on AVX2)."""
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features).float()
    out = torch.empty(flat.shape[0], out_features, dtype=torch.float32 if float32_out else x.dtype)
    bias = None if bias is None else bias.float()
    panel = torch.empty(min(PANEL_ROWS, out_features), in_features)
    for begin in range(0, out_features, PANEL_ROWS):
        end = min(begin + PANEL_ROWS, out_features)
        rows = panel[: end - begin]
        rows.copy_(weight[begin:end])
        out[:, begin:end] = F.linear(flat, rows, None if bias is None else bias[begin:end])
    return out.view(*x.shape[:-1], out_features)


def _kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, float32_out: bool):
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features).contiguous()
    rows = flat.shape[0]
    out_dtype = torch.float32 if float32_out else x.dtype
    out = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype)
    # float32 weights write float32 outputs anyway: into y; bfloat16 ones write y_f32 only for logits.
    to_f32 = float32_out and x.dtype != torch.float32
    _kernel("linear", x.dtype)(flat.data_ptr(), weight.data_ptr(), _address(bias), out.data_ptr() if to_f32 else None,
                               None if to_f32 else out.data_ptr(), rows, out_features, in_features)
    return out


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The index of the largest value of each row of `logits` [..., V] (the first, on ties), as
    torch.argmax(dim=-1) gives it: through the vectorized kernel for float32 CPU logits."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or library() is None:
        return logits.argmax(dim=-1).reshape(-1).tolist()
    rows = logits.reshape(-1, logits.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    library().argmax_rows_f32(rows.data_ptr(), rows.shape[0], rows.shape[1], out.data_ptr())
    return out.tolist()


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `linear` computes: fp32 accumulation, rounded once to the output dtype."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def rows_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the row-wise kernels (rms_norm) take x and weight, however many rows (x contiguous)."""
    return x.is_contiguous() and _takes(x, weight)


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
    scratch = torch.empty(threads, library().moe_scratch_floats(hidden, inter), dtype=torch.float32)
    _kernel("moe", x.dtype)(x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), flat_experts.data_ptr(),
                            flat_tokens.data_ptr(), flat_weights.data_ptr(), flat_experts.numel(), tokens,
                            out.data_ptr(), partial.data_ptr(), scratch.data_ptr(), hidden, inter)
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
        return F.silu(gate).mul_(up)
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    _kernel("swiglu", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], inter)
    return out


def mlp_supports(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `mlp` applies (not where torch is faster on a projection: the three calls then run)."""
    return (supports_contiguous(x, gate_up) and down.dtype == gate_up.dtype and down.is_contiguous()
            and not torch_is_faster(gate_up) and not torch_is_faster(down))


def mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(swiglu(gate_up(x))) for a few rows in one call (gate rows first in gate_up [2I, H],
    down [H, I]), equal to the three calls it replaces. Callers check `mlp_supports` first."""
    inter, hidden = down.shape[1], down.shape[0]
    rows = x.numel() // x.shape[-1]
    out = torch.empty(*x.shape[:-1], hidden, dtype=x.dtype)
    gate_up_out = torch.empty(rows * 2 * inter, dtype=x.dtype)
    act = torch.empty(rows * inter, dtype=x.dtype)
    _kernel("mlp", x.dtype)(x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), out.data_ptr(), gate_up_out.data_ptr(),
                            act.data_ptr(), rows, hidden, inter)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * cast(x * rsqrt(mean(x^2) + eps)), any number of rows (threaded above MAX_ROWS: a
    prefill chunk). Callers check `rows_supported`."""
    out = torch.empty_like(x)
    rows = x.numel() // x.shape[-1]
    _kernel("rmsnorm", x.dtype)(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, x.shape[-1], eps)
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


def prefill_attention_supports(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `prefill_attention` takes these: bfloat16 CPU tensors of batch 1, key and value rows
    contiguous, and a build with the vectorized kernel (AVX512-BF16; torch's flash kernel elsewhere)."""
    return (
        q.device.type == "cpu"
        and q.dtype == keys.dtype == values.dtype == torch.bfloat16
        and q.shape[0] == 1
        and q.stride(-1) == 1
        and keys.stride(-1) == values.stride(-1) == 1
        and keys.stride(-2) == keys.shape[-1]
        and values.stride(-2) == values.shape[-1]
        and q.shape[-1] % 2 == 0
        and values.shape[-1] % 16 == 0
        and q.shape[1] % keys.shape[1] == 0
        and library() is not None
        and library().attention_prefill_vectorized() == 1
    )


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, before: int, scale: float,
                      sinks: torch.Tensor | None) -> torch.Tensor | None:
    """Causal attention of q [1, H, T, D] at positions before..before+T-1 over keys [1, Hkv, S, D] and
    values [1, Hkv, S, Dv] (S = before + T, grouped-query), with a per-head sink term in the softmax
    denominator: [1, H, T, Dv] (a view of a [1, T, H, Dv] tensor); None where the kernel could not
    allocate its buffers."""
    _, heads, steps, dim = q.shape
    kv_heads, v_dim = keys.shape[1], values.shape[-1]
    out = torch.empty(1, steps, heads, v_dim, dtype=q.dtype)
    sink_values = None if sinks is None else sinks.float().contiguous()
    done = library().attention_prefill_bf16(q.data_ptr(), q.stride(1), q.stride(2), keys.data_ptr(), keys.stride(1),
                                            values.data_ptr(), values.stride(1), _address(sink_values), out.data_ptr(),
                                            heads, kv_heads, steps, before, dim, v_dim, scale)
    return out.transpose(1, 2) if done else None


class BatchAttention:
    """The attention arguments of one or more sequences' rows in one call (a decode or verify step, or
    a batch step's): sequence b has lengths[b] rows at positions starts[b].. of caches[b] (one layer's
    caches, one spec), tables[b] its (cos, sin); the q and score scratch of all of them in one tensor.
    `rows`, `keys`, `values` and `args`: the arrays the kernels take, `count` their length."""

    def __init__(self, caches: list, starts: list[int], lengths: list[int], qkv_stride: int, tables: list, sinks,
                 scale: float):
        spec = caches[0].spec
        count, rows = len(caches), sum(lengths)
        q_size = spec.num_heads * spec.head_dim
        slots = [c.capacity if spec.is_sliding else start + steps for c, start, steps in zip(caches, starts, lengths)]
        score_sizes = [steps * spec.num_heads * n for steps, n in zip(lengths, slots)]
        self.scratch = torch.empty(rows * q_size + sum(score_sizes), dtype=torch.float32)
        base, item = self.scratch.data_ptr(), self.scratch.element_size()
        q_offset, score_offset = 0, rows * q_size
        self.args = (AttentionArgs * count)()
        window = spec.sliding_window if spec.is_sliding else -1
        for b, (cache, start, steps, (cos, sin)) in enumerate(zip(caches, starts, lengths, tables)):
            self.args[b] = AttentionArgs(
                qkv_stride=qkv_stride, start=start, capacity=cache.capacity, window=window, cos=cos.data_ptr(),
                sin=sin.data_ptr(), sinks=_address(sinks),
                slot_pos=cache.slot_pos.data_ptr() if spec.is_sliding else None, heads=spec.num_heads,
                kv_heads=spec.num_kv_heads, dim=spec.head_dim, v_dim=spec.v_head_dim, rope_dim=spec.rope_dim,
                scale=scale, value_scale=spec.value_scale, q_scratch=base + q_offset * item,
                score_scratch=base + score_offset * item,
            )
            q_offset += steps * q_size
            score_offset += score_sizes[b]
        self.rows = (ctypes.c_int * count)(*lengths)
        self.keys = (ctypes.c_void_p * count)(*(c.keys.data_ptr() for c in caches))
        self.values = (ctypes.c_void_p * count)(*(c.values.data_ptr() for c in caches))
        self.count = count


def decode_attention(qkv, starts: list[int], lengths: list[int], tables: list, caches: list, sinks,
                     scale: float) -> torch.Tensor:
    """Rotate, cache and attend the new rows of one or more sequences in one call (one thread team for
    all of them): qkv [rows, q+k+v] (row-strided view allowed) holds lengths[b] rows of sequence b at
    positions starts[b].. of caches[b] (one layer's caches, one spec), tables[b] its float32 (cos, sin)
    [lengths[b], rope_dim]. Returns [rows, heads * v_head_dim]; each sequence gets the numbers it
    gets alone."""
    spec = caches[0].spec
    batch = BatchAttention(caches, starts, lengths, qkv.stride(0), tables, sinks, scale)
    out = torch.empty(qkv.shape[0], spec.num_heads * spec.v_head_dim, dtype=qkv.dtype)
    _kernel("attention_batch", qkv.dtype)(qkv.data_ptr(), batch.count, batch.rows, batch.keys, batch.values,
                                          out.data_ptr(), batch.args)
    return out


class LayerBuffers:
    """The output and scratch of one fused decoder-layer call for the rows x [1, rows, H] of one or more
    sequences (see BatchAttention): out starts as a copy of x (updated in place), normed receives
    norm2(out)."""

    def __init__(self, x, caches: list, starts: list[int], lengths: list[int], qkv_out: int, inter: int, tables: list,
                 sinks, scale: float):
        spec = caches[0].spec
        rows = x.shape[1]
        self.out = x.contiguous().clone()
        self.normed = torch.empty_like(self.out)
        self.attention = BatchAttention(caches, starts, lengths, qkv_out, tables, sinks, scale)
        sizes = (qkv_out, spec.num_heads * spec.v_head_dim, 2 * inter, inter)
        self.scratch = [torch.empty(rows * size, dtype=x.dtype) for size in sizes]  # qkv, attn, gate|up, act

    def caches(self) -> tuple:
        """(keys, values, args): the attention arguments of the batch kernels."""
        return self.attention.keys, self.attention.values, self.attention.args

    def pointers(self) -> tuple:
        """(normed, qkv, attn, gate_up_out, act): the trailing kernel arguments."""
        return (self.normed.data_ptr(), *(t.data_ptr() for t in self.scratch))


def decoder_layer(x, eps: float, norm1, qkv_weight, qkv_bias, o_weight, norm2, starts: list[int], lengths: list[int],
                  tables: list, caches: list, sinks, scale: float, gate_up=None,
                  down=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A pre-norm decoder layer for the few rows x [1, rows, H] of one or more sequences (lengths[b]
    rows of sequence b at positions starts[b].. of caches[b], tables[b] its (cos, sin)) in one call
    (one thread team for all of it): h = x + o_proj(attention(qkv_proj(norm1(x)))), then, with
    gate_up/down, h + down(swiglu(gate_up(norm2(h)))). Returns (that, norm2(h)): without gate_up the
    caller adds its own FFN (MoE) of norm2(h) to h. Each sequence's rows get the numbers they get
    alone. Callers check `attention_supports` and `supports_contiguous` for every weight first. None
    (nothing done) where torch's op is faster on one of the projections: the caller runs the layer
    step by step, the same arithmetic as here for every other step."""
    if any(torch_is_faster(w) for w in (qkv_weight, o_weight, gate_up, down) if w is not None):
        return None
    qkv_out = qkv_weight.shape[0]
    inter = 0 if down is None else down.shape[1]
    buffers = LayerBuffers(x, caches, starts, lengths, qkv_out, inter, tables, sinks, scale)
    _kernel("decoder_layer_batch", x.dtype)(
        buffers.out.data_ptr(), buffers.attention.count, buffers.attention.rows, x.shape[2], eps, norm1.data_ptr(),
        qkv_weight.data_ptr(), _address(qkv_bias), qkv_out, o_weight.data_ptr(), norm2.data_ptr(), _address(gate_up),
        _address(down), inter, *buffers.caches(), *buffers.pointers(),
    )
    return buffers.out, buffers.normed
