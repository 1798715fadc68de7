"""`mimo serve --cache-ram`: KV prefixes of earlier requests kept in host memory, over real HTTP on
loopback with the `openai` client."""

import re

import httpx
import openai
import pytest
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.store.resolve import resolve_model
from serve_server import running_server

SYSTEM = ("You are the narrator of a long novel about a village, its families and their houses, "
          "and you answer in the voice of the book. ") * 8
MiB = 1 << 20


def ask(base: str, model: str, user: str, system: str | None = SYSTEM, max_tokens: int = 8):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            extra_body={"return_token_ids": True, "ignore_eos": True})
    return answer, answer.model_dump()["choices"][0]["token_ids"]


def metric(base: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{base}/metrics").text, re.MULTILINE).group(1))


def cold_answer(model: str, user: str, max_tokens: int = 8):
    with running_server(resolve_model(model), model, cache_ram=0) as (base, _):
        answer, ids = ask(base, model, user, max_tokens=max_tokens)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    return ids


@pytest.mark.parametrize("model", ["mimo-nano", "mimo-nano-moe"])  # dense; sliding-window layers (and MTP in both)
def test_a_system_prompt_comes_back_from_the_host_cache_after_its_slot_moved_on(model):
    with running_server(resolve_model(model), model, cache_ram=64 * MiB) as (base, service):
        ask(base, model, "Tell me about Emma.")
        ask(base, model, "Something else entirely: ships and the sea.", system=None)  # the one slot moves on
        assert metric(base, "mimo_prompt_cache_entries") == 1
        answer, ids = ask(base, model, "Tell me about Harriet.")
        cached = answer.usage.prompt_tokens_details.cached_tokens
        assert answer.usage.prompt_tokens // 2 < cached < answer.usage.prompt_tokens  # the system prompt, not the question
        assert metric(base, "mimo_prompt_cache_tokens_total") == cached
        assert metric(base, "mimo_cached_prompt_tokens_total") >= cached
    assert ids == cold_answer(model, "Tell me about Harriet.")


def test_a_prefix_whose_window_the_ring_no_longer_holds_counts_as_not_cached():
    model = "mimo-nano-moe"  # sliding window 64, 128 spare ring slots: an answer of 160 tokens wraps past the prefix
    with running_server(resolve_model(model), model, cache_ram=64 * MiB) as (base, _):
        ask(base, model, "Tell me about Emma.", max_tokens=160)
        ask(base, model, "Something else entirely: ships and the sea.", system=None)
        answer, ids = ask(base, model, "Tell me about Harriet.")
        assert metric(base, "mimo_prompt_cache_tokens_total") == 0
        assert answer.usage.prompt_tokens_details.cached_tokens < 5  # what the slot shares: the template's opening
    assert ids == cold_answer(model, "Tell me about Harriet.")


def test_the_host_cache_stays_within_its_bytes_by_dropping_the_least_recently_used():
    model = "mimo-nano"

    def complete(base, number):
        prompt = f"Chapter {number}. " + "It is a truth universally acknowledged, " * 12
        return httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4,
                                                           "ignore_eos": True}, timeout=60).json()

    with running_server(resolve_model(model), model, cache_ram=64 * MiB) as (base, _):
        complete(base, 1)
        complete(base, 2)
        entry = metric(base, "mimo_prompt_cache_bytes")
    assert entry > 0
    bound = int(2.5 * entry)  # room for two entries, not three
    with running_server(resolve_model(model), model, cache_ram=bound) as (base, service):
        for number in range(1, 7):
            complete(base, number)
            assert (number > 1) <= metric(base, "mimo_prompt_cache_bytes") <= bound  # saved from the second on
        assert metric(base, "mimo_prompt_cache_capacity_bytes") == bound
        assert metric(base, "mimo_prompt_cache_entries") == 2
        assert metric(base, "mimo_prompt_cache_evictions_total") == 3  # six prompts: five saved, two kept
        # The most recent entry is the one of chapter 5 (chapter 6 is still in the slot): it comes back.
        assert complete(base, 5)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert service.worker.prompt_cache.nbytes <= bound


def test_cache_ram_takes_a_size():
    result = CliRunner().invoke(app, ["serve", "-m", "mimo-nano", "--cache-ram", "12"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --cache-ram 12: a size needs a unit") and result.stderr.count("\n") == 1
