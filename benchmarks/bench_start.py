"""Real-size start: how long `mimo run` takes to its first token, cold and warm, its decode speed and
its memory, against llama.cpp's own command-line tools on the same weights, in one run.

    mimo dev make-tiny /work/big/mimo-7b-full --preset mimo-7b-full --shards 4   # once: 15.6 GB
    python benchmarks/bench_start.py --model /work/big/mimo-7b-full --quants none,int8,int4-g128 \
        --llamacpp-bin /tmp/llbuild/bin [--copied]

For each load (bf16 as stored, or quantized at load with a recipe), ours:
  * first start: the first `mimo run` ever (converts and writes the runtime layout next to the model);
  * cold start: the model's files (source and runtime layout) evicted from the page cache first
    (posix_fadvise DONTNEED), so they are read from disk;
  * warm start: files in the page cache (best of --repeats);
each a whole `mimo run -n 1` process, start to exit (process start, imports, load, prefill of a
2-token prompt, one token); with --keep-alive also `mimo run --keep-alive` (kept first start: the call
that starts the background server; kept warm start: best of --repeats calls that find it loaded); decode tokens per second from `mimo run -n --gen-tokens --json` (best of
--decode-rounds runs, the engines taking turns; MTP off:
llama.cpp has none for MiMo); peak RSS of one process (wait4's ru_maxrss) and the summed peak PSS of
two processes decoding at once (shared weights count once).
llama.cpp gets the same checkpoint converted to GGUF (bf16 / q8_0 / q4_K_M, by
benchmarks/peers/llamacpp_peer.py, cached) and runs `llama-completion -no-cnv` the same way (-n 1, cold and warm),
`llama-bench -p 0 -n --gen-tokens` for decode. The disk's read rate is measured on each engine's files
right before its cold start; "read at disk rate" is the time to read what a cold start must read at
that rate (ours: the
byte ranges its load maps, from the checkpoint and its runtime layout; llama.cpp: its GGUF).
Prints one JSON line per row and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = HERE / "peers" / "llamacpp_peer.py"
LLAMACPP_PYTHON = "/work/llvenv/bin/python"
GGUF_TYPES = {"none": "bf16", "int8": "q8_0", "int4-g128": "q4_K_M"}
PROMPT = "hi there"


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (the next read comes from the disk)."""
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno()) if os.access(path, os.W_OK) else None
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def disk_read_rate(paths: list[Path]) -> float:
    """Bytes per second reading `paths` from the disk (evicted first)."""
    evict(paths)
    total, started = 0, time.perf_counter()
    buffer = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total / (time.perf_counter() - started)


def run(command: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(process.stdout.read()))
    errors: list[bytes] = []
    error_reader = threading.Thread(target=lambda: errors.append(process.stderr.read()))
    reader.start(), error_reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(), error_reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])}... failed: {errors[0].decode()[-600:]}")
    return elapsed, usage.ru_maxrss * 1024, out_chunks[0].decode(errors="replace")


def pss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def total_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal"))


def concurrent_peak_pss(command: list[str], env: dict, copies: int) -> int:
    """The largest sum of PSS seen while `copies` processes of `command` run at once."""
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
                 for _ in range(copies)]
    peak = 0
    while any(p.poll() is None for p in processes):
        peak = max(peak, sum(pss_of(p.pid) for p in processes))
        time.sleep(0.1)
    if any(p.returncode for p in processes):
        raise RuntimeError(f"{' '.join(command[:3])}... failed in a concurrent run")
    return peak


class Ours:
    def __init__(self, model: Path, quant: str, threads: int, mapped: bool = True):
        self.model, self.quant = model, quant
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        mimo = str(Path(sys.executable).with_name("mimo"))
        self.base = [mimo, "run", "-m", str(model), "--temperature", "0", "--no-mtp", "--raw", "--ignore-eos", "--json"]
        if quant != "none":
            self.base += ["--quant", quant]
        if not mapped:
            self.base.append("--no-mmap")
        self.shares_weights = mapped  # two processes map one copy

    def files(self) -> list[Path]:
        return self._mapped()[0]

    def bytes_to_read(self) -> int:
        return self._mapped()[1]  # the byte ranges the load maps

    def _mapped(self) -> tuple[list[Path], int]:
        """The files this load maps (the checkpoint's and its runtime layout) and the bytes it uses."""
        if not hasattr(self, "_mapped_files"):
            quant = None if self.quant == "none" else self.quant
            code = ("import json; from mimo_local.engine import Engine; from mimo_local.offload.plan import PlanRequest; "
                    f"m = Engine.load({str(self.model)!r}, device='cpu', quant={quant!r}, "
                    "placement=PlanRequest(gpu_mem=None, cpu_mem=None, mtp=False)).model; "  # as `mimo run --no-mtp`
                    "print(json.dumps([[str(p) for p in m.mapped_files.paths()], m.mapped_files.used_bytes()]))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=self.env)
            paths, used = json.loads(out.stdout.strip().splitlines()[-1])
            self._mapped_files = ([Path(p) for p in paths], used)
        return self._mapped_files

    def start(self) -> tuple[float, int]:
        elapsed, rss, _ = run(self.base + ["-n", "1", PROMPT], self.env)
        return elapsed, rss

    def kept_starts(self, repeats: int) -> tuple[float, float]:
        """`mimo run --keep-alive`: the call that starts the background server (files warm), and the best
        of `repeats` calls that find it; the server is stopped afterwards."""
        kept = self.base + ["--keep-alive", "10m", "-n", "1", PROMPT]
        env = dict(self.env, MIMO_HOME=tempfile.mkdtemp(prefix="mimo-kept-"))
        try:
            first = run(kept, env)[0]
            return first, min(run(kept, env)[0] for _ in range(repeats))
        finally:
            subprocess.run([str(Path(sys.executable).with_name("mimo")), "stop", "--all"], env=env, check=True,
                           capture_output=True)

    def decode(self, tokens: int) -> float:
        _, _, out = run(self.base + ["-n", str(tokens), PROMPT], self.env)
        return json.loads(out)["decode_tokens_per_s"]

    def decode_command(self, tokens: int) -> list[str]:
        return self.base + ["-n", str(tokens), PROMPT]


class LlamaCpp:
    def __init__(self, model: Path, quant: str, threads: int, binaries: Path, python: str):
        self.threads, self.binaries = threads, binaries
        self.env = dict(os.environ)
        self.shares_weights = True  # llama.cpp maps its GGUF
        result = subprocess.run([python, str(PEER), "--checkpoint", str(model), "--outtype", GGUF_TYPES[quant],
                                 "--prompt-tokens", "1", "--gen-tokens", "1", "--repeats", "1",
                                 "--threads", str(threads)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"llama.cpp conversion failed: {result.stderr.strip()[-400:]}")
        self.gguf = Path(json.loads(result.stdout.strip().splitlines()[-1])["gguf"])

    def files(self) -> list[Path]:
        return [self.gguf]

    def bytes_to_read(self) -> int:
        return self.gguf.stat().st_size

    def decode_command(self, tokens: int) -> list[str]:
        return [str(self.binaries / "llama-completion"), "-m", str(self.gguf), "-t", str(self.threads), "-n", str(tokens),
                "-p", PROMPT, "-no-cnv", "--temp", "0", "--ignore-eos", "-c", "512"]

    def start(self) -> tuple[float, int]:
        elapsed, rss, _ = run(self.decode_command(1), self.env)
        return elapsed, rss

    def decode(self, tokens: int) -> float:
        _, _, out = run([str(self.binaries / "llama-bench"), "-m", str(self.gguf), "-t", str(self.threads), "-p", "0",
                         "-n", str(tokens), "-r", "2", "-o", "json"], self.env)
        return json.loads(out)[0]["avg_ts"]


def measure(engine, repeats: int, gen_tokens: int, first_start: bool) -> dict:
    row = {}
    if first_start:
        row["first_start_s"] = round(engine.start()[0], 2)
    # The disk's rate drifts (a shared virtual disk: 1.2-2.4 GiB/s within minutes): measured on the
    # engine's own files right before its cold start.
    rate = disk_read_rate(engine.files())
    row["disk_gib_s"] = round(rate / 2**30, 2)
    row["read_at_disk_rate_s"] = round(engine.bytes_to_read() / rate, 2)
    evict(engine.files())
    row["cold_start_s"] = round(engine.start()[0], 2)
    warm = [engine.start() for _ in range(repeats)]
    row["warm_start_s"] = round(min(w[0] for w in warm), 2)
    row["peak_rss_gib"] = round(max(w[1] for w in warm) / 2**30, 2)
    row["one_process_pss_gib"] = round(concurrent_peak_pss(engine.decode_command(gen_tokens), engine.env, 1) / 2**30, 2)
    if engine.shares_weights or 2 * row["one_process_pss_gib"] * 2**30 < 0.9 * total_memory():
        row["two_process_pss_gib"] = round(concurrent_peak_pss(engine.decode_command(gen_tokens), engine.env, 2) / 2**30, 2)
    else:  # two private copies cannot fit: that is the figure
        row["two_process_pss_gib"] = "does not fit"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--quants", default="none,int8,int4-g128")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--decode-rounds", type=int, default=3, help="decode runs per engine, taking turns; best kept")
    parser.add_argument("--llamacpp-bin", type=Path, help="folder with llama-completion and llama-bench (no peer without it)")
    parser.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON, help="interpreter that runs the GGUF converter")
    parser.add_argument("--fresh", action="store_true", help="delete the runtime layouts first (measure the first start)")
    parser.add_argument("--copied", action="store_true", help="also measure ours with --no-mmap (weights copied)")
    parser.add_argument("--keep-alive", action="store_true", help="also measure ours with `mimo run --keep-alive`: "
                        "the call that starts its server and the calls that find it")
    args = parser.parse_args()

    rows = []
    for quant in args.quants.split(","):
        if args.fresh:
            for layout in (args.model / ".mimo-runtime").glob("*.safetensors"):
                layout.unlink()
        ours = Ours(args.model, quant, args.threads)
        row = {"engine": "mimo-local", "load": quant, "threads": args.threads,
               **measure(ours, args.repeats, args.gen_tokens, first_start=True)}
        if args.keep_alive:
            row["kept_first_start_s"], row["kept_warm_start_s"] = (round(t, 2) for t in ours.kept_starts(args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.copied:
            copied = Ours(args.model, quant, args.threads, mapped=False)
            row = {"engine": "mimo-local --no-mmap", "load": quant, "threads": args.threads,
                   **measure(copied, args.repeats, args.gen_tokens, first_start=False)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        engines = [(ours, next(r for r in rows if r["engine"] == "mimo-local" and r["load"] == quant))]
        if args.copied:
            engines.append((copied, rows[-1]))
        if args.llamacpp_bin:
            peer = LlamaCpp(args.model, quant, args.threads, args.llamacpp_bin, args.llamacpp_python)
            row = {"engine": "llama.cpp", "load": GGUF_TYPES[quant], "threads": args.threads,
                   **measure(peer, args.repeats, args.gen_tokens, first_start=False)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            engines.append((peer, row))
        # Decode last, the engines taking turns (memory bandwidth drifts over minutes): best of each.
        for _ in range(args.decode_rounds):
            for engine, row in engines:
                row["decode_tok_s"] = max(row.get("decode_tok_s", 0), round(engine.decode(args.gen_tokens), 2))
        for _, row in engines:
            print(json.dumps({"engine": row["engine"], "load": row["load"], "decode_tok_s": row["decode_tok_s"]}),
                  flush=True)
    keys = list(dict.fromkeys(key for row in rows for key in row if key not in ("engine", "load", "threads")))
    print("\n| engine | load | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['engine']} | {row['load']} | " + " | ".join(str(row.get(key, "")) for key in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
