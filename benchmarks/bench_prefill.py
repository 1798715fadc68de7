"""Prefill speed on long prompts: mimo-local vs llama.cpp (`pp N` as llama-bench measures it), one run.

    python benchmarks/bench_prefill.py --shape 7b,v2 --lengths 512,2048,8192 [--quant int8] [--peers llamacpp]

Each engine prefills a prompt of N fixed token ids in its own subprocess, on the same bench checkpoint
as bench_decode.py (random weights in hub layout, made once under benchmarks/cache/), after a
512-token warm-up prefill; one timed prefill per length (a long prompt is its own average). Both
engines get --threads threads (default 1: a fair comparison on a shared machine). llama.cpp runs
the matching GGUF type (bfloat16 -> bf16, int8 -> q8_0, int4 recipes -> q4_K_M), with flash
attention, batch 2048 and micro-batch 512 (llama-bench's defaults). Prints a table; --record
appends rows to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_decode import LLAMACPP_QUANT_TYPES, LLAMACPP_TYPES, checkpoint_for, prompt  # noqa: E402

PEER = HERE / "peers" / "llamacpp_peer.py"
PEER_PYTHON = "/work/llvenv/bin/python"


def run_ours(path: str, dtype: str, tokens: int, threads: int, quant: str | None, cache_type: str) -> dict:
    import torch

    from mimo_local.generate import prefill
    from mimo_local.loader import load_model

    torch.set_num_threads(threads)
    model = load_model(path, getattr(torch, dtype), quant=quant)
    model.cache_type = cache_type
    prefill(model, model.new_cache(512), prompt(512))  # warm-up: lazy initialisation, kernel choices
    cache = model.new_cache(tokens)
    started = time.perf_counter()
    prefill(model, cache, prompt(tokens))
    return {"prefill_tokens_per_s": tokens / (time.perf_counter() - started)}


def measure_ours(path: Path, args, tokens: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from bench_prefill import run_ours; "
            f"print(json.dumps(run_ours({str(path)!r}, {args.dtype!r}, {tokens}, {args.threads}, {args.quant!r}, "
            f"{args.cache_type!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_llamacpp(path: Path, args, tokens: int) -> dict:
    outtype = LLAMACPP_QUANT_TYPES[args.quant] if args.quant else LLAMACPP_TYPES[args.dtype]
    command = [PEER_PYTHON, str(PEER), "--checkpoint", str(path), "--outtype", outtype, "--prompt-tokens", str(tokens),
               "--gen-tokens", "1", "--threads", str(args.threads), "--repeats", "1", "--flash-attn",
               "--batch", "2048", "--ubatch", "512"]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b,v2", help="7b, v2 or both (comma-separated)")
    parser.add_argument("--lengths", default="512,2048,8192", help="prompt lengths (comma-separated)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quant", default=None, help="recipe ours quantizes with on load (int8, int4-g128)")
    parser.add_argument("--cache-type", default="bf16", choices=["bf16", "int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peers", default="", help="llamacpp, or empty for ours alone")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()

    rows = []
    for shape in args.shape.split(","):
        path = checkpoint_for(shape)
        for tokens in map(int, args.lengths.split(",")):
            ours = measure_ours(path, args, tokens)["prefill_tokens_per_s"]
            peer = measure_llamacpp(path, args, tokens)["prefill_tokens_per_s"] if "llamacpp" in args.peers else None
            rows.append((shape, tokens, ours, peer))
            ratio = f"{ours / peer:.2f}x" if peer else "-"
            peer_text = f"{peer:.1f}" if peer else "-"
            print(f"{shape:>3} pp{tokens:<6} ours {ours:8.1f} tok/s  llama.cpp {peer_text:>8} tok/s  {ratio}", flush=True)
    if args.record:
        record(args, rows)


def record(args, rows) -> None:
    """A section of benchmarks/RESULTS.md: what ran, how, and one table row per shape and length."""
    command = "python benchmarks/bench_prefill.py " + " ".join(sys.argv[1:])
    weights = args.quant or args.dtype
    lines = [f"\n## Prefill on long prompts (issue 19): {weights} weights, KV {args.cache_type}, {args.threads} thread(s)\n",
             f"{date.today()}, {platform.machine()} ({platform.processor() or 'cpu'}), shared machine; bench checkpoints "
             "(random weights), one timed prefill per length after a 512-token warm-up.\n",
             f"`{command}`\n", "| shape | prompt | ours tok/s | llama.cpp tok/s | ours / llama.cpp |", "|---|---|---|---|---|"]
    for shape, tokens, ours, peer in rows:
        peer_cells = f"{peer:.1f} | {ours / peer:.2f}x" if peer else "not run | -"
        lines.append(f"| {shape} | pp{tokens} | {ours:.1f} | {peer_cells} |")
    with open(HERE / "RESULTS.md", "a") as results:
        results.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
