"""The server's generation worker: one thread owns the model and decodes the running requests
together (generate.Batch); the others wait in a bounded queue. Token events cross to the event loop
through an asyncio queue per request. Each slot's KV cache stays after its request, and a new
request takes the free slot holding the longest prefix of its prompt, so an agent resending its
system prompt and tools, or a chat sending its history again, prefills only what is new."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..budget import spare_slots
from ..errors import MimoError
from ..generate import Batch, DoneEvent, Generation
from ..sampling import SamplingSettings
from ..speculative import SpeculationSwitch
from .prompt_cache import PromptCache, worth_saving

log = logging.getLogger("mimo.serve")

# Clients that fan out (a chat asking for its title, an agent's sub-agents, a script) send their
# requests within a few milliseconds; the event loop takes that long to parse and tokenize each.
GATHER_SECONDS = 0.005
GATHER_LIMIT_SECONDS = 0.05


class QueueFull(Exception):
    pass


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    settings: SamplingSettings
    constraint: object | None = None  # a GrammarConstraint
    logprobs: int | None = None  # alternatives per token; None: no log probabilities
    ignore_eos: bool = False  # go on past end-of-text up to max_tokens (benchmarks, tests)


@dataclass
class Failed:
    error: Exception


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens found in the KV cache (not prefilled again)
    restored_tokens: int = 0  # those of them restored from the host-memory prompt cache

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def hand_over(handed: list[tuple[Job, list]]) -> None:
    """Queue each job's events, in order, with one wake-up of each event loop for all of them: a
    step's tokens cross to the loop together, not a thread-safe call (a pipe write) per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list]]] = {}
    for job, events in handed:
        by_loop.setdefault(job.loop, []).append((job, events))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_queue_all, items)


def _queue_all(items: list[tuple[Job, list]]) -> None:
    for job, events in items:
        for event in events:
            job.events.put_nowait(event)


@dataclass
class Slot:
    """A sequence's place in the batch: its KV cache, kept after the request for the next one."""

    cache: object = None
    job: Job | None = None


class GenerationWorker:
    """`parallel` slots: up to that many requests are decoded together, one forward per step
    (continuous batching: a request joins after its prefill and leaves when it ends, is cancelled
    or its client goes away); the others wait in the queue. `prompt_cache`: where a slot's KV goes
    before a new request overwrites most of it (None: nowhere)."""

    def __init__(self, engine, context: int, max_queue: int, speculation: dict, parallel: int = 1, on_done=None,
                 prompt_cache: PromptCache | None = None):
        self.engine, self.context, self.max_queue, self.speculation = engine, context, max_queue, speculation
        self.prompt_cache = prompt_cache
        self.on_done = on_done  # called in the worker thread with (job, stats) after each generation
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # queued, not yet started
        self.slots = [Slot() for _ in range(parallel)]
        self.batch = Batch(SpeculationSwitch())  # MTP drafts in the steps where they pay
        self.running: dict[int, tuple[Generation, Slot]] = {}  # id(generation) -> (generation, slot)
        self._lock = threading.Lock()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="mimo-generate", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return bool(self.running)

    @property
    def slots_in_use(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    @property
    def kv_tokens_used(self) -> int:
        return sum(slot.cache.length for slot in self.slots if slot.cache is not None)

    def submit(self, job: Job) -> None:
        with self._lock:
            free = len(self.slots) - self.slots_in_use
            if self.waiting >= self.max_queue + free:
                raise QueueFull()
            self.waiting += 1
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping:
            self._admit(block=not self.running)
            if self.running:
                self._step()

    def _admit(self, block: bool) -> None:
        """Start queued requests while slots are free. When nothing runs: wait for one, then for
        those that follow it closely (GATHER_SECONDS apart, GATHER_LIMIT_SECONDS in all), so that
        requests sent together are prefilled together instead of the first one alone."""
        gather_until = None
        while any(slot.job is None for slot in self.slots):
            try:
                if block:
                    job = self.jobs.get()
                    gather_until = time.monotonic() + GATHER_LIMIT_SECONDS
                elif gather_until is not None:
                    job = self.jobs.get(timeout=max(0.0, min(GATHER_SECONDS, gather_until - time.monotonic())))
                else:
                    job = self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                self._stopping = True
                return
            with self._lock:
                self.waiting -= 1
            if not job.cancelled.is_set():
                self._start(job)

    def _start(self, job: Job) -> None:
        request = job.request
        speculation = self.speculation
        if request.constraint is not None or request.logprobs is not None:
            speculation = {"draft_tokens": 0}
        slot = self._slot_for(request.prompt_ids, speculation["draft_tokens"])
        self._reuse(slot.cache, job, needs_drafter=bool(speculation["draft_tokens"]))
        try:
            generation = Generation(self.engine.model, self.engine.tokenizer, request.prompt_ids[job.cached_tokens :],
                                    request.settings, cache=slot.cache, constraint=request.constraint,
                                    logprobs=request.logprobs, eos_ids=() if request.ignore_eos else None,
                                    **speculation)
            slot.job = job
            self.running[id(generation)] = (generation, slot)
            self.batch.join(generation)
        except Exception as error:  # noqa: BLE001 - the request fails, the server goes on
            self._fail([job], error)
            slot.job = None

    def _step(self) -> None:
        for generation, slot in list(self.running.values()):
            if slot.job.cancelled.is_set():
                self.batch.leave(generation)
                self._forget(generation)
        if not self.batch.generations:
            return
        try:
            results = self.batch.step()
        except Exception as error:  # noqa: BLE001 - the batch's requests fail, the server goes on
            failed = self.batch.generations
            self._fail([self.running[id(g)][1].job for g in failed], error)
            for generation in failed:
                self.batch.leave(generation)
                self._forget(generation)
            return
        hand_over([self._deliver(generation, events) for generation, events in results])

    def _deliver(self, generation: Generation, events: list) -> tuple[Job, list]:
        """The job of a generation and its events; a generation that ended leaves its slot."""
        job = self.running[id(generation)][1].job
        if events and isinstance(events[-1], DoneEvent):
            if self.on_done is not None:
                self.on_done(job, events[-1].stats)
            self._forget(generation)
        return job, events

    def _forget(self, generation: Generation) -> None:
        _, slot = self.running.pop(id(generation))
        slot.job = None

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        if not isinstance(error, MimoError):
            log.error("generation failed: %s: %s", type(error).__name__, error)
        for job in jobs:
            job.put(Failed(error))

    def _reuse(self, cache, job: Job, needs_drafter: bool) -> None:
        """Rewind a slot's cache to the longest prefix of the job's prompt it holds, or restore a
        longer one from the prompt cache; a slot about to lose most of what it holds is saved to
        the prompt cache first."""
        prompt_ids = job.request.prompt_ids
        kept = cache.reusable_prefix(prompt_ids, needs_drafter)
        entry, restorable = (None, 0) if self.prompt_cache is None else self.prompt_cache.best(prompt_ids, needs_drafter)
        restoring = restorable > kept
        if self.prompt_cache is not None and worth_saving(cache.length, 0 if restoring else kept):
            self.prompt_cache.save(cache)
        if restoring:
            cache.restore(entry, restorable)
            job.cached_tokens = job.restored_tokens = restorable
        else:
            cache.truncate(kept)
            job.cached_tokens = kept

    def _slot_for(self, prompt_ids: list[int], draft_tokens: int) -> Slot:
        """The free slot whose cache holds the longest prefix of the prompt (a fresh one otherwise)."""
        free = [slot for slot in self.slots if slot.job is None]
        held = [(slot.cache.held_prefix(prompt_ids) if slot.cache is not None else -1, index)
                for index, slot in enumerate(free)]
        slot = free[max(held)[1]]
        if slot.cache is None:
            slot.cache = self.engine.model.new_cache(self.context, spare_slots=spare_slots(draft_tokens, rewind=True))
        return slot
