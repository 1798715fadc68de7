"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions, streamed as OpenAI streams."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from ..errors import MimoError
from ..generate import DoneEvent
from .prompts import template_message
from .service import BadRequest, Output, Service, events, finish_reason, timings, usage


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI does


class SamplingFields(Lenient):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = Field(None, ge=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    return_token_ids: bool = False  # vLLM's extension: the ids of the prompt and the answer
    ignore_eos: bool = False  # vLLM's and llama-server's extension: generate up to max_tokens

    def settings(self, service: Service):
        if self.n not in (None, 1):
            raise BadRequest("n > 1 is not supported: send the request n times", param="n")
        return service.sampling(
            max_tokens=self.max_completion_tokens or self.max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=None if self.top_k in (None, -1) else self.top_k, min_p=self.min_p,
            seed=self.seed, stop=self.stop, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    reasoning_format: Optional[Literal["auto", "none"]] = None  # llama-server's: per request


class TokenizeRequest(Lenient):
    content: str


class DetokenizeRequest(Lenient):
    tokens: list[int]


class TemplateRequest(Lenient):
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False


async def with_error_event(chunks):
    """A failure after the stream began (the response is already 200) ends it with an error event
    in OpenAI's shape, as its API does, instead of a cut connection."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:  # noqa: BLE001 - reported to the client
        kind = "invalid_request_error" if isinstance(error, MimoError) else "server_error"
        yield {"data": json.dumps({"error": {"message": str(error), "type": kind, "param": None, "code": None}})}
        yield {"data": "[DONE]"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def structured_output(response_format: dict | None) -> tuple[str | None, dict | None]:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "json", None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON schema object",
                             param="response_format")
        return "json", schema
    raise BadRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                     param="response_format")


def tool_choice_mode(request: ChatCompletionRequest) -> tuple[list[dict] | None, tuple[str, str | None] | None]:
    """(tools to render and parse, forced call) from tools and tool_choice."""
    tools, choice = request.tools or None, request.tool_choice
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    if not tools:
        raise BadRequest("tool_choice needs tools", param="tool_choice")
    if choice == "required":
        return tools, ("required", None)
    if isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        return tools, ("function", choice["function"]["name"])
    raise BadRequest("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                     "{\"name\": ...}}", param="tool_choice")


def thinking_setting(request: ChatCompletionRequest) -> bool | None:
    kwargs = request.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        return bool(kwargs["enable_thinking"])
    if request.reasoning_effort is not None:
        return request.reasoning_effort != "none"
    return None


def chat_message(parser, most_calls: int | None = None) -> dict:
    """`most_calls`: 1 when the request said parallel_tool_calls false (later calls are dropped)."""
    message: dict[str, Any] = {"role": "assistant", "content": parser.content or (None if parser.tool_calls else "")}
    if parser.reasoning:
        message["reasoning_content"] = message["reasoning"] = parser.reasoning
    if parser.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in parser.tool_calls[:most_calls]
        ]
    return message


def most_calls(body) -> int | None:
    return 1 if body.parallel_tool_calls is False else None


def token_logprob_entry(service: Service, token_id: int, logprob: float, top: list | None) -> dict:
    def entry(token, value):
        text = service.engine.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {**entry(token_id, logprob), "top_logprobs": [entry(t, v) for t, v in (top or [])]}


def delta_dict(delta, most_calls: int | None = None) -> dict:
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning_content"] = out["reasoning"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    calls = [call for call in delta.tool_calls if most_calls is None or call.index < most_calls]
    if calls:
        out["tool_calls"] = []
        for call in calls:
            item: dict[str, Any] = {"index": call.index, "function": {"arguments": call.arguments}}
            if call.id is not None:
                item.update(id=call.id, type="function")
            if call.name is not None:
                item["function"]["name"] = call.name
            out["tool_calls"].append(item)
    return out


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.settings.model_name, "object": "model",
                                            "created": int(service.started), "owned_by": "mimo-local"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        service.check_model(body.model)
        settings = body.settings(service)
        tools, forced = tool_choice_mode(body)
        structured, schema = structured_output(body.response_format)
        prompt = service.chat_prompt([m.model_dump(exclude_none=True) for m in body.messages], tools,
                                     thinking_setting(body), body.chat_template_kwargs)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        output = service.start(prompt.ids, settings, in_reasoning=prompt.in_reasoning, tool_format=prompt.tool_format,
                               tools=tools, json_schema=schema, structured=structured, forced_tool=forced,
                               logprobs=logprobs, ignore_eos=body.ignore_eos, reasoning_format=body.reasoning_format)
        common = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": body.model}
        if body.stream:
            return EventSourceResponse(with_error_event(stream_chat(service, output, common, body, request)), ping=15)
        return await complete_chat(service, output, common, body, request)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        settings = body.settings(service)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = list(prompt)
            vocab = service.engine.config.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise BadRequest("one prompt per request (n prompts: send n requests)", param="prompt")
                prompt = prompt[0]
            ids = service.engine.tokenizer.encode(prompt)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        output = service.start(ids, settings, logprobs=body.logprobs, ignore_eos=body.ignore_eos)
        common = {"id": new_id("cmpl"), "created": int(time.time()), "model": body.model}
        if body.stream:
            return EventSourceResponse(with_error_event(stream_completion(service, output, common, body, request)),
                                       ping=15)
        return await complete_text(service, output, common, body, request)

    # llama-server's helpers: what `mimo chat --server` needs to keep its conversation exact.
    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        service.require_model()
        return {"tokens": service.engine.tokenizer.encode(body.content)}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        service.require_model()
        return {"content": service.engine.tokenizer.decode(body.tokens)}

    @api.post("/apply-template")
    async def apply_template(body: TemplateRequest):
        service.require_model()
        try:
            prompt = service.engine.tokenizer.render_chat(
                [template_message(m.model_dump(exclude_none=True)) for m in body.messages],
                add_generation_prompt=body.add_generation_prompt, **(body.chat_template_kwargs or {}))
        except MimoError as error:
            raise BadRequest(str(error), param="messages") from None
        return {"prompt": prompt}

    return api


async def complete_chat(service, output: Output, common: dict, body, request: Request) -> dict:
    logprobs, stats, token_ids = [], None, []
    with service.metrics.in_progress.track_inprogress():
        async for event in events(output, request.is_disconnected):
            if isinstance(event, DoneEvent):
                stats = event.stats
                output.parser.finish()
            else:
                output.parser.feed(event.text)
                if event.logprob is not None:
                    logprobs.append(token_logprob_entry(service, event.token_id, event.logprob, event.top_logprobs))
    if stats is None:  # the client went away
        return {}
    choice = {"index": 0, "message": chat_message(output.parser, most_calls(body)),
              "logprobs": {"content": logprobs} if body.logprobs else None,
              "finish_reason": finish_reason(stats, output.parser)}
    if body.return_token_ids:
        choice["token_ids"] = stats.token_ids
    return {**common, "object": "chat.completion", "choices": [choice], "usage": usage(output, stats),
            "timings": timings(output, stats),
            **({"prompt_token_ids": output.job.request.prompt_ids} if body.return_token_ids else {})}


async def stream_chat(service, output: Output, common: dict, body, request: Request):
    def chunk(delta: dict, finish=None, logprobs=None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"data": json.dumps({**common, "object": "chat.completion.chunk", "choices": [choice], **extra})}

    with service.metrics.in_progress.track_inprogress():
        yield chunk({"role": "assistant", "content": ""})
        async for event in events(output, request.is_disconnected):
            if isinstance(event, DoneEvent):
                stats = event.stats
                tail = delta_dict(output.parser.finish(), most_calls(body))
                if tail:
                    yield chunk(tail)
                extra = {"token_ids": stats.token_ids} if body.return_token_ids else {}
                yield chunk({}, finish_reason(stats, output.parser), timings=timings(output, stats), **extra)
                if body.include_usage:
                    yield {"data": json.dumps({**common, "object": "chat.completion.chunk", "choices": [],
                                               "usage": usage(output, stats)})}
                yield {"data": "[DONE]"}
                return
            delta = delta_dict(output.parser.feed(event.text), most_calls(body))
            logprobs = None
            if event.logprob is not None:
                logprobs = {"content": [token_logprob_entry(service, event.token_id, event.logprob,
                                                            event.top_logprobs)]}
            if delta or logprobs:
                yield chunk(delta, logprobs=logprobs)


def completion_logprobs(service, entries: list[tuple]) -> dict:
    decode = service.engine.tokenizer.decode
    tokens = [decode([t], skip_special_tokens=False) for t, _, _ in entries]
    offsets, position = [], 0
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{decode([t], skip_special_tokens=False): v for t, v in top or []}
                             for _, _, top in entries],
            "text_offset": offsets}


async def complete_text(service, output: Output, common: dict, body, request: Request) -> dict:
    pieces, entries, stats = [], [], None
    with service.metrics.in_progress.track_inprogress():
        async for event in events(output, request.is_disconnected):
            if isinstance(event, DoneEvent):
                stats = event.stats
            else:
                pieces.append(event.text)
                if event.logprob is not None:
                    entries.append((event.token_id, event.logprob, event.top_logprobs))
    if stats is None:
        return {}
    text = "".join(pieces)
    if body.echo and isinstance(body.prompt, str):
        text = body.prompt + text
    choice = {"index": 0, "text": text, "finish_reason": "stop" if stats.finish_reason == "stop" else "length",
              "logprobs": completion_logprobs(service, entries) if body.logprobs is not None else None}
    if body.return_token_ids:
        choice["token_ids"] = stats.token_ids
    return {**common, "object": "text_completion", "choices": [choice], "usage": usage(output, stats),
            "timings": timings(output, stats)}


async def stream_completion(service, output: Output, common: dict, body, request: Request):
    def chunk(text: str, finish=None, logprobs=None, **extra) -> dict:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"data": json.dumps({**common, "object": "text_completion", "choices": [choice], **extra})}

    with service.metrics.in_progress.track_inprogress():
        async for event in events(output, request.is_disconnected):
            if isinstance(event, DoneEvent):
                stats = event.stats
                extra = {"token_ids": stats.token_ids} if body.return_token_ids else {}
                yield chunk("", "stop" if stats.finish_reason == "stop" else "length",
                            timings=timings(output, stats), **extra)
                if body.include_usage:
                    yield {"data": json.dumps({**common, "object": "text_completion", "choices": [],
                                               "usage": usage(output, stats)})}
                yield {"data": "[DONE]"}
                return
            logprobs = None
            if event.logprob is not None:
                logprobs = completion_logprobs(service, [(event.token_id, event.logprob, event.top_logprobs)])
            # One chunk per token, its text possibly empty (held-back UTF-8, a special token), as
            # llama.cpp's server and OpenAI's send: clients see progress and time the first token.
            yield chunk(event.text, logprobs=logprobs)
