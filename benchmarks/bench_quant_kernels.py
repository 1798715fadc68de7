"""Packed int8/int4 matmul kernels against the unquantized matmul of the same shape, one run.

CPU: our C kernels (mimo_local/kernels/cpu_linear.c, cpu_quant.c; the ISA build that runs is printed, force one
with MIMO_CPU_ISA=avx512|avx2|generic) vs torch's own ops for the same weights (F.linear in bf16,
torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu on weights converted to its layout), at
MiMo-7B's decoder shapes scaled down to the 7B-shape bench and its lm_head (or --full for the real
7B shapes). --rounds interleaves the candidates that many times and keeps each one's best (the
machine may be shared: ratios from one run are what to compare).
CUDA: our Triton kernels vs F.linear in bf16 and bitsandbytes nf4, plus the fraction of the memory
bandwidth roofline each reaches (bytes moved / time / peak, --peak-gbs, default H100 SXM 3350).

    python benchmarks/bench_quant_kernels.py [--device cpu|cuda] [--rows 1] [--full] [--rounds 3] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mimo_local.kernels import cpu, quant

# (out, in) of one decoder layer's matmuls: q|k|v, o, gate|up, down
BENCH_SHAPES = [(1536, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]  # hidden 1024, as mimo-bench
FULL_7B_SHAPES = [(5120, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
LM_HEAD = {False: (151680, 1024), True: (151680, 4096)}  # vocabulary x hidden: the largest matmul per token


def timed(function, repeat: int, device: str) -> float:
    for _ in range(3):
        function()
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def make_weights(out_features, in_features, device, group=128):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    absmax = weight.abs().amax(dim=1)
    int8 = {"qweight": (weight / (absmax[:, None] / 127)).round().to(torch.int8), "scales": absmax / 127}
    grouped = weight.view(out_features, -1, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scales = (high - low).clamp(min=1e-8) / 15
    zeros = (-low / scales).round()
    q = (grouped / scales[..., None] + zeros[..., None]).round().clamp(0, 15).view(out_features, in_features)
    int4 = {"packed": quant.pack_int4(q), "scales": scales, "zeros": zeros}
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return weight.to(device), move(int8), move(int4)


def torch_int4_op(int4: dict, group: int = 128):
    """torch._weight_int4pack_mm_for_cpu on our int4 weights converted to its layout (W = (q - 8) *
    scale + zero per group; conversion outside the timing), or None where this torch lacks it."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return None
    q = quant.unpack_int4(int4["packed"]).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scales, zeros = int4["scales"], int4["zeros"]
    scale_zero = torch.stack([scales, (8 - zeros) * scales], -1).transpose(0, 1).contiguous().bfloat16()
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero)


def bench(device: str, rows: int, shapes, repeat: int, peak_gbs: float, rounds: int = 1) -> list[dict]:
    results = []
    for out_features, in_features in shapes:
        weight, int8, int4 = make_weights(out_features, in_features, device)
        x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
        bf16 = weight.to(torch.bfloat16)
        candidates = {
            "bf16 (ours)" if device == "cpu" else "bf16 F.linear": (
                (lambda: cpu.linear(x, bf16)) if device == "cpu" else (lambda: F.linear(x, bf16)),
                bf16.numel() * 2,
            ),
            "int8 (ours)": (lambda: quant.int8_linear(x, int8["qweight"], int8["scales"]), weight.numel() * 1.0),
            "int4-g128 (ours)": (
                lambda: quant.int4_linear(x, int4["packed"], int4["scales"], int4["zeros"], 128),
                weight.numel() * 0.5 + weight.numel() / 128 * 8,
            ),
        }
        if device == "cpu":
            candidates["bf16 torch F.linear"] = (lambda: F.linear(x, bf16), bf16.numel() * 2)
            scales_bf16 = int8["scales"].bfloat16()
            candidates["int8 torch _weight_int8pack_mm"] = (
                lambda: torch._weight_int8pack_mm(x, int8["qweight"], scales_bf16), weight.numel() * 1.0)
            int4_op = torch_int4_op(int4)
            if int4_op is not None:
                candidates["int4-g128 torch _weight_int4pack_mm"] = (
                    lambda: int4_op(x), weight.numel() * 0.5 + weight.numel() / 128 * 4)
        else:
            import bitsandbytes as bnb

            nf4, state = bnb.functional.quantize_4bit(bf16, quant_type="nf4")
            candidates["nf4 bitsandbytes"] = (
                lambda: bnb.matmul_4bit(x, nf4.t(), quant_state=state),
                weight.numel() * 0.5 + weight.numel() / 64 * 4,
            )
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(rounds):
            for name, (function, _) in candidates.items():
                best[name] = min(best[name], timed(function, repeat, device))
        for name, (function, nbytes) in candidates.items():
            seconds = best[name]
            results.append({
                "shape": f"{out_features}x{in_features}", "kernel": name, "us": round(seconds * 1e6, 1),
                "GB/s": round(nbytes / seconds / 1e9, 1), "roofline": round(nbytes / seconds / 1e9 / peak_gbs, 3),
            })
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="the real MiMo-7B shapes")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, best of each kernel kept")
    parser.add_argument("--no-lm-head", action="store_true", help="leave out the vocabulary projection")
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's own)")
    parser.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth peak for the roofline")
    parser.add_argument("--record", action="store_true", help="append the summary to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak_gbs or (3350.0 if args.device == "cuda" else 40.0)
    shapes = FULL_7B_SHAPES if args.full else BENCH_SHAPES
    if not args.no_lm_head:
        shapes = shapes + [LM_HEAD[args.full]]
    results = bench(args.device, args.rows, shapes, args.repeat, peak, args.rounds)
    totals: dict[str, float] = {}
    lm_head = "x".join(map(str, LM_HEAD[args.full]))
    for row in results:
        if row["shape"] != lm_head:  # per decoder layer: the vocabulary projection is once per token
            totals[row["kernel"]] = totals.get(row["kernel"], 0.0) + row["us"]
    for row in results:
        print(json.dumps(row))
    baseline = next(iter(totals.values()))
    summary = {name: {"us_per_layer": round(us, 1), "speedup_vs_first": round(baseline / us, 2)} for name, us in totals.items()}
    ratios = {}  # ours / torch's op, per shape and format: below 1.0 ours is faster
    for row in results:
        if "torch" in row["kernel"]:
            kind = row["kernel"].split()[0]
            ours = next(r for r in results if r["shape"] == row["shape"] and r["kernel"] == f"{kind} (ours)")
            ratios[f"{kind} {row['shape']}"] = round(ours["us"] / row["us"], 2)
    isa = getattr(cpu, "active_isa", lambda: "before-ISA-levels")() if args.device == "cpu" else "cuda"
    print(json.dumps({"device": args.device, "isa": isa, "threads": torch.get_num_threads(), "rows": args.rows,
                      "full": args.full, "per_layer": summary, "ours_over_torch": ratios}))
    if args.record:
        machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'} {torch.get_num_threads()} threads"
        line = (
            f"| {datetime.date.today()} | {machine} | `python benchmarks/bench_quant_kernels.py --device {args.device} "
            f"--rows {args.rows}{' --full' if args.full else ''}` | "
            + "; ".join(f"{name} {v['us_per_layer']} us/layer ({v['speedup_vs_first']}x)" for name, v in summary.items())
            + " |\n"
        )
        with open(Path(__file__).with_name("RESULTS.md"), "a") as handle:
            handle.write(line)


if __name__ == "__main__":
    main()
