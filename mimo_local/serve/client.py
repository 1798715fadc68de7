"""`mimo run --server URL`: the prompt goes to a running `mimo serve`, which has the model loaded, and
the answer streams back; the same text and --json fields as a local run."""

from __future__ import annotations

import json
from typing import Iterator

import httpx

from ..errors import MimoError
from ..sampling import SamplingSettings

CONNECT_TIMEOUT_SECONDS = 10


def remote_run(url: str, prompt: str, settings: SamplingSettings, *, model: str | None = None,
               system: str | None = None, raw: bool = False, ignore_eos: bool = False,
               api_key: str | None = None) -> Iterator[str | dict]:
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
    pieces, final, used = [], None, None
    try:
        with httpx.stream("POST", base + endpoint, json=body, headers=headers,
                          timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_SECONDS)) as response:
            if response.status_code != 200:
                response.read()
                raise MimoError(f"{base}: {response.status_code} {_error_message(response)}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise MimoError(f"{base}: {chunk['error'].get('message', chunk['error'])}")
                if chunk.get("usage"):
                    used = chunk["usage"]
                for choice in chunk.get("choices", []):
                    text = choice.get("text") if raw else (choice.get("delta") or {}).get("content")
                    if text:
                        pieces.append(text)
                        yield text
                    if choice.get("finish_reason"):
                        final = {**chunk, "choice": choice}
    except httpx.TransportError as error:
        raise MimoError(f"cannot reach the server at {base} ({error}); is `mimo serve` running?") from None
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
