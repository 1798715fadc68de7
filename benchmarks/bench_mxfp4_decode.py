"""Decode with MXFP4 routed experts: ours vs llama.cpp's MXFP4, batch 1, greedy, same run (issue 21).

    python benchmarks/bench_mxfp4_decode.py --threads 1 [--rounds 3] [--record]
    python benchmarks/bench_mxfp4_decode.py --threads 2 [--rounds 3] [--record]

The checkpoint (made once under benchmarks/cache/v2.6-bench): the V2-Flash bench shape (v2-bench:
hidden 1024, 12 layers, 64 routed experts of FFN 256, top 8, vocabulary 152576) in the MiMo-V2.6
hub layout (`mimo_v2.6` preset of mimo_local/dev/tiny.py): FP8 fused q|k|v and other FP8 weights,
routed experts in MXFP4, random weights. One change to v2-bench: 4 KV heads on the global layers
instead of 2, so q|k|v is stored in 4 TP shards, a count llama.cpp's converter can place (it
guesses 8 or 4 from the scale rows; with 2 shards it cannot convert these shapes).

Ours loads it as it is (MXFP4 experts kept packed, run by cpu_quant.c's MXFP4 kernels; the FP8
weights dequantized to bfloat16); llama.cpp gets it through its own convert_hf_to_gguf.py with
--outtype bf16 (the FP8 weights dequantized to bf16, the MXFP4 experts repacked bit for bit into
ggml's MXFP4). Each measurement is a subprocess: ours is bench_decode.py's worker at --threads
torch threads, llama.cpp is peers/llamacpp_peer.py at --threads threads (LLAMA_CPP_LIB_PATH picks
its build); prompt --prompt-tokens fixed ids, then --gen-tokens tokens, EOS ignored. The engines
take turns for --rounds rounds and each keeps its best decode rate. Prints a markdown row; --record
appends it to benchmarks/RESULTS.md under the MXFP4 section's table.
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
CHECKPOINT = HERE / "cache" / "v2.6-bench"
LLAMACPP_PYTHON = os.environ.get("LLAMACPP_PYTHON", "/work/llvenv/bin/python")
HEADER = ("| date | machine | command | ours decode tok/s | llama.cpp MXFP4 decode tok/s | ours / llama.cpp |\n"
          "|---|---|---|---|---|---|\n")
SECTION = "## MXFP4 routed experts: decode vs llama.cpp's MXFP4 (issue 21)"


def checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        from mimo_local.dev.tiny import PRESETS, make_checkpoint

        shape = dict(PRESETS["mimo_v2_flash-bench"], num_key_value_heads=4)
        make_checkpoint(CHECKPOINT, "mimo_v2.6", shards=2, overrides=shape)
    return CHECKPOINT


def ours(args) -> float:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_decode import run_ours

    torch.set_num_threads(args.threads)
    return run_ours(checkpoint(), "bfloat16", args.prompt_tokens, args.gen_tokens, repeats=1)["decode_tokens_per_s"]


def llamacpp(args) -> float:
    command = [LLAMACPP_PYTHON, str(HERE / "peers" / "llamacpp_peer.py"), "--checkpoint", str(checkpoint()),
               "--outtype", "bf16", "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
               "--gen-tokens", str(args.gen_tokens), "--repeats", "1"]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp peer failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


WORKERS = {"ours": ours, "llama.cpp": llamacpp}


def record(row: str, results: Path = HERE / "RESULTS.md") -> None:
    """Append `row` to the section's table (the section, with this docstring's description, made first)."""
    text = results.read_text()
    if SECTION not in text:
        description = "\n\n".join(__doc__.split("\n\n")[2:4]).strip()
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{description}\n\n{HEADER}"
    start = text.index(SECTION)
    following = text.find("\n## ", start + len(SECTION))
    end = len(text) if following < 0 else following
    section = text[start:end].rstrip("\n") + "\n" + row + "\n"
    results.write_text(text[:start] + section + ("\n" + text[end:].lstrip("\n") if following >= 0 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads of both engines")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the engines taking turns")
    parser.add_argument("--record", action="store_true", help="append the row to benchmarks/RESULTS.md")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint()
    if args.worker:
        print(json.dumps({"decode_tokens_per_s": WORKERS[args.worker](args)}))
        return

    best = dict.fromkeys(WORKERS, 0.0)
    for _ in range(args.rounds):
        for engine in WORKERS:
            command = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads),
                       "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{engine} failed: {out.stderr.strip()[-800:]}")
            rate = json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]
            print(f"{engine}: {rate:.2f} tok/s", file=sys.stderr, flush=True)
            best[engine] = max(best[engine], rate)
    command = "python benchmarks/bench_mxfp4_decode.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
    machine = f"{platform.machine()} {os.cpu_count()} cores, CPU"
    row = (f"| {date.today()} | {machine} | `{command.strip()}` | {best['ours']:.2f} | {best['llama.cpp']:.2f} | "
           f"{best['ours'] / best['llama.cpp']:.2f}x |")
    print(HEADER + row)
    if args.record:
        record(row)


if __name__ == "__main__":
    main()
