"""Whether torch's own op beats a C kernel for a matmul shape on this machine, so the C path is
never the slower one.

Measured once per (op, shape class, threads, kernel build) on the first call that meets it and kept
on disk next to the compiled kernels (per CPU), so later processes reuse the decision. It depends
on the weight's shape only, never on how many tokens a call has: a token gets the same arithmetic
alone (decode) and inside an MTP verify step. Matmuls under MIN_WEIGHTS weights are never measured
(call overhead decides them, and the C kernels have less of it). MIMO_CPU_MATMUL=kernels|torch pins
every shape to one side (no measurement); the default is `measure`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mimo_local.errors import MimoError

from . import build

MIN_WEIGHTS = 1 << 20
MARGIN = 0.9  # torch's op must take under 90% of the kernel's time: noise does not flip a tie
MIN_ROUNDS, MAX_ROUNDS, MIN_SECONDS = 5, 50, 0.25
MODES = ("measure", "kernels", "torch")

Contenders = Callable[[], tuple[Callable[[], object], Callable[[], object]]]


def mode() -> str:
    value = os.environ.get("MIMO_CPU_MATMUL", "measure").strip() or "measure"
    if value not in MODES:
        raise MimoError(f"MIMO_CPU_MATMUL must be one of {', '.join(MODES)} (got {value!r})")
    return value


def shape_class(out_features: int, in_features: int) -> str:
    """Output features rounded up to a power of two (a draft vocabulary's row count varies)."""
    return f"{1 << max(out_features - 1, 0).bit_length()}x{in_features}"


def decisions_path() -> Path:
    machine = hashlib.sha256((" ".join(sorted(build.cpu_flags())) + platform.machine()).encode()).hexdigest()[:12]
    return build.cache_dir() / f"matmul-choices-{machine}.json"


def _read(path: Path) -> dict[str, bool]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, bool)} if isinstance(data, dict) else {}


def _write(path: Path, new: dict[str, bool]) -> None:
    """Merge `new` into the file (others may have added keys meanwhile), atomically."""
    merged = {**_read(path), **new}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(merged, handle, indent=0, sort_keys=True)
    os.replace(handle.name, path)


@functools.lru_cache(maxsize=1)
def _decisions() -> dict[str, bool]:
    return _read(decisions_path())


def _seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(ours: Callable[[], object], theirs: Callable[[], object]) -> bool:
    """Whether `theirs` is clearly faster. Both warmed, then interleaved timings: at least
    MIN_ROUNDS, and on until each side has run MIN_SECONDS (a shared machine preempts a run now
    and then; up to MAX_ROUNDS). Torch wins on its best time under MARGIN of ours and a lower median."""
    ours(), theirs()
    mine: list[float] = []
    torch_times: list[float] = []
    while len(mine) < MAX_ROUNDS and (len(mine) < MIN_ROUNDS or min(sum(mine), sum(torch_times)) < MIN_SECONDS):
        mine.append(_seconds(ours))
        torch_times.append(_seconds(theirs))
    return min(torch_times) < MARGIN * min(mine) and statistics.median(torch_times) < statistics.median(mine)


def prefers_torch(op: str, out_features: int, in_features: int, build_name: str, contenders: Contenders) -> bool:
    """Whether `op` on a weight [out_features, in_features] should run torch's op instead of the C
    kernel. `contenders()` gives (ours, theirs), one-token calls on that weight, for a measurement.
    `build_name` names the kernel build and torch version (a changed kernel is measured again)."""
    chosen = mode()
    if chosen != "measure":
        return chosen == "torch"
    if out_features * in_features < MIN_WEIGHTS:
        return False
    key = f"{op}:{shape_class(out_features, in_features)}:threads{torch.get_num_threads()}:{build_name}"
    decisions = _decisions()
    if key not in decisions:
        decisions[key] = measure(*contenders())
        _write(decisions_path(), {key: decisions[key]})
    return decisions[key]
