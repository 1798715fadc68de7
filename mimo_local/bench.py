"""`mimo bench`: a model's prompt-processing and generation speed as llama-bench reports them:
pp N (an N-token prompt) and tg N (N generated tokens, greedy, end-of-text ignored, after that
prompt), each over several runs after a warm-up, as mean and standard deviation."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .engine import Engine
from .errors import MimoError
from .generate import DoneEvent
from .sampling import SamplingSettings


UNRELIABLE_SPREAD = 0.1  # a standard deviation over 10% of the mean


@dataclass
class BenchResult:
    test: str  # "pp512", "tg128"
    tokens_per_s: list[float] = field(default_factory=list)
    mean_accepted_length: float | None = None  # tg with MTP

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tokens_per_s)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0

    @property
    def unreliable(self) -> bool:
        """Runs that disagree this much say more about what else the machine was doing than about the model."""
        return self.stdev > UNRELIABLE_SPREAD * self.mean

    def as_dict(self) -> dict:
        out = {"test": self.test, "tokens_per_s": round(self.mean, 2), "stdev": round(self.stdev, 2),
               "runs": [round(value, 2) for value in self.tokens_per_s], "unreliable": self.unreliable}
        if self.mean_accepted_length is not None:
            out["mean_accepted_length"] = round(self.mean_accepted_length, 3)
        return out


def bench_prompt(vocab_size: int, length: int) -> list[int]:
    """Fixed token ids spread over the vocabulary (what the prompt says does not change the speed)."""
    return [(i * 7919 + 101) % vocab_size for i in range(length)]


def check_counts(prompt_tokens: int, gen_tokens: int, repetitions: int) -> None:
    if prompt_tokens < 1 or gen_tokens < 1 or repetitions < 1:
        raise MimoError("--prompt-tokens, --gen-tokens and --repetitions must be >= 1")


def measure(engine: Engine, prompt_tokens: int, gen_tokens: int, repetitions: int, speculation: dict,
            on_run=lambda: None) -> list[BenchResult]:
    """One warm-up run, then `repetitions` timed ones; `on_run` is called after each run."""
    check_counts(prompt_tokens, gen_tokens, repetitions)
    needed = prompt_tokens + gen_tokens + speculation.get("draft_tokens", 0) + 1
    if needed > engine.model.config.max_position_embeddings:
        raise MimoError(f"pp{prompt_tokens} + tg{gen_tokens} need a context of {needed} tokens; "
                        f"{engine.path.name} holds {engine.model.config.max_position_embeddings}")
    ids = bench_prompt(engine.model.config.vocab_size, prompt_tokens)
    prefill, decode = BenchResult(f"pp{prompt_tokens}"), BenchResult(f"tg{gen_tokens}")
    accepted = []
    for run in range(repetitions + 1):
        settings = SamplingSettings(temperature=0, max_tokens=gen_tokens)
        stats = next(e.stats for e in engine.stream(ids, settings, eos_ids=(), **speculation) if isinstance(e, DoneEvent))
        on_run()
        if run == 0:
            continue
        prefill.tokens_per_s.append(stats.prefill_tokens_per_s)
        decode.tokens_per_s.append(stats.decode_tokens_per_s)
        if stats.speculation:
            accepted.append(stats.speculation.mean_accepted_length)
    if accepted:
        decode.mean_accepted_length = statistics.fmean(accepted)
    return [prefill, decode]


def weight_bytes_by_device(engine: Engine) -> dict[str, int]:
    """Bytes of parameters and buffers on each device: where the placement put the model."""
    tensors = {t.data_ptr(): t for t in [*engine.model.parameters(), *engine.model.buffers()] if t.device.type != "meta"}
    out: dict[str, int] = {}
    for tensor in tensors.values():
        out[str(tensor.device)] = out.get(str(tensor.device), 0) + tensor.nbytes
    return out


def backend(engine: Engine) -> str:
    """What computes: the device, and on the CPU which kernels and how many threads."""
    import torch

    from .kernels import cpu

    device = engine.model.device
    if device.type != "cpu":
        return str(device)
    isa = cpu.active_isa()
    kernels = "torch ops" if isa == "torch" else f"{isa} kernels"
    return f"cpu, {kernels}, {torch.get_num_threads()} threads"
