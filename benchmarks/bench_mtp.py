"""MTP speculative decoding speed: tokens/s with and without MTP, mean accepted length, in one run.

    python benchmarks/bench_mtp.py --shape 7b --dtype bfloat16 [--record]
    python benchmarks/bench_mtp.py --demo [--record]

--demo measures the trained demo models (mimo-nano, mimo-nano-moe) on the opening of their held-out
Austen text, greedy and sampled (temperature 0.6, seeded), with their own MTP layers.

--shape measures the loop on checkpoints whose MTP agrees with the target by construction: the
bench checkpoint turned into a bigram model whose MTP layers copy it (`make_bigram_with_oracle_mtp`,
every draft accepted; its text keeps to the first 16384 ids, the frequent-token prior the default
draft vocabulary relies on), and the random bench checkpoint itself (every draft rejected: the
overhead bound). Plain decode and the MTP variants take turns in one process on the same weights.
Target: speedup >= 0.85 x mean accepted length.
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
from bench_decode import CACHE, checkpoint_for  # noqa: E402

from mimo_local.engine import DRAFT_VOCAB  # noqa: E402

FREQUENT_IDS = 16384


def oracle_for(shape: str) -> Path:
    from mimo_local.dev.tiny import make_bigram_with_oracle_mtp

    path = CACHE / f"{shape}-oracle"
    if not (path / "config.json").exists():
        make_bigram_with_oracle_mtp(checkpoint_for(shape), path, "copy", frequent_ids=FREQUENT_IDS)
    return path


def take_turns(variants: dict, repeats: int) -> dict:
    """Run each variant (a function returning the stats of one generation) in turn for `repeats`
    rounds after a warm-up, keeping each one's best: the same weights in the same memory, so only
    the decoding differs."""
    best = {}
    for _ in range(repeats + 1):
        for name, generate in variants.items():
            stats = generate()
            if name not in best or stats.decode_tokens_per_s > best[name].decode_tokens_per_s:
                best[name] = stats
    return {name: {"decode_tokens_per_s": stats.decode_tokens_per_s,
                   "mean_accepted_length": stats.speculation.mean_accepted_length if stats.speculation else 1.0}
            for name, stats in best.items()}


def run_demo(name: str, temperature: float, gen_tokens: int, repeats: int) -> dict:
    from mimo_local.engine import Engine
    from mimo_local.store.names import DEMO_DIR
    from mimo_local.sampling import SamplingSettings

    engine = Engine.load(DEMO_DIR / name)
    ids = engine.prompt_ids((DEMO_DIR / "heldout.txt").read_text()[:600], raw=True)

    def variant(mtp: bool):
        settings = SamplingSettings(temperature=temperature, seed=0, max_tokens=gen_tokens)
        return lambda: list(engine.stream(ids, settings, eos_ids=(), **engine.speculation(mtp)))[-1].stats

    return take_turns({"no MTP": variant(False), "MTP": variant(True)}, repeats)


def measure_demo(args) -> list[tuple]:
    rows = []
    for name, layers in (("mimo-nano", 1), ("mimo-nano-moe", 3)):
        for temperature in (0.0, 0.6):
            command = [sys.executable, __file__, "--gen-tokens", str(args.gen_tokens), "--repeats",
                       str(args.repeats), "--demo-worker", name, str(temperature)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            base, result = figures["no MTP"]["decode_tokens_per_s"], figures["MTP"]
            rows.append((f"{name} (trained), temperature {temperature}", f"MTP, up to {layers} draft(s)", base,
                         result["decode_tokens_per_s"], result["mean_accepted_length"],
                         result["decode_tokens_per_s"] / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["7b", "v2"], default="7b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--demo", action="store_true", help="the trained demo models instead of the bench shapes")
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "LAYERS"), help=argparse.SUPPRESS)
    parser.add_argument("--demo-worker", nargs=2, metavar=("NAME", "TEMPERATURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.demo_worker:
        name, temperature = args.demo_worker
        print(json.dumps(run_demo(name, float(temperature), args.gen_tokens, args.repeats)))
        return
    if args.worker:
        path, layers = args.worker
        print(json.dumps(run_variants(Path(path), args.dtype, int(layers), args.gen_tokens, args.repeats)))
        return

    rows = measure_demo(args) if args.demo else measure_shape(args)
    title = "MTP on the trained demo models" if args.demo else f"MTP on the {args.shape}-shape bench, {args.dtype}"
    report(rows, title + f", {args.gen_tokens} new tokens", args.record)


def measure_shape(args) -> list[tuple]:
    layers = 1 if args.shape == "7b" else 3
    checkpoints = {"oracle (MTP copies target)": oracle_for(args.shape), "random (drafts rejected)":
                   checkpoint_for(args.shape)}
    rows = []
    for label, path in checkpoints.items():
        command = [sys.executable, __file__, "--shape", args.shape, "--dtype", args.dtype, "--gen-tokens",
                   str(args.gen_tokens), "--repeats", str(args.repeats), "--worker", str(path), str(layers)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        base = figures["no MTP"]["decode_tokens_per_s"]
        for name, result in figures.items():
            if name != "no MTP":
                speedup = result["decode_tokens_per_s"] / base
                rows.append((label, name, base, result["decode_tokens_per_s"], result["mean_accepted_length"], speedup))
    return rows


def run_variants(path: Path, dtype: str, layers: int, gen_tokens: int, repeats: int) -> dict:
    """Plain decode and both MTP variants on one loaded model, taking turns."""
    import torch

    from mimo_local.generate import stream
    from mimo_local.loader import load_model
    from mimo_local.sampling import SamplingSettings
    from mimo_local.tokenizer import ChatTokenizer
    from bench_decode import prompt

    model = load_model(path, getattr(torch, dtype))
    tokenizer = ChatTokenizer(path)

    def variant(drafts: int, vocab: int | None):
        settings = SamplingSettings(temperature=0, max_tokens=gen_tokens)
        return lambda: list(stream(model, tokenizer, prompt(128), settings, eos_ids=(), draft_tokens=drafts,
                                   draft_vocab=vocab))[-1].stats

    return take_turns({"no MTP": variant(0, None),
                       f"MTP, up to {layers} draft(s) (default: draft vocab {DRAFT_VOCAB})": variant(layers, DRAFT_VOCAB),
                       f"MTP, up to {layers} draft(s), --draft-vocab 0 (whole vocabulary)": variant(layers, None)},
                      repeats)


def report(rows: list[tuple], title: str, record: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("checkpoint", "mode", "no-MTP tok/s", "MTP tok/s", "mean accepted length", "speedup",
                   "speedup / accepted length"):
        table.add_column(column, justify="right")
    for label, name, base, tps, accepted, speedup in rows:
        table.add_row(label, name, f"{base:.2f}", f"{tps:.2f}", f"{accepted:.2f}", f"{speedup:.2f}x",
                      f"{speedup / accepted:.2f}")
    Console().print(table)
    if record:
        command = "python benchmarks/bench_mtp.py " + " ".join(a for a in sys.argv[1:] if a != "--record")
        machine = f"{platform.machine()} {os.cpu_count()} cores, CPU"
        with open(HERE / "RESULTS.md", "a") as handle:
            for label, name, base, tps, accepted, speedup in rows:
                handle.write(f"| {date.today()} | {machine} | `{command}` | {label}: {name} | {tps:.2f} | "
                             f"{base:.2f} | {accepted:.2f} | {speedup:.2f}x | {speedup / accepted:.2f} |\n")


if __name__ == "__main__":
    main()
