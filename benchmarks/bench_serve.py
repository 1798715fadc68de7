"""Time to first token and decode speed through `mimo serve` vs `mimo run`'s in-process generator vs
llama.cpp's own server (llama-cpp-python's `llama_cpp.server`) on the same weights, in one run.

    python benchmarks/bench_serve.py --shape 7b [--peers llamacpp]

Each engine runs in its own process on the bench checkpoint (random weights, made once under
benchmarks/cache/; llama.cpp gets the same weights converted to GGUF bf16): the in-process
generator is timed inside its process, the servers over streaming HTTP on 127.0.0.1 from this one
(OpenAI /v1/completions, the same text prompt, greedy, --gen-tokens tokens, MTP off so that every
engine decodes one token per step). Every request gets a prompt of its own, so no prefix cache helps.
The engines take turns for --rounds rounds; each keeps its best round. TTFT is from sending the
request to the first streamed token; decode tokens per second counts the tokens after the first over
the time after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_decode import checkpoint_for  # noqa: E402

LLAMACPP_PYTHON = "/work/llvenv/bin/python"
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch".split()


def prompt_text(index: int, words: int) -> str:
    return " ".join(WORDS[(index * 5 + i * 3) % len(WORDS)] for i in range(words)) + f" {index}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_in_process(path: Path, dtype: str, prompts: list[str], gen_tokens: int) -> list[tuple[float, float]]:
    """Run in a worker process: the generator `mimo run` consumes, no HTTP."""
    from mimo_local.engine import Engine
    from mimo_local.generate import DoneEvent
    from mimo_local.sampling import SamplingSettings

    engine = Engine.load(path, device="cpu", dtype=dtype)
    results = []
    for text in prompts:  # the first is a warm-up
        ids = engine.tokenizer.encode(text)
        started = time.perf_counter()
        first = None
        for event in engine.stream(ids, SamplingSettings(temperature=0, max_tokens=gen_tokens), eos_ids=()):
            if isinstance(event, DoneEvent):
                done = time.perf_counter()
            elif first is None and event.token_id >= 0:
                first = time.perf_counter()
        results.append((first - started, (gen_tokens - 1) / (done - first)))
    return results[1:]


def measure_server(base: str, model: str, prompts: list[str], gen_tokens: int) -> list[tuple[float, float]]:
    import httpx

    results = []
    for text in prompts:  # the first is a warm-up
        body = {"model": model, "prompt": text, "max_tokens": gen_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first, tokens = None, None
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        done = time.perf_counter()
        if tokens is None:  # llama_cpp.server sends no usage chunk: it generates exactly max_tokens here
            tokens = gen_tokens
        results.append((first - started, (tokens - 1) / (done - first)))
    return results[1:]


def wait_ready(base: str, process: subprocess.Popen, path: str) -> None:
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not start")


def measure_served(command: list[str], port: int, ready_path: str, model: str, prompts, gen_tokens):
    """Start a server process, measure it once it answers `ready_path`, stop it."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a full pipe stalls it
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, process, ready_path)
        return measure_server(base, model, prompts, gen_tokens)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def run_mimo_server(path: Path, dtype: str, prompts, gen_tokens):
    port = free_port()
    command = [sys.executable, "-m", "mimo_local.cli", "serve", "-m", str(path), "--port", str(port), "--dtype", dtype,
               "--device", "cpu", "--no-mtp", "--ctx", "4096"]
    return measure_served(command, port, "/health", path.name, prompts, gen_tokens)


def run_llamacpp_server(path: Path, prompts, gen_tokens, threads: int):
    sys.path.insert(0, str(HERE / "peers"))
    from llamacpp_peer import gguf_path

    gguf = gguf_path(path, Path("~/.cache/mimo-local/llamacpp_peer").expanduser().resolve(), "bf16")
    if not gguf.exists():  # the peer script converts (and caches) it
        subprocess.run([LLAMACPP_PYTHON, str(HERE / "peers" / "llamacpp_peer.py"), "--checkpoint", str(path),
                        "--outtype", "bf16", "--prompt-tokens", "8", "--gen-tokens", "2"], check=True,
                       capture_output=True)
    port = free_port()
    command = [LLAMACPP_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_ctx", "4096",
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--model_alias", path.name]
    return measure_served(command, port, "/v1/models", path.name, prompts, gen_tokens)


def in_worker(path: Path, dtype: str, prompts, gen_tokens):
    result = subprocess.run([sys.executable, __file__, "--worker", json.dumps([str(path), dtype, prompts, gen_tokens])],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def best(results: list[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["7b", "v2"], default="7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3, help="timed requests per engine and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="llamacpp")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, dtype, prompts, gen_tokens = json.loads(args.worker)
        print(json.dumps(measure_in_process(Path(path), dtype, prompts, gen_tokens)))
        return
    import torch

    torch.set_num_threads(args.threads)
    path = checkpoint_for(args.shape)
    engines = {"in-process": lambda p: in_worker(path, args.dtype, p, args.gen_tokens),
               "mimo serve": lambda p: run_mimo_server(path, args.dtype, p, args.gen_tokens)}
    if "llamacpp" in args.peers:
        engines["llama.cpp server"] = lambda p: run_llamacpp_server(path, p, args.gen_tokens, args.threads)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    count = 0
    for _ in range(args.rounds):
        for name, run in engines.items():
            # A prompt of its own for every request, the warm-up's too: no engine reuses a cached prefix.
            prompts = [prompt_text(count + i, args.prompt_words) for i in range(args.requests + 1)]
            count += args.requests + 1
            rounds[name].append(best(run(prompts)))
            print(f"{name}: TTFT {rounds[name][-1][0] * 1000:.1f} ms, decode {rounds[name][-1][1]:.2f} tok/s",
                  file=sys.stderr)
    summary = {name: best(values) for name, values in rounds.items()}
    base_ttft, base_decode = summary["in-process"]
    print(f"{'engine':<18} {'TTFT ms':>9} {'decode tok/s':>13} {'TTFT vs in-process':>19} {'decode vs in-process':>21}")
    for name, (ttft, decode) in summary.items():
        print(f"{name:<18} {ttft * 1000:>9.1f} {decode:>13.2f} {ttft / base_ttft:>19.3f} {decode / base_decode:>21.3f}")


if __name__ == "__main__":
    main()
