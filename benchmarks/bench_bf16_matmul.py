"""bfloat16 matmuls on this CPU: decode rows through our kernel, prefill rows through torch's bfloat16 GEMM
and through float32 panels (what `cpu.linear` takes where the CPU has no bfloat16 instructions).

    python benchmarks/bench_bf16_matmul.py [--threads 1] [--shape 4096x4096]

Prints GMAC/s per row count, best of --repeats calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mxfp4 import best_time  # noqa: E402

from mimo_local.kernels import build, cpu  # noqa: E402


def best_rate(function, macs: int, repeats: int) -> float:
    return macs / best_time(function, repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN of the weight")
    parser.add_argument("--decode-rows", default="1,2,4,8,16")
    parser.add_argument("--prefill-rows", default="32,128,512")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_features, in_features = (int(n) for n in args.shape.split("x"))
    weight = torch.randn(out_features, in_features).bfloat16()
    native = bool(cpu.NATIVE_BFLOAT16_FLAGS & build.cpu_flags())
    print(f"kernel build {cpu.active_isa()}, bfloat16 instructions: {'yes' if native else 'no'}, "
          f"{args.threads} thread(s), weight {args.shape}")
    print("| rows | path | GMAC/s |\n|---|---|---|")
    for rows in (int(n) for n in args.decode_rows.split(",")):
        x = torch.randn(rows, in_features).bfloat16()
        rate = best_rate(lambda: cpu._kernel_linear(x, weight, None, False), rows * weight.numel(), args.repeats)
        print(f"| {rows} | kernel | {rate:.1f} |")
    for rows in (int(n) for n in args.prefill_rows.split(",")):
        x = torch.randn(rows, in_features).bfloat16()
        repeats = max(3, args.repeats // 5)
        for name, function in (("torch bfloat16 GEMM", lambda: F.linear(x, weight)),
                               ("float32 panels", lambda: cpu.bfloat16_linear_in_float32(x, weight))):
            print(f"| {rows} | {name} | {best_rate(function, rows * weight.numel(), repeats):.1f} |")


if __name__ == "__main__":
    main()
