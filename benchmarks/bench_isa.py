"""Decode per CPU ISA level: our AVX2 build against llama.cpp built for AVX2 only, and our run-time
choice (AVX-512 here) against llama.cpp built natively, same run.

    python benchmarks/bench_isa.py --avx2-llama-lib /tmp/llbuild-avx2/bin --native-llama-lib /tmp/llbuild/bin \
        [--shapes 7b,v2] [--quants none,int8,int4-g128] [--record]

Ours is forced to a level with MIMO_CPU_ISA (the kernels of that build only); llama.cpp is pointed at
a build with LLAMA_CPP_LIB_PATH. The AVX2 build of llama.cpp: `cmake -DGGML_NATIVE=OFF -DGGML_AVX=ON
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=ON` (our
avx2 level also uses AVX-VNNI where the CPU has it). Each measurement is one of bench_decode.py's
workers (batch 1, greedy, --prompt-tokens fixed ids then --gen-tokens); the engines take turns for
--rounds rounds and each keeps its best decode rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHT_NAMES = {"none": "bf16", "int8": "int8 (llama.cpp q8_0)", "int4-g128": "int4-g128 (llama.cpp q4_K_M)"}


def decode_rate(engine: str, shape: str, quant: str, env: dict, args) -> float:
    command = [sys.executable, str(HERE / "bench_decode.py"), "--worker", engine, "--shape", shape,
               "--dtype", "bfloat16", "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
               "--repeats", "1"] + (["--quant", quant] if quant != "none" else [])
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"{engine} failed: {out.stderr.strip()[-600:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--avx2-llama-lib", type=Path, required=True, help="folder with an AVX2-only libllama.so")
    parser.add_argument("--native-llama-lib", type=Path, required=True, help="folder with a native libllama.so")
    parser.add_argument("--shapes", default="7b,v2")
    parser.add_argument("--quants", default="none,int8,int4-g128")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    levels = {"avx2": ({"MIMO_CPU_ISA": "avx2"}, {"LLAMA_CPP_LIB_PATH": str(args.avx2_llama_lib)}),
              "native": ({}, {"LLAMA_CPP_LIB_PATH": str(args.native_llama_lib)})}
    lines = ["| build | shape | weights | ours decode tok/s | llama.cpp decode tok/s | ours / llama.cpp |",
             "|---|---|---|---|---|---|"]
    for level, (ours_env, peer_env) in levels.items():
        for shape in args.shapes.split(","):
            for quant in args.quants.split(","):
                best = {"mimo-local": 0.0, "llama.cpp": 0.0}
                for _ in range(args.rounds):
                    for engine, env in (("mimo-local", ours_env), ("llama.cpp", peer_env)):
                        best[engine] = max(best[engine], decode_rate(engine, shape, quant, env, args))
                ours, theirs = best["mimo-local"], best["llama.cpp"]
                line = (f"| {level} | {shape} | {WEIGHT_NAMES[quant]} | {ours:.2f} | {theirs:.2f} | "
                        f"{ours / theirs:.2f}x |")
                print(line, flush=True)
                lines.append(line)
    table = "\n".join(lines)
    print(table)
    if args.record:
        command = "python benchmarks/bench_isa.py " + " ".join(sys.argv[1:]).replace(" --record", "")
        with open(HERE / "RESULTS.md", "a") as results:
            results.write(f"\n{date.today()}, {platform.machine()}, {os.cpu_count()} cores, both engines on all of "
                          f"them:\n\n`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
