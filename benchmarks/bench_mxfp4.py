"""MXFP4 routed experts on the CPU: our MXFP4 kernels against int4 and bf16 on the same shapes, one run.

At MiMo-V2-Flash's real expert shapes (hidden 4096, expert FFN 2048: gate|up 4096x4096, down
4096x2048), random weights:
- one expert's GEMV, 1 row: bf16 (cpu_linear.c), int4 groups of 128 (int8-quantized x, VNNI),
  int4 groups of 32 (float32 x, the exact path), MXFP4 (linear_mxfp4: x quantized to int8 per block
  of 32, VNNI), and MXFP4 dequantized by torch then F.linear (the path before the MXFP4 kernels);
- a routed-expert step: one token through --experts experts (all selected), one moe_pairs call, for
  MXFP4, both int4 variants and bf16.
The candidates take turns for --rounds rounds and each keeps its best (the machine may be shared:
compare the ratios of one run). Prints one JSON line per figure, then a markdown table.

    python benchmarks/bench_mxfp4.py [--threads 1] [--rounds 3] [--repeat 10] [--experts 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mimo_local.kernels import cpu, quant

HIDDEN, INTER = 4096, 2048  # MiMo-V2-Flash
GEMV_SHAPES = {"gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
BYTES_PER_WEIGHT = {"bf16": 2.0, "int4-g128": 0.5 + 8 / 128, "int4-g32": 0.5 + 8 / 32, "mxfp4": 0.5 + 1 / 32}


def best_time(function, repeat: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def stacks(experts: int, out_features: int, in_features: int, generator) -> dict:
    """The same-shape expert stack [experts, out, in] in each format (random codes: speed does not
    depend on the values; MXFP4 scales near 2^-6, as trained weights have)."""
    shape = (experts, out_features, in_features)
    packed = torch.randint(0, 256, (*shape[:2], in_features // 2), generator=generator, dtype=torch.uint8)
    return {
        "bf16": (torch.randn(shape, generator=generator) / in_features**0.5).bfloat16(),
        "int4-g128": (packed, torch.rand(*shape[:2], in_features // 128, generator=generator) / 64,
                      torch.full((*shape[:2], in_features // 128), 8.0)),
        "int4-g32": (packed, torch.rand(*shape[:2], in_features // 32, generator=generator) / 64,
                     torch.full((*shape[:2], in_features // 32), 8.0)),
        "mxfp4": (packed, torch.randint(118, 124, (*shape[:2], in_features // 32), generator=generator,
                                        dtype=torch.uint8)),
    }


def gemv_candidates(weights: dict, x: torch.Tensor) -> dict:
    first = {name: (w[0] if name == "bf16" else tuple(t[0] for t in w)) for name, w in weights.items()}
    return {
        "bf16 (ours)": lambda: cpu.linear(x, first["bf16"]),
        "int4-g128 (ours, int8 x)": lambda: quant.int4_linear(x, *first["int4-g128"], 128),
        "int4-g32 (ours, float x)": lambda: quant.int4_linear(x, *first["int4-g32"], 32),
        "mxfp4 (ours, int8 x)": lambda: quant.mxfp4_linear(x, *first["mxfp4"]),
        "mxfp4 torch dequantize + F.linear": lambda: quant.reference_mxfp4_linear(x, *first["mxfp4"]),
    }


def moe_candidates(gate_up: dict, down: dict, x: torch.Tensor, experts: int) -> dict:
    pair_experts, pair_tokens = torch.arange(experts), torch.zeros(experts, dtype=torch.long)
    pair_weights = torch.full((experts,), 1.0 / experts)
    pairs = (pair_experts, pair_tokens, pair_weights)
    return {
        "bf16 (ours)": lambda: cpu.moe_pairs(x, gate_up["bf16"], down["bf16"], *pairs),
        "int4-g128 (ours, int8 x)": lambda: quant.moe_pairs(x, "int4", 128, gate_up["int4-g128"],
                                                            down["int4-g128"], *pairs),
        "int4-g32 (ours, float x)": lambda: quant.moe_pairs(x, "int4", 32, gate_up["int4-g32"], down["int4-g32"],
                                                            *pairs),
        "mxfp4 (ours, int8 x)": lambda: quant.moe_pairs(x, "mxfp4", 32, gate_up["mxfp4"], down["mxfp4"], *pairs),
    }


def run(candidates: dict, rounds: int, repeat: int) -> dict:
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, function in candidates.items():
            slow = "torch dequantize" in name  # ~0.1-0.4 s a call: a single timed call per round
            best[name] = min(best[name], best_time(function, 1 if slow else repeat))
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--experts", type=int, default=8, help="experts of the routed step (all selected)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if quant.library() is None:
        raise SystemExit("the C kernels are off or failed to build: nothing to measure")
    generator = torch.Generator().manual_seed(0)
    gate_up = stacks(args.experts, *GEMV_SHAPES["gate_up"], generator)
    down = stacks(args.experts, *GEMV_SHAPES["down"], generator)
    x = torch.randn(1, HIDDEN, generator=generator).bfloat16()
    rows = []
    for shape_name, weights in (("gate_up", gate_up), ("down", down)):
        out_features, in_features = GEMV_SHAPES[shape_name]
        x_in = x if in_features == HIDDEN else torch.randn(1, in_features, generator=generator).bfloat16()
        for name, seconds in run(gemv_candidates(weights, x_in), args.rounds, args.repeat).items():
            fmt = name.split()[0]
            nbytes = out_features * in_features * BYTES_PER_WEIGHT[fmt]
            rows.append({"step": f"GEMV {shape_name} {out_features}x{in_features}", "kernel": name,
                         "us": round(seconds * 1e6, 1), "GB/s": round(nbytes / seconds / 1e9, 2)})
    moe_weights = args.experts * 3 * HIDDEN * INTER
    for name, seconds in run(moe_candidates(gate_up, down, x, args.experts), args.rounds, args.repeat).items():
        nbytes = moe_weights * BYTES_PER_WEIGHT[name.split()[0]]
        rows.append({"step": f"moe_pairs 1 token x {args.experts} experts", "kernel": name,
                     "us": round(seconds * 1e6, 1), "GB/s": round(nbytes / seconds / 1e9, 2)})
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"isa": cpu.active_isa(), "threads": torch.get_num_threads(), "rounds": args.rounds,
                      "repeat": args.repeat}))
    print("| step | kernel | us | GB/s | mxfp4 / this |")
    print("|---|---|---|---|---|")
    for row in rows:
        mxfp4_us = next(r["us"] for r in rows if r["step"] == row["step"] and r["kernel"] == "mxfp4 (ours, int8 x)")
        print(f"| {row['step']} | {row['kernel']} | {row['us']} | {row['GB/s']} | {mxfp4_us / row['us']:.2f} |")


if __name__ == "__main__":
    main()
