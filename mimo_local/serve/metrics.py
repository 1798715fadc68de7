"""Prometheus metrics of the server (prometheus_client, one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class ServerMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("mimo_requests", "HTTP requests served", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("mimo_prompt_tokens", "Prompt tokens of finished generations", registry=registry)
        self.cached_prompt_tokens = Counter("mimo_cached_prompt_tokens", "Prompt tokens reused from the KV cache",
                                            registry=registry)
        self.generated_tokens = Counter("mimo_generated_tokens", "Tokens generated", registry=registry)
        self.prefill_speed = Gauge("mimo_prefill_tokens_per_second", "Prefill speed of the last request",
                                   registry=registry)
        self.decode_speed = Gauge("mimo_decode_tokens_per_second", "Decode speed of the last request",
                                  registry=registry)
        self.queue_length = Gauge("mimo_queue_length", "Requests waiting for the model", registry=registry)
        self.in_progress = Gauge("mimo_requests_in_progress", "Generation requests being answered", registry=registry)
        self.slots = Gauge("mimo_slots", "Requests decoded together at most (--parallel)", registry=registry)
        self.slots_in_use = Gauge("mimo_slots_in_use", "Requests being decoded now", registry=registry)
        self.kv_used = Gauge("mimo_kv_cache_tokens", "Positions held in the KV caches of all slots", registry=registry)
        self.kv_capacity = Gauge("mimo_kv_cache_capacity_tokens", "Positions one slot's KV cache holds at most (--ctx)",
                                 registry=registry)
        self.restored_prompt_tokens = Counter("mimo_prompt_cache_tokens",
                                              "Prompt tokens restored from the host-memory prompt cache (--cache-ram)",
                                              registry=registry)
        self.prompt_cache_evictions = Counter("mimo_prompt_cache_evictions",
                                              "Prompt cache entries dropped to stay within --cache-ram", registry=registry)
        self.prompt_cache_bytes = Gauge("mimo_prompt_cache_bytes", "Bytes held by the prompt cache", registry=registry)
        self.prompt_cache_entries = Gauge("mimo_prompt_cache_entries", "KV prefixes held by the prompt cache",
                                          registry=registry)
        self.prompt_cache_capacity = Gauge("mimo_prompt_cache_capacity_bytes", "Bytes the prompt cache may hold "
                                           "(--cache-ram)", registry=registry)

    def observe(self, worker) -> None:
        """The worker's state now: queue, slots and KV positions in use."""
        self.queue_length.set(worker.waiting)
        self.slots_in_use.set(worker.slots_in_use)
        self.kv_used.set(worker.kv_tokens_used)
        if worker.prompt_cache is not None:
            self.prompt_cache_bytes.set(worker.prompt_cache.nbytes)
            self.prompt_cache_entries.set(len(worker.prompt_cache.entries))

    def render(self) -> bytes:
        return generate_latest(self.registry)
