"""Ollama's API: /api/chat, /api/generate (NDJSON streams, `done: true` last), /api/tags, /api/show,
/api/ps, /api/version."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from ..generate import DoneEvent
from .openai_api import Lenient
from .prompts import message_text
from .service import BadRequest, Output, Service, events


class Options(Lenient):
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    seed: Optional[int] = None
    num_predict: Optional[int] = None  # -1 (or -2): until the context is full
    stop: Optional[list[str]] = None
    repeat_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None


class OllamaMessage(Lenient):
    role: str
    content: Optional[str] = ""
    thinking: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_name: Optional[str] = None


class GenerateFields(Lenient):
    model: str
    stream: bool = True
    format: Optional[Union[str, dict[str, Any]]] = None
    options: Options = Field(default_factory=Options)
    think: Optional[Union[bool, str]] = None

    def settings(self, service: Service):
        o = self.options
        max_tokens = None if o.num_predict is None or o.num_predict < 0 else max(o.num_predict, 1)
        if o.num_predict is not None and o.num_predict < 0:
            max_tokens = service.settings.context  # clamped to the room left
        return service.sampling(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, seed=o.seed,
                                max_tokens=max_tokens, stop=o.stop, repetition_penalty=o.repeat_penalty,
                                presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty)

    def structured(self) -> tuple[str | None, dict | None]:
        if self.format in (None, ""):
            return None, None
        if self.format == "json":
            return "json", None
        if isinstance(self.format, dict):
            return "json", self.format
        raise BadRequest(f"format must be \"json\" or a JSON schema, not {self.format!r}", param="format")

    def thinking(self) -> bool | None:
        return None if self.think is None else self.think not in (False, "none")


class ChatRequest(GenerateFields):
    messages: list[OllamaMessage] = Field(min_length=1)
    tools: Optional[list[dict[str, Any]]] = None


class GenerateRequest(GenerateFields):
    prompt: str = ""
    system: Optional[str] = None
    raw: bool = False


class ModelRequest(Lenient):
    model: Optional[str] = None
    name: Optional[str] = None  # older clients


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def openai_message(message: OllamaMessage) -> dict:
    """An Ollama message in the OpenAI shape the prompt builder takes (arguments are objects)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.thinking:
        out["reasoning_content"] = message.thinking
    if message.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": call.get("function", {})} for call in message.tool_calls]
    if message.tool_name:
        out["name"] = message.tool_name
    return out


def durations(stats) -> dict:
    return {
        "total_duration": int((stats.prefill_seconds + stats.decode_seconds) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": int(stats.prefill_seconds * 1e9),
        "eval_count": stats.completion_tokens,
        "eval_duration": int(stats.decode_seconds * 1e9),
    }


def done_reason(stats) -> str:
    return "stop" if stats.finish_reason == "stop" else "length"


def tool_calls(parser) -> list[dict]:
    return [{"function": {"index": i, "name": call.name, "arguments": json.loads(call.arguments)}}
            for i, call in enumerate(parser.tool_calls)]


def model_details(service: Service) -> dict:
    config = service.engine.config if service.engine is not None else None
    return {
        "parent_model": "", "format": "safetensors",
        "family": config.family if config else "mimo", "families": [config.family] if config else ["mimo"],
        "parameter_size": "", "quantization_level": "",
    }


def router(service: Service) -> APIRouter:
    api = APIRouter()

    def ndjson(lines):
        async def body():
            with service.metrics.in_progress.track_inprogress():
                try:
                    async for line in lines:
                        yield json.dumps(line) + "\n"
                except Exception as error:  # noqa: BLE001 - after a 200, Ollama's stream ends with an error line
                    yield json.dumps({"error": str(error)}) + "\n"
        return StreamingResponse(body(), media_type="application/x-ndjson")

    @api.get("/api/version")
    async def api_version():
        return {"version": version("mimo-local")}

    @api.get("/api/tags")
    async def tags():
        return {"models": [{"name": service.settings.model_name, "model": service.settings.model_name,
                            "modified_at": now(), "size": _weight_bytes(service), "digest": "",
                            "details": model_details(service)}]}

    @api.get("/api/ps")
    async def ps():
        loaded = service.engine is not None
        return {"models": [{"name": service.settings.model_name, "model": service.settings.model_name,
                            "size": _weight_bytes(service), "size_vram": 0, "digest": "", "expires_at": None,
                            "details": model_details(service), "context_length": service.settings.context}]
                if loaded else []}

    @api.post("/api/show")
    async def show(body: ModelRequest):
        service.check_model(body.model or body.name)
        config = service.engine.config
        capabilities = ["completion", "tools"]
        if "think" in (service.engine.tokenizer.chat_template or ""):
            capabilities.append("thinking")
        return {"modelfile": "", "parameters": "", "template": service.engine.tokenizer.chat_template or "",
                "details": model_details(service), "modified_at": now(), "capabilities": capabilities,
                "model_info": {"general.architecture": config.family,
                               f"{config.family}.context_length": config.max_position_embeddings,
                               f"{config.family}.embedding_length": config.hidden_size,
                               f"{config.family}.block_count": config.num_layers}}

    @api.post("/api/chat")
    async def chat(body: ChatRequest, request: Request):
        service.check_model(body.model)
        settings = body.settings(service)
        structured, schema = body.structured()
        tools = body.tools or None
        prompt = service.chat_prompt([openai_message(m) for m in body.messages], tools, body.thinking(), None)
        output = service.start(prompt.ids, settings, in_reasoning=prompt.in_reasoning, tool_format=prompt.tool_format,
                               tools=tools, json_schema=schema, structured=structured)
        lines = chat_lines(output, body, request)
        if body.stream:
            return ndjson(lines)
        return await merged(lines, "message")

    @api.post("/api/generate")
    async def generate(body: GenerateRequest, request: Request):
        service.check_model(body.model)
        if not body.prompt:  # ollama loads the model and answers done
            return {"model": body.model, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
        settings = body.settings(service)
        structured, schema = body.structured()
        if body.raw:
            ids, in_reasoning, tool_format = service.engine.tokenizer.encode(body.prompt), False, "json"
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": message_text(body.prompt)}]
            prompt = service.chat_prompt(messages, None, body.thinking(), None)
            ids, in_reasoning, tool_format = prompt.ids, prompt.in_reasoning, prompt.tool_format
        output = service.start(ids, settings, in_reasoning=in_reasoning, tool_format=tool_format,
                               json_schema=schema, structured=structured)
        lines = generate_lines(output, body, request)
        if body.stream:
            return ndjson(lines)
        return await merged(lines, None)

    return api


def _weight_bytes(service: Service) -> int:
    if service.engine is None:
        return 0
    return sum(p.numel() * p.element_size() for p in service.engine.model.parameters())


async def chat_lines(output: Output, body: ChatRequest, request: Request):
    parser = output.parser
    async for event in events(output, request.is_disconnected):
        done = isinstance(event, DoneEvent)
        delta = parser.finish() if done else parser.feed(event.text)
        message: dict[str, Any] = {"role": "assistant", "content": delta.content}
        if delta.reasoning:
            message["thinking"] = delta.reasoning
        if done:
            if parser.tool_calls:
                message["tool_calls"] = tool_calls(parser)
            yield {"model": body.model, "created_at": now(), "message": message, "done": True,
                   "done_reason": done_reason(event.stats), **durations(event.stats)}
        elif delta.content or delta.reasoning:
            yield {"model": body.model, "created_at": now(), "message": message, "done": False}


async def generate_lines(output: Output, body: GenerateRequest, request: Request):
    parser = output.parser
    async for event in events(output, request.is_disconnected):
        done = isinstance(event, DoneEvent)
        if body.raw:
            text, thinking = ("" if done else event.text), ""
        else:
            delta = parser.finish() if done else parser.feed(event.text)
            text, thinking = delta.content, delta.reasoning
        line: dict[str, Any] = {"model": body.model, "created_at": now(), "response": text, "done": done}
        if thinking:
            line["thinking"] = thinking
        if done:
            yield {**line, "done_reason": done_reason(event.stats), **durations(event.stats)}
        elif text or thinking:
            yield line


async def merged(lines, message_key: str | None) -> dict:
    """A non-streamed answer: the stream's pieces joined into its last line."""
    content, thinking, last = [], [], None
    async for line in lines:
        part = line["message"] if message_key else line
        content.append(part.get("content" if message_key else "response", ""))
        thinking.append(part.get("thinking", ""))
        last = line
    if last is None:
        return {}
    if message_key:
        last["message"] = {**last["message"], "content": "".join(content)}
        if any(thinking):
            last["message"]["thinking"] = "".join(thinking)
    else:
        last["response"] = "".join(content)
        if any(thinking):
            last["thinking"] = "".join(thinking)
    return last
