"""The server's generation worker: one thread owns the model and runs the one generator for one
request at a time; requests wait in a bounded queue. Token events cross to the event loop through
an asyncio queue per request. The KV cache stays between requests, so a request that starts with
the same tokens as the previous one (an agent resending its system prompt and tools, a chat
sending its history again) prefills only what is new."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from ..chat.session import REWIND_SLOTS, common_prefix_length
from ..errors import MimoError
from ..generate import DoneEvent, TokenEvent
from ..sampling import SamplingSettings

log = logging.getLogger("mimo.serve")


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

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class GenerationWorker:
    def __init__(self, engine, context: int, max_queue: int, speculation: dict, on_done=None):
        self.engine, self.context, self.max_queue, self.speculation = engine, context, max_queue, speculation
        self.on_done = on_done  # called in the worker thread with (job, stats) after each generation
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # queued, not yet started
        self.busy = False
        self.cache = None
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mimo-generate", daemon=True)
        self.thread.start()

    @property
    def kv_tokens_used(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting >= self.max_queue + (0 if self.busy else 1):
                raise QueueFull()
            self.waiting += 1
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.busy = True
            try:
                self._generate(job)
            finally:
                with self._lock:
                    self.busy = False

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        request = job.request
        events = None
        try:
            speculation = self.speculation
            if request.constraint is not None or request.logprobs is not None:
                speculation = {"draft_tokens": 0}
            job.cached_tokens = self._reuse_cache(request.prompt_ids, speculation["draft_tokens"])
            events = self.engine.stream(request.prompt_ids[job.cached_tokens :], request.settings, cache=self.cache,
                                        constraint=request.constraint, logprobs=request.logprobs,
                                        eos_ids=() if request.ignore_eos else None, **speculation)
            for event in events:
                if job.cancelled.is_set():
                    return
                if isinstance(event, DoneEvent) and self.on_done is not None:
                    self.on_done(job, event.stats)
                job.put(event)
        except MimoError as error:
            job.put(Failed(error))
        except Exception as error:  # a bug or an out-of-memory: the request fails, the server goes on
            log.exception("generation failed")
            job.put(Failed(error))
        finally:
            if events is not None:
                events.close()

    def _reuse_cache(self, prompt_ids: list[int], draft_tokens: int) -> int:
        """Rewind the cache to the longest prefix it holds of `prompt_ids`; returns its length."""
        if self.cache is None:
            self.cache = self.engine.model.new_cache(self.context, spare_slots=max(REWIND_SLOTS, draft_tokens + 2))
        held = self.cache.token_ids[: self.cache.length].tolist()
        # The last prompt token is always fed again: its logits pick the first answer token.
        reused = min(common_prefix_length(held, prompt_ids), len(prompt_ids) - 1)
        if not self.cache.can_truncate(reused) or (draft_tokens and self.cache.drafter is None):
            reused = 0  # (MTP drafts need the hidden states of every position it holds)
        self.cache.truncate(reused)
        return reused
