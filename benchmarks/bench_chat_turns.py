"""Chat turn latency against history length: the KV cache is reused across turns, so a new turn
prefills only itself and its time to first token should not grow with the conversation.

    python benchmarks/bench_chat_turns.py --shape 7b --dtype bfloat16 [--histories 0,512,2048,4096] [--record]

For each history length H, a conversation of real text (CPython's pydoc topics) of about H tokens
is loaded into a chat session on the bench checkpoint (random weights, so answers are noise). Then:
  first turn   a question after the history: the whole conversation is prefilled (cold cache);
  next turn    another question: only the new turn (plus whatever of the previous, model-written
               answer re-tokenizes differently) is prefilled;
  no reuse     the same next turn on a fresh session: what every turn would cost without KV reuse.
Each figure is the time to the first answer token, best of --repeats.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_decode import checkpoint_for  # noqa: E402

from mimo_local.chat.session import ChatSession  # noqa: E402
from mimo_local.chat.settings import ChatSettings  # noqa: E402
from mimo_local.engine import Engine  # noqa: E402
from mimo_local.generate import DoneEvent  # noqa: E402


def history(engine, tokens: int) -> list[dict]:
    """Alternating user/assistant messages of real text, about `tokens` tokens in all."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    messages, used, i = [], 0, 0
    while used < tokens:
        text = texts[i % len(texts)][:1200]
        messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant", "content": text})
        used += len(engine.tokenizer.encode(text)) + 5
        i += 1
    if messages and messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": "Understood."})
    return messages


def first_token_seconds(session: ChatSession, question: str) -> float:
    started = time.perf_counter()
    events = session.ask(question)
    elapsed = None
    for event in events:
        if elapsed is None:
            elapsed = time.perf_counter() - started
        if isinstance(event, DoneEvent):
            break
    return elapsed


def measure(engine, size: int, max_tokens: int) -> dict:
    settings = ChatSettings(temperature=0, max_tokens=max_tokens)
    session = ChatSession(engine, "bench", settings, mtp=False, context=size + 1024)
    session.messages = history(engine, size)
    first = first_token_seconds(session, "Summarize the above in one sentence.")
    history_tokens = session.last_turn.prompt_tokens
    following = first_token_seconds(session, "And in one word?")
    reused, new = session.last_turn.reused_tokens, session.last_stats.prompt_tokens

    cold = ChatSession(engine, "bench", settings, mtp=False, context=size + 1024)
    cold.messages = [dict(m) for m in session.messages[:-2]]
    cold.messages.append({"role": "user", "content": "And in one word?"})
    no_reuse = first_token_seconds(cold, cold.messages.pop()["content"])
    return dict(history=history_tokens, first=first, next=following, new=new, reused=reused, no_reuse=no_reuse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=["7b", "v2"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--histories", default="0,512,2048,4096")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append a row to benchmarks/RESULTS.md")
    args = parser.parse_args()

    engine = Engine.load(checkpoint_for(args.shape), device="cpu", dtype=args.dtype)
    first_token_seconds(ChatSession(engine, "warm", ChatSettings(max_tokens=4), mtp=False, context=256), "warm up")
    rows = []
    for size in [int(s) for s in args.histories.split(",")]:
        runs = [measure(engine, size, args.max_tokens) for _ in range(args.repeats)]
        best = {k: min(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[-1][k] for k in runs[0]}
        rows.append(best)
        print(
            f"history {best['history']:5d} tok | first turn {best['first'] * 1000:7.1f} ms | next turn "
            f"{best['next'] * 1000:6.1f} ms ({best['new']} new, {best['reused']} reused) | "
            f"no reuse {best['no_reuse'] * 1000:7.1f} ms",
            flush=True,
        )
    if args.record:
        record(args, rows)


def record(args, rows: list[dict]) -> None:
    machine = f"{platform.machine()} {__import__('os').cpu_count()} cores, CPU"
    command = f"`python benchmarks/bench_chat_turns.py --shape {args.shape} --dtype {args.dtype} --histories {args.histories}`"
    figures = "; ".join(
        f"H={r['history']}: next {r['next'] * 1000:.0f} ms ({r['new']} new tok) vs no reuse {r['no_reuse'] * 1000:.0f} ms"
        for r in rows
    )
    results = HERE / "RESULTS.md"
    text = results.read_text()
    heading = "## Chat (issue 7): time to first token of a new turn against history length"
    if heading not in text:
        text = text.rstrip() + f"\n\n{heading}\n\n| date | machine | command | shape, dtype | figures |\n|---|---|---|---|---|\n"
    text += f"| {date.today()} | {machine} | {command} | {args.shape} {args.dtype} | {figures} |\n"
    results.write_text(text)


if __name__ == "__main__":
    main()
