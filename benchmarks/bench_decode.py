"""Decode and prefill speed at batch 1: mimo-local vs transformers vs llama.cpp, in one run.

    python benchmarks/bench_decode.py --shape 7b --dtype float32 [--peers transformers,llamacpp]
    python benchmarks/bench_decode.py --shape 7b --dtype bfloat16 --quant int4-g128 --peers llamacpp
    python benchmarks/bench_decode.py --shape 7b --dtype bfloat16 --peers llamacpp --busy 1   # one core taken

With --quant, ours quantizes on load with that recipe and llama.cpp runs the matching GGUF type
(int8 -> q8_0, int4 recipes -> q4_K_M); the unquantized tensors stay in --dtype.

Each engine runs in its own subprocess on the same bench checkpoint (random weights in hub layout,
made once under benchmarks/cache/); the engines take turns for --rounds rounds and each keeps its
best. Prompt: 128 fixed token ids; then --gen-tokens tokens with EOS ignored, greedy or (--temperature,
--top-p) sampled by every engine. Prints a table
and, with --record, appends rows to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
SHAPES = {"7b": ("mimo-bench", "mimo-bench"), "v2": ("mimo_v2_flash-bench", "v2-bench")}
LLAMACPP_TYPES = {"float32": "f32", "bfloat16": "bf16"}
LLAMACPP_QUANT_TYPES = {"int8": "q8_0", "int4-g128": "q4_K_M", "gptq-int4-g128": "q4_K_M", "v2flash-mixed": "q4_K_M"}


def checkpoint_for(shape: str) -> Path:
    preset, name = SHAPES[shape]
    path = CACHE / name
    if not (path / "config.json").exists():
        from mimo_local.dev.tiny import make_checkpoint

        make_checkpoint(path, preset, shards=2)
    return path


def prompt(length: int) -> list[int]:
    return [100 + (i * 7) % 800 for i in range(length)]


def run_ours(path: Path, dtype: str, prompt_tokens: int, gen_tokens: int, repeats: int, quant: str | None = None,
             temperature: float = 0.0, top_p: float = 1.0) -> dict:
    import torch

    from mimo_local.generate import stream
    from mimo_local.loader import load_model
    from mimo_local.sampling import SamplingSettings
    from mimo_local.tokenizer import ChatTokenizer

    model = load_model(path, getattr(torch, dtype), quant=quant)
    tokenizer = ChatTokenizer(path)
    settings = SamplingSettings(temperature=temperature, top_p=top_p, seed=0, max_tokens=gen_tokens)
    best = None
    for _ in range(repeats + 1):  # the first run warms up
        stats = list(stream(model, tokenizer, prompt(prompt_tokens), settings, eos_ids=()))[-1].stats
        if best is None or stats.decode_tokens_per_s > best.decode_tokens_per_s:
            best = stats
    return {
        "prefill_tokens_per_s": best.prefill_tokens_per_s,
        "decode_tokens_per_s": best.decode_tokens_per_s,
    }


def run_transformers(path: Path, dtype: str, prompt_tokens: int, gen_tokens: int, repeats: int, quant=None,
                     temperature: float = 0.0, top_p: float = 1.0) -> dict:
    if quant:
        raise RuntimeError("the transformers peer runs unquantized only (use --peers llamacpp with --quant)")
    import torch
    import transformers

    config = json.loads((path / "config.json").read_text())
    cls = transformers.Qwen2ForCausalLM if config["model_type"] == "mimo" else transformers.MiMoV2FlashForCausalLM
    model = cls.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt(prompt_tokens)])
    best = {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            model(ids, use_cache=True)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature else {}
            model.generate(ids, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                           **(sampling or dict(do_sample=False)))
            total = time.perf_counter() - started
            decode = (gen_tokens - 1) / max(total - prefill, 1e-9)
            best["prefill_tokens_per_s"] = max(best["prefill_tokens_per_s"], prompt_tokens / prefill)
            best["decode_tokens_per_s"] = max(best["decode_tokens_per_s"], decode)
    return best


def run_llamacpp(path: Path, dtype: str, prompt_tokens: int, gen_tokens: int, repeats: int, quant=None,
                 temperature: float = 0.0, top_p: float = 1.0) -> dict:
    python = os.environ.get("LLAMACPP_PYTHON", "/work/llvenv/bin/python")
    command = [python, str(HERE / "peers" / "llamacpp_peer.py"), "--checkpoint", str(path),
               "--outtype", LLAMACPP_QUANT_TYPES[quant] if quant else LLAMACPP_TYPES[dtype], "--prompt-tokens", str(prompt_tokens),
               "--gen-tokens", str(gen_tokens), "--repeats", str(repeats), "--temperature", str(temperature),
               "--top-p", str(top_p)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp peer failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


ENGINES = {"mimo-local": run_ours, "transformers": run_transformers, "llama.cpp": run_llamacpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--peers", default="transformers,llamacpp")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of engines taking turns")
    parser.add_argument("--quant", choices=sorted(LLAMACPP_QUANT_TYPES), help="quantize ours with this recipe")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled (seed 0) by all engines")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--busy", type=int, default=0, help="run this many `yes > /dev/null` processes during the "
                        "measurement (a desktop with other programs on its cores)")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = checkpoint_for(args.shape)

    if args.worker:
        result = ENGINES[args.worker](path, args.dtype, args.prompt_tokens, args.gen_tokens, args.repeats,
                                      quant=args.quant, temperature=args.temperature, top_p=args.top_p)
        print(json.dumps(result))
        return

    engines = ["mimo-local"] + [{"llamacpp": "llama.cpp"}.get(p, p) for p in args.peers.split(",") if p]
    results = {}
    competitors = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    # Engines take turns, round after round, and each keeps its best round: the machine's memory
    # bandwidth drifts over minutes, and turns keep that drift from favouring one engine.
    for _ in range(args.rounds):
        for engine in engines:
            command = [sys.executable, __file__, "--worker", engine, "--shape", args.shape, "--dtype", args.dtype,
                       "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                       "--repeats", str(args.repeats), "--temperature", str(args.temperature), "--top-p",
                       str(args.top_p)] + (["--quant", args.quant] if args.quant else [])
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{engine}: failed: {out.stderr.strip()[-800:]}", file=sys.stderr)
                continue
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            best = results.setdefault(engine, figures)
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                best[key] = max(best[key], figures[key])

    for competitor in competitors:
        competitor.kill()
    from rich.console import Console
    from rich.table import Table

    ours = results.get("mimo-local", {})
    label = f"{args.dtype}" + (f" --quant {args.quant} (llama.cpp {LLAMACPP_QUANT_TYPES[args.quant]})" if args.quant else "")
    if args.temperature:
        label += f", sampled (temperature {args.temperature}, top-p {args.top_p})"
    if args.busy:
        label += f", {args.busy} `yes` process{'es' if args.busy > 1 else ''} running"
    table = Table(title=f"{args.shape}-shape {label}: prompt {args.prompt_tokens}, generate {args.gen_tokens}")
    for column in ("engine", "prefill tok/s", "decode tok/s", "decode: ours / peer", "prefill: ours / peer"):
        table.add_column(column, justify="right")
    rows = []
    for engine, figures in results.items():
        decode_ratio = ours.get("decode_tokens_per_s", 0) / max(figures["decode_tokens_per_s"], 1e-9)
        prefill_ratio = ours.get("prefill_tokens_per_s", 0) / max(figures["prefill_tokens_per_s"], 1e-9)
        table.add_row(engine, f"{figures['prefill_tokens_per_s']:.1f}", f"{figures['decode_tokens_per_s']:.2f}",
                      f"{decode_ratio:.2f}x", f"{prefill_ratio:.2f}x")
        rows.append((engine, figures, decode_ratio, prefill_ratio))
    Console().print(table)

    if args.record:
        command = "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:]).replace("--record", "").strip()
        machine = f"{platform.machine()} {os.cpu_count()} cores, CPU"
        with open(HERE / "RESULTS.md", "a") as handle:
            for engine, figures, decode_ratio, prefill_ratio in rows:
                if engine == "mimo-local":
                    continue
                handle.write(
                    f"| {date.today()} | {machine} | `{command}` | {args.shape} {label} | "
                    f"{ours['decode_tokens_per_s']:.2f} / {ours['prefill_tokens_per_s']:.1f} | {engine} "
                    f"{figures['decode_tokens_per_s']:.2f} / {figures['prefill_tokens_per_s']:.1f} | "
                    f"{decode_ratio:.2f}x / {prefill_ratio:.2f}x |\n"
                )


if __name__ == "__main__":
    main()
