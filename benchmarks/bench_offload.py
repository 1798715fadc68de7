"""Decode speed vs the fraction of routed experts on the GPU (the offload curve), V2-shape bench
checkpoint. With CUDA: for each fraction the GPU budget is set to the plan's non-expert bytes plus
that fraction of the expert bytes, the model is loaded as planned (GPU experts computed on the GPU,
CPU experts on the CPU), and decode tok/s and peak GPU memory (vs the plan) are measured.
Without CUDA: everything is on the CPU; the rows compare one expert group per layer with the same
experts split into two groups (the CPU/GPU split's code path: routing bookkeeping, per-group
gather and sum), i.e. what the split costs before any GPU is involved.

    python benchmarks/bench_offload.py [--fractions 0,0.25,0.5,0.75,1] [--tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from bench_decode import checkpoint_for, prompt
from mimo_local.generate import stream
from mimo_local.loader import load_model
from mimo_local.models.layers import MoE
from mimo_local.offload.placement import Placement
from mimo_local.offload.plan import PlanRequest, make_plan
from mimo_local.sampling import SamplingSettings
from mimo_local.tokenizer import ChatTokenizer


class HalfAndHalfOnCpu(Placement):
    """Two expert groups per MoE layer, both on the CPU (even experts, odd experts)."""

    def split_experts(self, model):
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.place([e % 2 for e in range(layer.mlp.spec.num_experts)])


def decode_speed(model, path, tokens: int, repeats: int) -> float:
    tokenizer = ChatTokenizer(path)
    settings = SamplingSettings(temperature=0, max_tokens=tokens)
    best = 0.0
    for _ in range(repeats + 1):  # the first run warms up
        stats = list(stream(model, tokenizer, prompt(128), settings, eos_ids=()))[-1].stats
        best = max(best, stats.decode_tokens_per_s)
    return best


def gpu_curve(path, fractions, dtype, tokens, repeats):
    everything_cpu = make_plan(path, PlanRequest(gpu_mem=1 << 50, cpu_mem=1 << 50, ctx=512, dtype=dtype, mtp=False,
                                                 cpu_moe=True))
    expert_bytes = everything_cpu.weights["cpu"]["experts"]
    rows = []
    for fraction in fractions:
        budget = everything_cpu.used("gpu") + int(fraction * expert_bytes) + 1
        plan = make_plan(path, PlanRequest(gpu_mem=budget, cpu_mem=1 << 50, ctx=512, dtype=dtype, mtp=False))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = load_model(path, dtype, placement=plan.placement)
        speed = decode_speed(model, path, tokens, repeats)
        peak = torch.cuda.max_memory_allocated()
        rows.append((f"{plan.experts_on_gpu / plan.experts_total:.0%}", f"{speed:.2f}",
                     f"{peak / 2**20:.0f} MiB", f"{plan.used('gpu') / 2**20:.0f} MiB", f"{peak / plan.used('gpu'):.2f}"))
        del model
    return ("experts on GPU", "decode tok/s", "peak GPU", "planned GPU", "peak / plan"), rows


def cpu_rows(path, dtype, tokens, repeats):
    rows = []
    for label, placement in (("one group per layer", None), ("two groups per layer", HalfAndHalfOnCpu(main="cpu"))):
        model = load_model(path, dtype, placement=placement)
        rows.append((label, f"{decode_speed(model, path, tokens, repeats):.2f}"))
        del model
    return ("experts (all on CPU)", "decode tok/s"), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    path = checkpoint_for("v2")
    dtype = getattr(torch, args.dtype)
    started = time.time()
    if torch.cuda.is_available():
        fractions = [float(f) for f in args.fractions.split(",")]
        header, rows = gpu_curve(path, fractions, dtype, args.tokens, args.repeats)
        machine = torch.cuda.get_device_name(0)
    else:
        header, rows = cpu_rows(path, dtype, args.tokens, args.repeats)
        machine = f"{platform.machine()} {torch.get_num_threads()} threads, CPU"
    print(f"{date.today()} | {machine} | V2-shape {args.dtype}, prompt 128, {args.tokens} tokens "
          f"({time.time() - started:.0f} s)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
