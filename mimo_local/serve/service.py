"""What both HTTP APIs share: the loaded model, the worker, the metrics, and turning a request
(messages or a raw prompt, sampling, tools, structured output) into a job and a parser."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

from ..errors import MimoError
from ..generate import DoneEvent
from ..sampling import SamplingSettings
from .grammar import GrammarConstraint, json_schema_grammar, lark_grammar
from .metrics import ServerMetrics
from .parsers import OutputParser
from .prompt_cache import PromptCache
from .prompts import ChatPrompt, build_chat_prompt, forced_tool_call_grammar
from .worker import Failed, GenerationRequest, GenerationWorker, Job


log = logging.getLogger("mimo.serve")

DISCONNECT_POLL_SECONDS = 0.5


class BadRequest(MimoError):
    """A request the server refuses (HTTP 400), with the field it is about."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ServeSettings:
    model_name: str
    context: int
    max_queue: int = 16
    parallel: int = 1  # requests decoded together
    cache_ram: int = 0  # bytes of host memory for KV prefixes of earlier requests (0: none)
    reasoning_format: str = "auto"  # "auto": <think> into reasoning_content; "none": raw tags in content
    defaults: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    log_prompts: bool = False


@dataclass
class Output:
    """A job's answer as it streams: parsed deltas and, at the end, the stats."""

    job: Job
    parser: OutputParser
    prompt_tokens: int


class Service:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.engine = None
        self.worker: GenerationWorker | None = None
        self.started = time.time()

    def attach(self, engine, speculation: dict) -> None:
        cache_ram = self.settings.cache_ram
        prompt_cache = PromptCache(cache_ram, on_evict=self.metrics.prompt_cache_evictions.inc) if cache_ram else None
        self.worker = GenerationWorker(engine, self.settings.context, self.settings.max_queue, speculation,
                                       parallel=self.settings.parallel, on_done=self._record, prompt_cache=prompt_cache)
        self.metrics.slots.set(self.settings.parallel)
        self.metrics.prompt_cache_capacity.set(cache_ram)
        self.engine = engine  # last: a request that sees the engine finds the worker too
        self.metrics.kv_capacity.set(self.settings.context)

    @property
    def ready(self) -> bool:
        return self.worker is not None

    @property
    def model_names(self) -> set[str]:
        names = {self.settings.model_name}
        if self.engine is not None:
            names.add(self.engine.path.name)
        return names

    def require_model(self) -> None:
        if self.engine is None:
            raise Loading("the model is still loading")

    def check_model(self, name: str | None) -> None:
        if name and name not in self.model_names and name.removesuffix(":latest") not in self.model_names:
            raise ModelNotFound(f"model {name!r} is not served here (this server runs {self.settings.model_name!r})")

    def sampling(self, **fields) -> SamplingSettings:
        """The server's defaults with the request's values (None: not given) on top."""
        given = {key: value for key, value in fields.items() if value is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = [given["stop"]]
        try:
            return dataclasses.replace(self.settings.defaults, **given).validate()
        except MimoError as error:
            raise BadRequest(str(error), param=str(error).split()[0]) from None

    def chat_prompt(self, messages, tools, thinking, template_kwargs) -> ChatPrompt:
        try:
            return build_chat_prompt(self.engine, messages, tools, thinking, template_kwargs)
        except MimoError as error:
            raise BadRequest(str(error), param="messages") from None

    def start(self, prompt_ids: list[int], settings: SamplingSettings, *, in_reasoning: bool = False,
              tool_format: str = "json", tools: list[dict] | None = None, json_schema: dict | None = None,
              structured: str | None = None, forced_tool: tuple[str, str | None] | None = None,
              logprobs: int | None = None, ignore_eos: bool = False, reasoning_format: str | None = None) -> Output:
        """Queue a generation. `structured`: "json" (with `json_schema` or any object) constrains the
        answer; `forced_tool`: ("required", None) or ("function", NAME) forces a call to a tool."""
        self.require_model()
        room = self.settings.context - len(prompt_ids) - 1 - self.worker.speculation["draft_tokens"]
        if room < 1:
            raise BadRequest(
                f"the prompt ({len(prompt_ids)} tokens) does not fit the server's context ({self.settings.context} "
                "tokens, --ctx)", param="messages", code="context_length_exceeded")
        settings = dataclasses.replace(settings, max_tokens=min(settings.max_tokens, room))
        constraint = None
        if structured or forced_tool:
            try:
                grammar = (json_schema_grammar(json_schema) if structured
                           else lark_grammar(forced_tool_call_grammar(tools or [], tool_format, forced_tool[1])))
                config = self.engine.config
                constraint = GrammarConstraint(self.engine.tokenizer, grammar, config.eos_token_ids[0],
                                               config.vocab_size, after="</think>" if in_reasoning else None)
            except MimoError as error:
                raise BadRequest(str(error), param="response_format" if structured else "tool_choice") from None
        parse_reasoning = (reasoning_format or self.settings.reasoning_format) != "none"
        parser = OutputParser(tool_format, tools, in_reasoning=in_reasoning, parse_reasoning=parse_reasoning)
        job = Job(GenerationRequest(prompt_ids, settings, constraint, logprobs, ignore_eos), asyncio.get_running_loop())
        self.worker.submit(job)
        self.metrics.observe(self.worker)
        return Output(job, parser, len(prompt_ids))

    def _record(self, job: Job, stats) -> None:
        if self.settings.log_prompts:
            prompt = self.engine.tokenizer.decode(job.request.prompt_ids, skip_special_tokens=False)
            log.info("prompt %r -> answer %r", prompt, stats.text)
        metrics = self.metrics
        metrics.prompt_tokens.inc(len(job.request.prompt_ids))
        metrics.cached_prompt_tokens.inc(job.cached_tokens)
        metrics.restored_prompt_tokens.inc(job.restored_tokens)
        metrics.generated_tokens.inc(stats.completion_tokens)
        if stats.prefill_seconds:
            metrics.prefill_speed.set(stats.prefill_tokens_per_s)
        if stats.decode_tokens_per_s:
            metrics.decode_speed.set(stats.decode_tokens_per_s)
        self.metrics.observe(self.worker)


class ModelNotFound(MimoError):
    pass


class Loading(MimoError):
    pass


async def events(output: Output, is_disconnected=None):
    """(TokenEvent | DoneEvent) of a job; raises the job's error. `is_disconnected`: an async
    callable polled every DISCONNECT_POLL_SECONDS by a watchdog task, so a client that went away
    cancels its generation even while it waits for its first token. Leaving early (a closed
    stream) cancels it too. Each event is a plain queue get: no task or timer per token."""
    job = output.job
    watchdog = None if is_disconnected is None else asyncio.ensure_future(_watch(job, is_disconnected))
    try:
        while True:
            item = await job.events.get()
            if item is _CLIENT_GONE:
                return
            if isinstance(item, Failed):
                raise item.error
            yield item
            if isinstance(item, DoneEvent):
                return
    finally:
        job.cancelled.set()
        if watchdog is not None:
            watchdog.cancel()


_CLIENT_GONE = object()  # queued by the watchdog: the reader stops


async def _watch(job, is_disconnected) -> None:
    while not job.cancelled.is_set():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if await is_disconnected():
            job.events.put_nowait(_CLIENT_GONE)
            return


def usage(output: Output, stats) -> dict:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": output.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": output.job.cached_tokens},
    }


def timings(output: Output, stats) -> dict:
    """llama-server's timings object (prompt_n counts the tokens actually prefilled)."""
    return {
        "prompt_n": stats.prompt_tokens,
        "prompt_ms": round(stats.prefill_seconds * 1000, 3),
        "prompt_per_second": round(stats.prefill_tokens_per_s, 3),
        "predicted_n": stats.completion_tokens,
        "predicted_ms": round(stats.decode_seconds * 1000, 3),
        "predicted_per_second": round(stats.decode_tokens_per_s, 3),
        **({"draft_n": stats.speculation.drafted, "draft_n_accepted": stats.speculation.accepted,
            "mean_accepted_length": round(stats.speculation.mean_accepted_length, 3)}
           if stats.speculation else {}),
    }


def finish_reason(stats, parser: OutputParser) -> str:
    if parser.tool_calls:
        return "tool_calls"
    return "stop" if stats.finish_reason == "stop" else "length"

