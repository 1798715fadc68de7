"""Concurrent streams through `mimo serve` vs llama.cpp's own `llama-server`, same slots, one run.

    python benchmarks/bench_concurrent.py --shape 7b --quants none,int4-g128 --streams 1,2,4,8 \
        --llamacpp-bin /tmp/llbuild/bin [--record]

For each weight type, each server is started once with as many parallel slots as the largest
--streams (`mimo serve --parallel N`, `llama-server -np N`, continuous batching on: its default),
MTP off (llama.cpp has none for MiMo), --threads threads each, on the bench checkpoint (ours
quantized at load with the recipe; llama.cpp on the same weights converted to GGUF bf16 / q4_K_M /
q8_0 by benchmarks/peers/llamacpp_peer.py). Then, for every stream count B, B streaming
/v1/completions requests are sent at once, each with a prompt of its own (no cached prefix helps),
--gen-tokens tokens, greedy, end-of-text ignored. Aggregate decode tokens per second: the tokens
after each stream's first, summed, over the time from the first stream's first token to the last
stream's end. Best of --rounds.

Time to first token of a new request with a prompt of about 512 tokens (its count is printed) is
measured alone (idle) and while B-1 other streams decode (loaded), for the largest B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

from bench_decode import checkpoint_for  # noqa: E402
from bench_serve import free_port, prompt_text, wait_ready  # noqa: E402

LLAMACPP_PYTHON = "/work/llvenv/bin/python"
GGUF_TYPES = {"none": "bf16", "int8": "q8_0", "int4-g128": "q4_K_M"}
CTX_PER_SLOT = 1024


class Stream(threading.Thread):
    """One streaming completion; records when it was sent, its first token, its end and its tokens."""

    def __init__(self, base: str, model: str, text: str, gen_tokens: int):
        super().__init__(daemon=True)
        self.base, self.model, self.text, self.gen_tokens = base, model, text, gen_tokens
        self.sent = self.first = self.done = None
        self.tokens = 0
        self.prompt_tokens = None
        self.error: Exception | None = None
        self.stop = threading.Event()  # set: the client hangs up (the server cancels the request)

    def run(self):
        import httpx

        body = {"model": self.model, "prompt": self.text, "max_tokens": self.gen_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        try:
            self.sent = time.perf_counter()
            usage = None
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=1200) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if self.stop.is_set():
                        break
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if self.first is None and chunk.get("choices"):
                        self.first = time.perf_counter()
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            self.done = time.perf_counter()
            self.tokens = usage["completion_tokens"] if usage else self.gen_tokens
            self.prompt_tokens = usage["prompt_tokens"] if usage else None
        except Exception as error:  # reported by the caller
            self.error = error


def run_streams(base: str, model: str, texts: list[str], gen_tokens: int) -> list[Stream]:
    streams = [Stream(base, model, text, gen_tokens) for text in texts]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.join()
    failed = [s.error for s in streams if s.error is not None]
    if failed:
        raise RuntimeError(f"a request failed: {failed[0]}")
    return streams


def aggregate_rate(streams: list[Stream]) -> float:
    span = max(s.done for s in streams) - min(s.first for s in streams)
    return sum(s.tokens - 1 for s in streams) / span


def ttft_under_load(base: str, model: str, others: list[str], probe: str) -> float:
    """TTFT of `probe` sent once every one of `others` is streaming; they are asked for as many tokens
    as their slot holds and hang up once the probe has its first token."""
    streams = [Stream(base, model, text, CTX_PER_SLOT // 2) for text in others]
    for stream in streams:
        stream.start()
    while any(s.first is None and s.error is None and s.is_alive() for s in streams):
        time.sleep(0.01)
    probe_stream = run_streams(base, model, [probe], 8)[0]
    for stream in streams:
        stream.stop.set()
        stream.join()
    if any(s.first is None or s.done < probe_stream.first for s in streams):
        raise RuntimeError(f"the other streams ended before the probe's first token (its prompt is longer than "
                           f"{CTX_PER_SLOT // 2} decode steps): lower --ttft-prompt-words")
    return probe_stream.first - probe_stream.sent


def mimo_server(path: Path, quant: str, slots: int, threads: int, port: int) -> list[str]:
    return [sys.executable, "-m", "mimo_local.cli", "serve", "-m", str(path), "--port", str(port), "--dtype", "bfloat16",
            "--device", "cpu", "--no-mtp", "--parallel", str(slots), "--ctx", str(CTX_PER_SLOT),
            "--cache-ram", "0", *(["--quant", quant] if quant != "none" else [])]


def llamacpp_server(path: Path, quant: str, slots: int, threads: int, port: int, binaries: Path) -> list[str]:
    from llamacpp_peer import gguf_path

    outtype = GGUF_TYPES[quant]
    # The peer script names its GGUF after the resolved checkpoint path (benchmarks/cache may be a link).
    gguf = gguf_path(path.resolve(), Path("~/.cache/mimo-local/llamacpp_peer").expanduser().resolve(), outtype)
    if not gguf.exists():  # the peer script converts (and caches) it
        subprocess.run([LLAMACPP_PYTHON, str(HERE / "peers" / "llamacpp_peer.py"), "--checkpoint", str(path),
                        "--outtype", outtype, "--prompt-tokens", "8", "--gen-tokens", "2", "--repeats", "1"],
                       check=True, capture_output=True)
    return [str(binaries / "llama-server"), "-m", str(gguf), "--port", str(port), "-np", str(slots),
            "-c", str(CTX_PER_SLOT * slots), "-t", str(threads), "-tb", str(threads), "--no-webui",
            "--cache-reuse", "0", "-a", path.name]


def measure(command: list[str], port: int, ready_path: str, model: str, args, texts) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, ready_path)
        run_streams(base, model, [next(texts)], 8)  # warm-up
        rates = {}
        for count in args.streams:
            rates[count] = max(aggregate_rate(run_streams(base, model, [next(texts) for _ in range(count)],
                                                          args.gen_tokens)) for _ in range(args.rounds))
        long_prompt = lambda: next(texts) + " " + prompt_text(0, args.ttft_prompt_words)  # noqa: E731
        idle, loaded = [], []
        for _ in range(args.rounds):
            probe = run_streams(base, model, [long_prompt()], 8)[0]
            idle.append(probe.first - probe.sent)
            probe_tokens = probe.prompt_tokens
            others = [next(texts) for _ in range(max(args.streams) - 1)]
            loaded.append(ttft_under_load(base, model, others, long_prompt()))
        return {"rates": rates, "ttft_idle": min(idle), "ttft_loaded": min(loaded), "probe_tokens": probe_tokens}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def prompts():
    """Prompts that differ from their first word on (no engine reuses a cached prefix)."""
    index = 10_000
    while True:
        yield f"{index} " + prompt_text(index, 40)
        index += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["7b", "v2"], default="7b")
    parser.add_argument("--quants", default="none", help="comma-separated: none, int8, int4-g128")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--ttft-prompt-words", type=int, default=150,
                        help="words after the 40-word head: 150 make about 512 tokens with the bench tokenizer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--llamacpp-bin", type=Path, help="folder with llama-server (omit: ours alone)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.streams = [int(n) for n in args.streams.split(",")]
    path = checkpoint_for(args.shape)
    texts = prompts()
    slots = max(args.streams)
    rows = []
    for quant in args.quants.split(","):
        engines = {"mimo serve": lambda port: (mimo_server(path, quant, slots, args.threads, port), "/health")}
        if args.llamacpp_bin:
            engines["llama-server"] = lambda port: (
                llamacpp_server(path, quant, slots, args.threads, port, args.llamacpp_bin), "/health")
        for name, make in engines.items():
            port = free_port()
            command, ready = make(port)
            figures = measure(command, port, ready, path.name, args, texts)
            print(json.dumps({"engine": name, "quant": quant, **figures}), flush=True)
            rows.append((name, quant, figures))
    header = ("| engine | weights | " + " | ".join(f"{n} streams tok/s" for n in args.streams)
              + f" | {slots} vs 1 stream | probe prompt tokens | TTFT idle ms | TTFT with {slots - 1} streaming ms | loaded / idle |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, quant, f in rows:
        rates = f["rates"]
        lines.append(f"| {name} | {quant if quant != 'none' else 'bf16'} | "
                     + " | ".join(f"{rates[n]:.2f}" for n in args.streams)
                     + f" | {rates[slots] / rates[args.streams[0]]:.2f}x | {f['probe_tokens']} | {f['ttft_idle'] * 1000:.0f} | "
                     f"{f['ttft_loaded'] * 1000:.0f} | {f['ttft_loaded'] / f['ttft_idle']:.2f}x |")
    if args.llamacpp_bin:
        for quant in args.quants.split(","):
            ours = next(f for n, q, f in rows if n == "mimo serve" and q == quant)
            theirs = next(f for n, q, f in rows if n == "llama-server" and q == quant)
            lines.append(f"| ours / llama.cpp | {quant if quant != 'none' else 'bf16'} | "
                         + " | ".join(f"{ours['rates'][n] / theirs['rates'][n]:.2f}x" for n in args.streams)
                         + " | | | | | |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        command = "python benchmarks/bench_concurrent.py " + " ".join(sys.argv[1:]).replace(" --record", "")
        with open(HERE / "RESULTS.md", "a") as results:
            results.write(f"\n{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{args.threads} threads each, {args.shape}-shape bench checkpoint, MTP off:\n\n"
                          f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
