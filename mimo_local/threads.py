"""How many threads a CPU decode step uses, decided by measurement.

A decode step is a chain of short parallel regions, each ending in a barrier. When another program
takes a core, one of our threads waits in the run queue and every barrier waits for it: two threads
on two cores with one of them shared run slower than one thread on the free core (measured: a 7B
shape fell to 0.27x of its idle speed with one `yes` running). So the step's thread count is not
fixed: `ThreadTuner` times the steps, tries a neighbouring thread count now and then, and keeps
the fastest (a try's best step against the median of the chosen count's latest steps, so that one
noisy step, e.g. a server's event loop or a client on the same cores, does not move the choice).
It tries at once when steps suddenly slow down (a program started) and, while its choice keeps
winning, less and less often (a try costs a few steps at the slower count).
Prefill and everything outside decode steps run with all threads."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class ThreadTuner:
    FIRST_TRY_AFTER = 8  # steps at the full count first: a short answer never pays for a try
    RETRY_EVERY = 32  # steps between tries of the neighbouring thread counts, doubled while the choice keeps winning
    MOST_PATIENT = 512
    SLOWER = 1.5  # two steps in a row this much slower than the average try the neighbours at once
    SMOOTHING = 0.3
    TRY_STEPS = 3  # steps of a try: the first warms the new count up, the best of the others counts
    RECENT = 3  # the chosen count's latest steps, whose median a try is held against
    MARGIN = 0.9  # a neighbour wins when its best step takes under this share of the chosen count's median

    def __init__(self, most: int):
        self.most = most
        self.threads = most  # the choice for steps that are not tries
        self.seconds: dict[tuple[int, int], float] = {}  # (rows, threads) -> moving average of a step's seconds
        self._recent: dict[int, list[float]] = {}  # rows -> the chosen count's latest step seconds
        self._trial: list[int] = []  # thread counts of the coming trial steps
        self._tried: dict[int, list[float]] = {}  # thread count -> the timed seconds of this try
        self._patience = self.RETRY_EVERY
        self._since_trial = 0
        self._slow_steps = 0
        self._previous = most  # the count of the step before (a try's first step at a new count is not timed)

    @contextmanager
    def step(self, rows: int):
        """Run one decode step of `rows` token rows with the chosen (or tried) thread count, at most
        the threads set when the step starts (restored after it)."""
        most = torch.get_num_threads()
        if most != self.most:  # the thread setting changed: start over
            self.__init__(most)
        if most < 2:
            yield
            return
        threads = self._trial.pop(0) if self._trial else self.threads
        warming = threads != self._previous
        self._previous = threads
        torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            torch.set_num_threads(self.most)
        self._record(rows, threads, seconds, warming)

    def _record(self, rows: int, threads: int, seconds: float, warming: bool) -> None:
        key = (rows, threads)
        average = self.seconds.get(key)
        if threads != self.threads:  # a try
            if not warming:
                self._tried.setdefault(threads, []).append(seconds)
                self.seconds[key] = min(self._tried[threads])
            if not self._trial:
                self._decide(rows)
            return
        self.seconds[key] = seconds if average is None else average + self.SMOOTHING * (seconds - average)
        recent = self._recent.setdefault(rows, [])
        recent[:] = (recent + [seconds])[-self.RECENT :]
        self._slow_steps = self._slow_steps + 1 if average is not None and seconds > self.SLOWER * average else 0
        self._since_trial += 1
        untried = any((rows, n) not in self.seconds for n in self._neighbours())
        first_try = untried and self._since_trial >= self.FIRST_TRY_AFTER
        if first_try or self._slow_steps >= 2 or self._since_trial >= self._patience:
            for n in self._neighbours():
                self._trial += [n] * self.TRY_STEPS
            self._tried = {}
            self._since_trial = self._slow_steps = 0

    def _decide(self, rows: int) -> None:
        """After a try: the fastest neighbour takes over if it beat the chosen count's recent median
        by the margin (one noisy step does not move the choice)."""
        recent = sorted(self._recent.get(rows, []))
        if not recent or not self._tried:
            return
        current = recent[len(recent) // 2]
        best, best_seconds = min(((n, min(times)) for n, times in self._tried.items()), key=lambda pair: pair[1])
        if best_seconds < self.MARGIN * current:
            self.threads, self._patience = best, self.RETRY_EVERY
            self._recent = {}
        else:
            self._patience = min(2 * self._patience, self.MOST_PATIENT)

    def _neighbours(self) -> list[int]:
        return [n for n in (self.threads - 1, self.threads + 1) if 1 <= n <= self.most]


def tuner_for(model) -> ThreadTuner | None:
    """The model's tuner (one per loaded model); None for a model on a GPU."""
    if model.device.type != "cpu":
        return None
    if getattr(model, "_thread_tuner", None) is None:
        model._thread_tuner = ThreadTuner(torch.get_num_threads())
    return model._thread_tuner
