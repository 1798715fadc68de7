"""How many threads a CPU decode step uses, decided by measurement.

A decode step is a chain of short parallel regions, each ending in a barrier. When another program
takes a core, one of our threads waits in the run queue and every barrier waits for it: two threads
on two cores with one of them shared run slower than one thread on the free core (measured: a 7B
shape fell to 0.27x of its idle speed with one `yes` running). So the step's thread count is not
fixed: `ThreadTuner` times the steps, tries a neighbouring thread count now and then, and keeps
the fastest. It tries at once when steps suddenly slow down (a program started) and, while its
choice keeps winning, less and less often (a try costs a step or two at the slower count).
Prefill and everything outside decode steps run with all threads."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class ThreadTuner:
    FIRST_TRY_AFTER = 8  # steps at the full count first: a short answer never pays for a try
    RETRY_EVERY = 32  # steps between tries of the neighbouring thread counts, doubled while the choice keeps winning
    MOST_PATIENT = 512
    SLOWER = 1.3  # two steps in a row this much slower than the average try the neighbours at once
    SMOOTHING = 0.3

    def __init__(self, most: int):
        self.most = most
        self.threads = most  # the choice for steps that are not tries
        self.seconds: dict[tuple[int, int], float] = {}  # (rows, threads) -> moving average of a step's seconds
        self._trial: list[int] = []  # thread counts of the coming trial steps; the last of each count is timed
        self._patience = self.RETRY_EVERY
        self._since_trial = 0
        self._slow_steps = 0

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
        timed = not self._trial or self._trial[0] != threads  # a count's first trial step warms it up
        torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            torch.set_num_threads(self.most)
        if timed:
            self._record(rows, threads, seconds)

    def _record(self, rows: int, threads: int, seconds: float) -> None:
        key = (rows, threads)
        average = self.seconds.get(key)
        tried = threads != self.threads
        if average is None or tried:
            self.seconds[key] = seconds  # a try replaces what may be an old figure
        else:
            self.seconds[key] = average + self.SMOOTHING * (seconds - average)
        if self._trial:
            return
        if tried:
            self._decide(rows)
            return
        self._slow_steps = self._slow_steps + 1 if average is not None and seconds > self.SLOWER * average else 0
        if self._slow_steps >= 2:
            self.seconds[key] = seconds  # the new level, for the comparison with the tries
        self._since_trial += 1
        untried = any((rows, n) not in self.seconds for n in self._neighbours())
        first_try = untried and self._since_trial >= self.FIRST_TRY_AFTER
        if first_try or self._slow_steps >= 2 or self._since_trial >= self._patience:
            for n in self._neighbours():
                self._trial += [n, n]
            self._since_trial = self._slow_steps = 0

    def _decide(self, rows: int) -> None:
        candidates = [n for n in [self.threads, *self._neighbours()] if (rows, n) in self.seconds]
        best = min(candidates, key=lambda n: self.seconds[(rows, n)])
        if best == self.threads:
            self._patience = min(2 * self._patience, self.MOST_PATIENT)
        else:
            self.threads, self._patience = best, self.RETRY_EVERY

    def _neighbours(self) -> list[int]:
        return [n for n in (self.threads - 1, self.threads + 1) if 1 <= n <= self.most]


def tuner_for(model) -> ThreadTuner | None:
    """The model's tuner (one per loaded model); None for a model on a GPU."""
    if model.device.type != "cpu":
        return None
    if getattr(model, "_thread_tuner", None) is None:
        model._thread_tuner = ThreadTuner(torch.get_num_threads())
    return model._thread_tuner
