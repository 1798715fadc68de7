"""Acceptance of int8 draft head rows on trained weights: mean accepted length of greedy MTP on the
demo models with drafts over the whole bf16/float head vs over a draft vocabulary of all ids but
the last (its first rows scored from the int8 copy, the best four rescored), on ten held-out passages.

    python benchmarks/bench_draft_acceptance.py [--record]

The demo vocabularies (4096) are below the size where the draft vocabulary is on by default, so
this forces it to show what the int8 rows cost in acceptance where the margins are a trained model's.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASSAGES, PASSAGE_CHARS, NEW_TOKENS = 10, 600, 96


def mean_accepted(engine, text: str, draft_vocab: int) -> float:
    from mimo_local.sampling import SamplingSettings

    lengths = []
    for begin in range(0, PASSAGES * PASSAGE_CHARS, PASSAGE_CHARS):
        ids = engine.prompt_ids(text[begin : begin + PASSAGE_CHARS], raw=True)
        settings = SamplingSettings(temperature=0, max_tokens=NEW_TOKENS)
        layers = len(engine.model.mtp_layers)
        stats = list(engine.stream(ids, settings, eos_ids=(), **engine.speculation(True, layers, draft_vocab)))[-1].stats
        lengths.append(stats.speculation.mean_accepted_length)
    return sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from mimo_local.engine import Engine
    from mimo_local.store.names import DEMO_DIR

    text = (DEMO_DIR / "heldout.txt").read_text()
    rows = []
    for name in ("mimo-nano", "mimo-nano-moe"):
        engine = Engine.load(DEMO_DIR / name)
        vocab = engine.model.config.vocab_size
        rows.append((name, mean_accepted(engine, text, 0), mean_accepted(engine, text, vocab - 1)))
    table = Table(title=f"Greedy MTP acceptance, {PASSAGES} held-out passages, {NEW_TOKENS} new tokens each")
    for column in ("model", "whole head", "int8 draft rows", "ratio"):
        table.add_column(column, justify="right")
    for name, whole, int8 in rows:
        table.add_row(name, f"{whole:.4f}", f"{int8:.4f}", f"{int8 / whole:.4f}")
    Console().print(table)
    if args.record:
        machine = f"{platform.machine()} {os.cpu_count()} cores, CPU"
        with open(HERE / "RESULTS.md", "a") as handle:
            for name, whole, int8 in rows:
                handle.write(f"| {date.today()} | {machine} | `python benchmarks/bench_draft_acceptance.py` | {name} | "
                             f"{whole:.4f} | {int8:.4f} | {int8 / whole:.4f} |\n")


if __name__ == "__main__":
    sys.exit(main())
