"""MTP speculative decoding speed: tokens/s with and without MTP, mean accepted length, in one run.

    python benchmarks/bench_mtp.py --shape 7b --dtype bfloat16 [--record]

Acceptance needs trained weights. Until the trained demo models exist, this measures the loop on
checkpoints whose MTP agrees with the target by construction: the bench checkpoint turned into a
bigram model whose MTP layers copy it (`make_bigram_with_oracle_mtp`, every draft accepted), with
the frequent-token prior that `--draft-vocab` relies on, and on the random bench checkpoint itself
(every draft rejected: the overhead bound). Target: speedup >= 0.85 x mean accepted length.
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
sys.path.insert(0, str(HERE))
from bench_decode import CACHE, checkpoint_for, run_ours  # noqa: E402

FREQUENT_IDS = 16384


def oracle_for(shape: str) -> Path:
    from mimo_local.dev.tiny import make_bigram_with_oracle_mtp

    path = CACHE / f"{shape}-oracle"
    if not (path / "config.json").exists():
        make_bigram_with_oracle_mtp(checkpoint_for(shape), path, "copy", frequent_ids=FREQUENT_IDS)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["7b", "v2"], default="7b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("CHECKPOINT", "DRAFTS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, drafts, vocab = args.worker
        print(json.dumps(run_ours(Path(path), args.dtype, 128, args.gen_tokens, args.repeats, int(drafts),
                                  int(vocab) or None)))
        return

    layers = 1 if args.shape == "7b" else 3
    checkpoints = {"oracle (MTP copies target)": oracle_for(args.shape), "random (drafts rejected)":
                   checkpoint_for(args.shape)}
    variants = [("no MTP", 0, 0), (f"MTP {layers} draft(s)", layers, 0),
                (f"MTP {layers} draft(s), --draft-vocab {FREQUENT_IDS}", layers, FREQUENT_IDS)]
    rows = []
    for label, path in checkpoints.items():
        figures = {}
        for name, drafts, vocab in variants:
            command = [sys.executable, __file__, "--shape", args.shape, "--dtype", args.dtype, "--gen-tokens",
                       str(args.gen_tokens), "--repeats", str(args.repeats), "--worker", str(path), str(drafts),
                       str(vocab)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            figures[name] = json.loads(out.stdout.strip().splitlines()[-1])
        base = figures["no MTP"]["decode_tokens_per_s"]
        for name, result in figures.items():
            if name == "no MTP":
                continue
            speedup = result["decode_tokens_per_s"] / base
            rows.append((label, name, base, result["decode_tokens_per_s"], result["mean_accepted_length"], speedup))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MTP on the {args.shape}-shape bench, {args.dtype}, 128-token prompt, {args.gen_tokens} new")
    for column in ("checkpoint", "mode", "no-MTP tok/s", "MTP tok/s", "mean accepted length", "speedup",
                   "speedup / accepted length"):
        table.add_column(column, justify="right")
    for label, name, base, tps, accepted, speedup in rows:
        table.add_row(label, name, f"{base:.2f}", f"{tps:.2f}", f"{accepted:.2f}", f"{speedup:.2f}x",
                      f"{speedup / accepted:.2f}")
    Console().print(table)
    if args.record:
        command = "python benchmarks/bench_mtp.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        machine = f"{platform.machine()} {os.cpu_count()} cores, CPU"
        with open(HERE / "RESULTS.md", "a") as handle:
            for label, name, base, tps, accepted, speedup in rows:
                handle.write(f"| {date.today()} | {machine} | `{command}` | {label}: {name} | {tps:.2f} | "
                             f"{base:.2f} | {accepted:.2f} | {speedup:.2f}x | {speedup / accepted:.2f} |\n")


if __name__ == "__main__":
    main()
