"""`mimo run --server URL`: the prompt goes to a running `mimo serve`, which has the model loaded, and
the answer streams back; the same text and --json fields as a local run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx

from ..errors import MimoError
from ..sampling_settings import SamplingSettings

CONNECT_TIMEOUT_SECONDS = 10


def remote_run(url: str, prompt: str, settings: SamplingSettings, *, model: str | None = None,
               system: str | None = None, raw: bool = False, thinking: bool | None = None,
               ignore_eos: bool = False, api_key: str | None = None) -> Iterator[str | dict]:
    """Yields the answer's text pieces, then a dict with GenerationStats.as_dict()'s fields."""
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model or _served_model(base, headers),
        "max_tokens": settings.max_tokens, "temperature": settings.temperature, "top_p": settings.top_p,
        "top_k": settings.top_k, "min_p": settings.min_p, "repetition_penalty": settings.repetition_penalty,
        "seed": settings.seed, "stop": settings.stop or None, "stream": True,
        "stream_options": {"include_usage": True}, "return_token_ids": True, "ignore_eos": ignore_eos,
    }
    if raw:
        endpoint, body["prompt"] = "/v1/completions", prompt
    else:
        endpoint = "/v1/chat/completions"
        body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        body["reasoning_format"] = "none"  # the raw text, <think> block and all, as a local run prints it
        if thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
    pieces, final, used = [], None, None
    for chunk in server_chunks(base, endpoint, body, headers):
        if chunk.get("usage"):
            used = chunk["usage"]
        for choice in chunk.get("choices", []):
            text = choice.get("text") if raw else (choice.get("delta") or {}).get("content")
            if text:
                pieces.append(text)
                yield text
            if choice.get("finish_reason"):
                final = {**chunk, "choice": choice}
    if final is None or used is None:
        raise MimoError(f"{base}: the answer ended before it was complete")
    timings = final.get("timings", {})
    yield {
        "text": "".join(pieces),
        "token_ids": final["choice"].get("token_ids", final.get("token_ids", [])),
        "prompt_tokens": used["prompt_tokens"],
        "completion_tokens": used["completion_tokens"],
        "prefill_tokens_per_s": timings.get("prompt_per_second", 0.0),
        "decode_tokens_per_s": timings.get("predicted_per_second", 0.0),
        "finish_reason": final["choice"]["finish_reason"],
        **({"mtp_draft_tokens": timings["draft_n"], "mtp_accepted_tokens": timings["draft_n_accepted"],
            "mean_accepted_length": timings["mean_accepted_length"]} if "draft_n" in timings else {}),
    }


def server_chunks(base: str, path: str, body: dict, headers: dict) -> Iterator[dict]:
    """The JSON chunks of a streamed OpenAI answer; an HTTP error, an error event or a lost
    connection is a one-line MimoError."""
    try:
        with httpx.stream("POST", base + path, json=body, headers=headers,
                          timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_SECONDS)) as response:
            if response.status_code != 200:
                response.read()
                raise MimoError(f"{base}: {response.status_code} {_error_message(response)}")
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise MimoError(f"{base}: {chunk['error'].get('message', chunk['error'])}")
                yield chunk
    except httpx.TransportError as error:
        raise MimoError(f"cannot reach the server at {base} ({error}); is `mimo serve` running?") from None


def _served_model(base: str, headers: dict) -> str:
    try:
        response = httpx.get(base + "/v1/models", headers=headers, timeout=CONNECT_TIMEOUT_SECONDS)
    except httpx.TransportError as error:
        raise MimoError(f"cannot reach the server at {base} ({error}); is `mimo serve` running?") from None
    if response.status_code != 200:
        raise MimoError(f"{base}: {response.status_code} {_error_message(response)}")
    return response.json()["data"][0]["id"]


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class RemoteCache:
    """The chat's view of the server's KV cache: the ids the server was last given. The server
    keeps the longest prefix it holds of each request, so resending them costs nothing."""

    drafter = None

    def __init__(self, max_tokens: int):
        self.max_tokens, self.ids = max_tokens, []

    @property
    def length(self) -> int:
        return len(self.ids)

    def can_truncate(self, length: int) -> bool:
        return True

    def held_prefix(self, ids: list[int]) -> int:
        n = min(len(self.ids), len(ids))
        return next((i for i in range(n) if self.ids[i] != ids[i]), n)

    def rewind_for(self, prompt_ids: list[int], needs_drafter: bool = False) -> int:
        reused = min(self.held_prefix(prompt_ids), len(prompt_ids) - 1)
        self.truncate(reused)
        return reused

    def truncate(self, length: int) -> None:
        del self.ids[length:]


class RemoteEngine:
    """What `mimo chat --server URL` talks to in place of a loaded model: the same `tokenizer`,
    `stream` and `speculation` a ChatSession uses, answered by a running `mimo serve`."""

    def __init__(self, url: str, api_key: str | None = None):
        from types import SimpleNamespace

        self.base = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.name = _served_model(self.base, self.headers)
        loaded = self._call("GET", "/api/ps")["models"]
        context = loaded[0]["context_length"] if loaded else 4096
        self.path = Path(self.name)
        self.plan = None
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.model = SimpleNamespace(device=self.base, new_cache=lambda size, spare_slots=0: RemoteCache(size))
        self.tokenizer = SimpleNamespace(
            render_chat=lambda messages, add_generation_prompt=True, **template_kwargs: self._call(
                "POST", "/apply-template", {"messages": messages, "add_generation_prompt": add_generation_prompt,
                                            "chat_template_kwargs": template_kwargs}
            )["prompt"],
            encode=lambda text: self._call("POST", "/tokenize", {"content": text})["tokens"],
        )

    def speculation(self, mtp=None, draft_tokens: int = 0, draft_vocab=None) -> dict:
        return {"draft_tokens": 0}  # the server decides (its --mtp)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            response = httpx.request(method, self.base + path, json=body, headers=self.headers,
                                     timeout=CONNECT_TIMEOUT_SECONDS * 6)
        except httpx.TransportError as error:
            raise MimoError(f"cannot reach the server at {self.base} ({error})") from None
        if response.status_code != 200:
            raise MimoError(f"{self.base}: {response.status_code} {_error_message(response)}")
        return response.json()

    def stream(self, prompt_ids: list[int], settings: SamplingSettings, cache: RemoteCache | None = None,
               eos_ids: tuple | None = None, **_):
        from ..generate import DoneEvent, GenerationStats, TokenEvent

        cache = cache or RemoteCache(self.config.max_position_embeddings)
        ids = cache.ids + list(prompt_ids)
        body = {"model": self.name, "prompt": ids, "max_tokens": settings.max_tokens, "stream": True,
                "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                "min_p": settings.min_p, "repetition_penalty": settings.repetition_penalty, "seed": settings.seed,
                "stop": settings.stop or None, "return_token_ids": True, "stream_options": {"include_usage": True},
                "ignore_eos": eos_ids == ()}  # the chat's --ignore-eos
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        pieces = []
        cache.ids = ids
        for chunk in server_chunks(self.base, "/v1/completions", body, self.headers):
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    pieces.append(choice["text"])
                    yield TokenEvent(choice["text"], -1)
                if choice.get("finish_reason"):
                    timings = chunk.get("timings", {})
                    stats.token_ids = choice.get("token_ids", chunk.get("token_ids", []))  # streamed: in the chunk
                    stats.completion_tokens = len(stats.token_ids)
                    stats.finish_reason = choice["finish_reason"]
                    stats.prefill_seconds = timings.get("prompt_ms", 0) / 1000
                    stats.decode_seconds = timings.get("predicted_ms", 0) / 1000
        # As a local cache: every id fed, i.e. all but the last one sampled.
        cache.ids = ids + stats.token_ids[:-1]
        stats.text = "".join(pieces)
        yield DoneEvent(stats)
