"""`mimo serve` over real HTTP on loopback, with the real `openai` and `ollama` client libraries."""

import json
import os
import threading
import time

import httpx
import ollama
import openai
import pytest
from typer.testing import CliRunner

from mimo_local.dev.scripted_chat import THINKING
from mimo_local.cli import app
from mimo_local.store.resolve import resolve_model
from serve_server import running_server

PROMPT = "Tell me about Emma."
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def nano():
    with running_server(resolve_model("mimo-nano"), "mimo-nano", max_queue=4) as (base, service):
        yield base, service


@pytest.fixture(scope="module")
def client(nano):
    return openai.OpenAI(base_url=nano[0] + "/v1", api_key="unused", max_retries=0)


def good_request_works(base: str) -> None:
    response = httpx.post(f"{base}/v1/chat/completions", json={"model": "mimo-nano", "messages": MESSAGES,
                                                               "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_greedy_chat_equals_mimo_run(client):
    result = CliRunner().invoke(app, ["run", "-m", "mimo-nano", "--temperature", "0", "-n", "24", "--dtype",
                                      "float32", "--device", "cpu", "--json", PROMPT])
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    for _ in range(2):  # the second request reuses the first one's KV cache: same answer
        answer = client.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=24, temperature=0,
                                                extra_body={"return_token_ids": True})
        choice = answer.model_dump()["choices"][0]
        assert choice["token_ids"] == expected["token_ids"]
        assert choice["message"]["content"] == expected["text"]
        assert answer.usage.prompt_tokens == expected["prompt_tokens"]
        assert answer.usage.completion_tokens == expected["completion_tokens"]
    assert answer.usage.prompt_tokens_details.cached_tokens == expected["prompt_tokens"] - 1


def test_streaming_chunks_as_openai_sends_them(client, nano):
    chunks = list(client.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=12, temperature=0)
    assert streamed == whole.choices[0].message.content
    raw = httpx.post(f"{nano[0]}/v1/chat/completions", json={"model": "mimo-nano", "messages": MESSAGES,
                                                             "max_tokens": 2, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_completions_plain_and_streamed(client):
    text = client.completions.create(model="mimo-nano", prompt="It is a truth", max_tokens=8, temperature=0,
                                     logprobs=2)
    choice = text.choices[0]
    assert choice.text and len(choice.logprobs.tokens) == 8
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model="mimo-nano", prompt="It is a truth", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_chat_logprobs_and_sampling_with_a_seed(client):
    answer = client.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)  # greedy picks the top one

    def sampled():
        return client.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=16, temperature=1.0,
                                              top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5,
                                              extra_body={"top_k": 40, "min_p": 0.01}).choices[0].message.content

    assert sampled() == sampled()


def test_models_health_and_metrics(client, nano):
    assert [m.id for m in client.models.list().data] == ["mimo-nano"]
    assert httpx.get(f"{nano[0]}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{nano[0]}/metrics").text
    for name in ("mimo_requests_total", "mimo_generated_tokens_total", "mimo_decode_tokens_per_second",
                 "mimo_queue_length", "mimo_kv_cache_tokens", "mimo_prefill_tokens_per_second"):
        assert name in metrics


def test_json_schema_output_always_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    for seed in range(3):
        answer = client.chat.completions.create(
            model="mimo-nano", messages=[{"role": "user", "content": "Who is Emma? Answer in JSON."}],
            max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        value = json.loads(answer.choices[0].message.content)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 20
    anything = client.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=60, temperature=0,
                                              response_format={"type": "json_object"})
    content = anything.choices[0].message.content
    assert content.startswith("{")  # the Austen model writes prose unless the grammar holds it
    if anything.choices[0].finish_reason == "stop":  # the object may not close within 60 tokens
        assert isinstance(json.loads(content), dict)


def test_tool_choice_required_forces_a_valid_call(client):
    check_forced_tool_calls(client, "mimo-nano")


def test_tool_choice_required_forces_a_valid_xml_call_on_the_v2_flash_family():
    with running_server(resolve_model("mimo-nano-moe"), "mimo-nano-moe") as (base, _):
        check_forced_tool_calls(openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0), "mimo-nano-moe")


def check_forced_tool_calls(client, model):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Bath", "London"]},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["city", "days"]}}}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, temperature=0,
                                                tools=tools, tool_choice=choice)
        assert answer.choices[0].finish_reason == "tool_calls"
        call = answer.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id
        arguments = json.loads(call.function.arguments)
        assert arguments["city"] in ("Bath", "London") and 1 <= arguments["days"] <= 9


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "mimo-nano", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"model": "mimo-nano", "messages": []}, 400, "messages"),
    ({"model": "mimo-nano"}, 400, "messages"),
    ({"model": "gpt-5", "messages": MESSAGES}, 404, "model"),
    ({"model": "mimo-nano", "messages": MESSAGES, "n": 2}, 400, "n"),
    ({"model": "mimo-nano", "messages": MESSAGES, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"model": "mimo-nano", "messages": MESSAGES, "response_format": {"type": "json_schema",
                                                                      "json_schema": {"schema": {"type": 5}}}},
     400, "response_format"),
    ({"model": "mimo-nano", "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": "mimo-nano", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "mimo-nano", "messages": MESSAGES, "chat_template_kwargs": {"messages": []}}, 400, "messages"),
    ({"model": "mimo-nano", "messages": MESSAGES, "chat_template_kwargs": "x"}, 400, "chat_template_kwargs"),
    ({"model": "mimo-nano", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"model": "mimo-nano", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "mimo-nano", "messages": MESSAGES, "top_logprobs": 99, "logprobs": True}, 400, "top_logprobs"),
    ({"model": "mimo-nano", "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{broken"}}]}]}, 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(nano, body, status, param):
    base = nano[0]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param:
        assert error["param"] == param
    good_request_works(base)


def test_a_body_over_the_limit_gets_413(nano):
    base = nano[0]
    huge = json.dumps({"model": "mimo-nano", "messages": [{"role": "user", "content": "x" * (10 << 20)}]})
    response = httpx.post(f"{base}/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "mimo-nano", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
        yield b'"}]}'

    response = httpx.post(f"{base}/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    good_request_works(base)


def test_max_tokens_beyond_the_context_is_clamped(tmp_path):
    with running_server(resolve_model("mimo-nano"), "mimo-nano", context=64) as (base, _):
        answer = httpx.post(f"{base}/v1/completions", json={"model": "mimo-nano", "prompt": "It is a truth",
                                                            "max_tokens": 100000, "ignore_eos": True}).json()
        assert answer["usage"]["completion_tokens"] + answer["usage"]["prompt_tokens"] < 64
        assert answer["choices"][0]["finish_reason"] == "length"
        too_long = httpx.post(f"{base}/v1/chat/completions", json={
            "model": "mimo-nano", "messages": [{"role": "user", "content": "x " * 100}]})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_a_client_that_disconnects_cancels_its_generation(nano):
    base, service = nano
    before = service.metrics.generated_tokens._value.get()
    with httpx.stream("POST", f"{base}/v1/completions", json={
            "model": "mimo-nano", "prompt": "It is a truth", "max_tokens": 3000, "ignore_eos": True,
            "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: hang up
    good_request_works(base)  # queued behind the cancelled one: runs once it stopped
    generated = service.metrics.generated_tokens._value.get() - before
    assert generated < 3000
    assert service.worker.waiting == 0 and not service.worker.busy


def test_api_key_is_required_when_set():
    with running_server(resolve_model("mimo-nano"), "mimo-nano", api_key="s3cret") as (base, _):
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{base}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(model="mimo-nano", messages=MESSAGES, max_tokens=2).choices
        assert ollama.Client(host=base, headers={"Authorization": "Bearer s3cret"}).list().models


def test_a_full_queue_answers_503_with_retry_after():
    with running_server(resolve_model("mimo-nano"), "mimo-nano", max_queue=1) as (base, service):
        long = {"model": "mimo-nano", "prompt": "It is a truth", "max_tokens": 600, "ignore_eos": True}
        results = []

        def send():
            results.append(httpx.post(f"{base}/v1/completions", json=long, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and set(codes) <= {200, 503}, codes
        busy = [r for r in results if r.status_code == 503]
        assert busy and all(r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full" for r in busy)
        good_request_works(base)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_8_clients_x_4_requests(nano):
    base = nano[0]

    def round_of_requests():
        results = []

        def client_loop(number):
            for i in range(4):
                try:
                    r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                        "model": "mimo-nano", "messages": [{"role": "user", "content": f"Client {number} asks {i}"}],
                        "max_tokens": 16, "stream": i % 2 == 0})
                    results.append(r.status_code)
                except httpx.HTTPError as error:  # pragma: no cover - the assertion below reports it
                    results.append(repr(error))

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        assert len(results) == 32 and set(results) <= {200, 503}, results
        assert results.count(200) >= 8

    round_of_requests()
    after_first = rss_bytes()
    for _ in range(2):
        round_of_requests()
    assert rss_bytes() < after_first * 1.1


def test_ollama_client_chat_generate_and_model_listing(nano):
    client = ollama.Client(host=nano[0])
    answer = client.chat(model="mimo-nano", messages=MESSAGES, options={"temperature": 0, "num_predict": 12})
    assert answer.done and answer.message.role == "assistant" and answer.message.content
    assert answer.eval_count == 12 and answer.prompt_eval_count > 0
    streamed = list(client.chat(model="mimo-nano", messages=MESSAGES, stream=True,
                                options={"temperature": 0, "num_predict": 12}))
    assert streamed[-1].done and not any(part.done for part in streamed[:-1])
    assert "".join(part.message.content for part in streamed) == answer.message.content
    generated = client.generate(model="mimo-nano", prompt="It is a truth", raw=True,
                                options={"temperature": 0, "num_predict": 6})
    assert generated.done and generated.response
    structured = client.chat(model="mimo-nano", messages=MESSAGES, format={"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
        options={"temperature": 0, "num_predict": 30})
    assert isinstance(json.loads(structured.message.content)["ok"], bool)
    assert [m.model for m in client.list().models] == ["mimo-nano"]
    assert client.show("mimo-nano").capabilities
    assert client.ps().models[0].model == "mimo-nano"
    assert httpx.get(f"{nano[0]}/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3", messages=MESSAGES)
    assert missing.value.status_code == 404


def run_json(*args) -> dict:
    result = CliRunner().invoke(app, ["run", "--temperature", "0", "-n", "20", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mimo_run_against_a_server_gives_the_local_answer(nano):
    local = run_json("-m", "mimo-nano", "--dtype", "float32", "--device", "cpu", PROMPT)
    remote = run_json("--server", nano[0], PROMPT)
    for key in ("text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"):
        assert remote[key] == local[key], key
    assert remote["decode_tokens_per_s"] > 0
    raw_local = run_json("-m", "mimo-nano", "--dtype", "float32", "--device", "cpu", "--raw", "It is a truth")
    raw_remote = run_json("--server", nano[0], "--raw", "It is a truth")
    assert raw_remote["token_ids"] == raw_local["token_ids"]
    streamed = CliRunner().invoke(app, ["run", "--server", nano[0], "--temperature", "0", "-n", "20", PROMPT])
    assert streamed.exit_code == 0 and streamed.stdout.strip() == local["text"].strip()


def test_mimo_run_against_an_absent_server_is_a_one_line_error():
    result = CliRunner().invoke(app, ["run", "--server", "http://127.0.0.1:9", "hello"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the server") and result.stderr.count("\n") == 1


def start_cli_server(*args) -> tuple:
    import subprocess
    import sys

    from serve_server import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mimo_local.cli", "serve", "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def wait_for_health(process, base: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready: {process.poll()} {process.stderr.read() if process.poll() else ''}")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_mimo_serve_cli_serves_until_a_signal_and_exits_cleanly(signal_name):
    import signal

    process, base = start_cli_server("-m", "mimo-nano", "--temperature", "0")
    try:
        wait_for_health(process, base)
        answer = httpx.post(f"{base}/v1/completions", json={"model": "mimo-nano", "prompt": "It is", "max_tokens": 4})
        assert answer.status_code == 200
        process.send_signal(getattr(signal, signal_name))
        assert process.wait(timeout=30) == 0
        stderr = process.stderr.read()
        assert "Traceback" not in stderr and "POST /v1/completions 200" in stderr and "It is" not in stderr
        assert "4 parallel slots" in stderr  # no --parallel: as many as the memory plan fits, here 4
    finally:
        process.kill()


def test_log_prompts_logs_the_prompt_and_the_answer():
    import signal

    process, base = start_cli_server("-m", "mimo-nano", "--temperature", "0", "--log-prompts")
    try:
        wait_for_health(process, base)
        answer = httpx.post(f"{base}/v1/completions", json={"model": "mimo-nano", "prompt": "It is", "max_tokens": 4})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert f"prompt 'It is' -> answer {answer.json()['choices'][0]['text']!r}" in process.stderr.read()
    finally:
        process.kill()


def test_a_model_that_fails_to_load_ends_the_server_with_a_one_line_error(tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(resolve_model("mimo-nano"), broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    process, _ = start_cli_server("-m", str(broken))
    try:
        assert process.wait(timeout=60) == 1
        errors = [line for line in process.stderr.read().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "safetensors" in errors[0]
    finally:
        process.kill()


def test_loopback_addresses():
    from mimo_local.serve.launch import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "::", "example.com"))


def test_mimo_chat_against_a_server_answers_as_a_local_chat(scripted_chat, tmp_path):
    import subprocess
    import sys

    lines = "hi\n/think off\nhi again\n/stats\n"
    env = {**os.environ, "MIMO_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    local = subprocess.run([sys.executable, "-m", "mimo_local.cli", "chat", "--model", str(scripted_chat), "--no-mtp"],
                           input=lines, capture_output=True, text=True, env=env, timeout=120)
    past_eos = ["--temperature", "0", "-n", "40", "--ignore-eos"]
    local_past_eos = subprocess.run([sys.executable, "-m", "mimo_local.cli", "chat", "--model", str(scripted_chat),
                                     "--no-mtp", *past_eos], input="hi\n", capture_output=True, text=True, env=env,
                                    timeout=120)
    with running_server(scripted_chat, "scripted", defaults=None) as (base, service):
        remote = subprocess.run([sys.executable, "-m", "mimo_local.cli", "chat", "--server", base],
                                input=lines, capture_output=True, text=True, env=env, timeout=120)
        cached = service.metrics.cached_prompt_tokens._value.get()
        remote_past_eos = subprocess.run([sys.executable, "-m", "mimo_local.cli", "chat", "--server", base, *past_eos],
                                         input="hi\n", capture_output=True, text=True, env=env, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and "hi again" not in remote.stdout
    assert remote_past_eos.stdout == local_past_eos.stdout and "40 tok" in remote_past_eos.stderr
    assert "| length]" in remote_past_eos.stderr
    assert cached > 0  # the second turn reused the first one's KV on the server
    switched = subprocess.run([sys.executable, "-m", "mimo_local.cli", "chat", "--server", "http://127.0.0.1:9"],
                              input="hi\n", capture_output=True, text=True, env=env, timeout=60)
    assert switched.returncode == 1 and switched.stderr.startswith("error: cannot reach the server")


def test_parallel_requests_are_decoded_together_and_equal_their_single_answers():
    prompts = [f"Chapter {n}. It is a truth" for n in range(4)]
    with running_server(resolve_model("mimo-nano"), "mimo-nano") as (base, _):
        alone = [httpx.post(f"{base}/v1/completions", json={"model": "mimo-nano", "prompt": p, "max_tokens": 30,
                                                            "ignore_eos": True, "return_token_ids": True}).json()
                 for p in prompts]
    with running_server(resolve_model("mimo-nano"), "mimo-nano", parallel=4) as (base, service):
        results = [None] * 4
        peak = []

        def send(index):
            results[index] = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": "mimo-nano", "prompt": prompts[index], "max_tokens": 30, "ignore_eos": True,
                "return_token_ids": True}).json()

        def watch():
            while any(r is None for r in results):
                peak.append(service.worker.slots_in_use)
                time.sleep(0.005)  # (a busy loop would take the GIL from the in-process server)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)] + [threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert max(peak) >= 2  # requests really ran at the same time
        assert any(r["timings"].get("draft_n", 0) > 0 for r in results)  # with MTP drafts, batched
        metrics = httpx.get(f"{base}/metrics").text
        assert "mimo_slots 4.0" in metrics and "mimo_slots_in_use 0.0" in metrics
    for single, batched in zip(alone, results):
        assert batched["choices"][0]["token_ids"] == single["choices"][0]["token_ids"]


def test_soak_200_requests_from_16_clients_with_cancellations():
    import random

    with running_server(resolve_model("mimo-nano"), "mimo-nano", parallel=4, max_queue=64) as (base, service):
        allocated = None
        outcomes = []

        def client_loop(number):
            rng = random.Random(number)
            for i in range(200 // 16 + (number < 200 % 16)):
                body = {"model": "mimo-nano", "prompt": "word " * rng.randint(1, 40), "ignore_eos": True,
                        "max_tokens": rng.randint(1, 24), "stream": rng.random() < 0.5}
                try:
                    if rng.random() < 0.2:  # hang up after the first streamed line
                        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True},
                                          timeout=120) as response:
                            next(response.iter_lines(), None)
                        outcomes.append("cancelled")
                    else:
                        outcomes.append(httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code)
                except httpx.HTTPError as error:  # pragma: no cover - reported by the assertion below
                    outcomes.append(repr(error))

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        assert len(outcomes) == 200 and set(outcomes) <= {200, 503, "cancelled"}, set(outcomes)
        assert outcomes.count(200) >= 100
        good_request_works(base)
        allocated = sum(slot.cache.nbytes for slot in service.worker.slots if slot.cache is not None)
        assert service.worker.slots_in_use == 0 and service.worker.waiting == 0 and not service.worker.running
        assert not service.worker.batch.generations
        assert allocated <= 4 * service.worker.slots[0].cache.nbytes  # one preallocated cache per slot, no more


def test_a_failure_mid_stream_ends_it_with_an_error_event(nano, monkeypatch):
    from mimo_local.generate import Generation

    base = nano[0]

    def broken_step(self):
        raise RuntimeError("decode step failed")

    monkeypatch.setattr(Generation, "decode_step", broken_step)
    lines = httpx.post(f"{base}/v1/chat/completions", json={"model": "mimo-nano", "messages": MESSAGES,
                                                            "max_tokens": 20, "stream": True}).text.splitlines()
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["message"] == "decode step failed"
    ndjson = httpx.post(f"{base}/api/chat", json={"model": "mimo-nano", "messages": MESSAGES}).text.splitlines()
    assert json.loads(ndjson[-1]) == {"error": "decode step failed"}
    monkeypatch.undo()
    good_request_works(base)


def test_a_hostile_chat_template_is_a_400_and_the_server_goes_on(tmp_path):
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(resolve_model("mimo-nano"), hostile)
    config_path = hostile / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for i in range(10**9) %}{{ 'x' * 20000000 }}{% endfor %}"
    config_path.write_text(json.dumps(config))
    with running_server(hostile, "hostile") as (base, _):
        for path, body in (("/v1/chat/completions", {"model": "hostile", "messages": MESSAGES}),
                           ("/api/chat", {"model": "hostile", "messages": MESSAGES, "stream": False})):
            response = httpx.post(base + path, json=body, timeout=60)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            message = error["message"] if isinstance(error, dict) else error
            assert "template" in message and "\n" not in message
        raw = httpx.post(f"{base}/v1/completions", json={"model": "hostile", "prompt": "It is", "max_tokens": 2})
        assert raw.status_code == 200  # no template involved: still served


def test_without_parallel_the_server_takes_as_many_slots_as_the_memory_plan_fits():
    """4 slots where memory allows (llama-server's default), fewer where only those fit, 1 where
    even one does not (the load then refuses with the plan's verdict)."""
    import dataclasses

    import torch

    from mimo_local.engine import plan_load
    from mimo_local.offload.plan import PlanRequest
    from mimo_local.serve.launch import auto_parallel

    model = resolve_model("mimo-nano")
    request = PlanRequest(gpu_mem=0, cpu_mem=None, ctx=4096, clamp_ctx=True)
    assert auto_parallel(model, request, "cpu", "float32", None) == 4
    need = {slots: plan_load(model, dataclasses.replace(request, sequences=slots, cpu_mem=1 << 50), torch.device("cpu"),
                             torch.float32, None).used("cpu") for slots in (2, 4)}
    between = dataclasses.replace(request, cpu_mem=(need[2] + need[4]) // 2)
    assert auto_parallel(model, between, "cpu", "float32", None) == 2
    assert auto_parallel(model, dataclasses.replace(request, cpu_mem=1 << 20), "cpu", "float32", None) == 1


def test_completions_stream_one_chunk_per_token_even_without_text(scripted_chat):
    """Past its end of text the scripted model writes special tokens, which have no text: each still
    gets its chunk (as llama-server sends them), so a client sees every token arrive."""
    with running_server(scripted_chat, "scripted") as (base, _):
        body = {"model": "scripted", "prompt": "<think>", "max_tokens": 60, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        texts, usage = [], None
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    if chunk["choices"] and not chunk["choices"][0]["finish_reason"]:
                        texts.append(chunk["choices"][0]["text"])
    assert len(texts) == usage["completion_tokens"] == 60
    assert "" in texts and "".join(texts).startswith(THINKING)


def test_concurrent_streams_get_every_token_in_order_with_a_step_handed_over_at_once():
    """Four streams decoded together (MTP on: several tokens per step), a step's tokens crossing to
    the event loop in one hand-over: each stream still gets one chunk per token, in order, its text
    and ids those of the same request alone."""
    prompts = [f"Chapter {n}. It is a truth" for n in range(4)]
    body = {"model": "mimo-nano", "max_tokens": 40, "ignore_eos": True, "return_token_ids": True}
    with running_server(resolve_model("mimo-nano"), "mimo-nano", parallel=4) as (base, service):
        alone = [httpx.post(f"{base}/v1/completions", json={**body, "prompt": p}, timeout=120).json()["choices"][0]
                 for p in prompts]
        streamed = [None] * 4
        peak = []

        def stream(index):
            texts, final = [], None
            with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                              json={**body, "prompt": prompts[index], "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk["choices"][0]["finish_reason"]:
                            final = chunk  # with the answer's token_ids
                        else:
                            texts.append(chunk["choices"][0]["text"])
            streamed[index] = texts, final

        def watch():
            while any(s is None for s in streamed):
                peak.append(service.worker.slots_in_use)
                time.sleep(0.005)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)] + [threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert max(peak) >= 2
    for single, (texts, final) in zip(alone, streamed):
        assert final["token_ids"] == single["token_ids"] and len(texts) == len(single["token_ids"]) == 40
        assert "".join(texts) == single["text"]


def test_hand_over_wakes_each_event_loop_once_and_keeps_each_jobs_order():
    import asyncio

    from mimo_local.sampling import SamplingSettings
    from mimo_local.serve.worker import GenerationRequest, Job, hand_over

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        wake = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: calls.append(args) or wake(*args)
        jobs = [Job(GenerationRequest([1], SamplingSettings()), loop) for _ in range(3)]
        handed = [(job, [f"{index}.{n}" for n in range(index + 1)]) for index, job in enumerate(jobs)]
        worker = threading.Thread(target=hand_over, args=(handed,))  # as the generation thread does
        worker.start()
        worker.join()
        await asyncio.sleep(0)
        return calls, [[job.events.get_nowait() for _ in range(job.events.qsize())] for job in jobs]

    calls, queued = asyncio.run(main())
    assert len(calls) == 1
    assert queued == [["0.0"], ["1.0", "1.1"], ["2.0", "2.1", "2.2"]]


def test_requests_sent_together_to_an_idle_server_are_prefilled_together(monkeypatch):
    """The first request to an idle worker waits for those that follow it within a few milliseconds,
    and all their prompts go through one forward (not the first alone, the others a prefill later)."""
    import asyncio

    from mimo_local import generate
    from mimo_local.engine import Engine
    from mimo_local.generate import DoneEvent
    from mimo_local.sampling import SamplingSettings
    from mimo_local.serve.worker import GenerationRequest, GenerationWorker, Job

    forwards = []
    prefill_together = generate.prefill_together
    monkeypatch.setattr(generate, "prefill_together", lambda gs: forwards.append(len(gs)) or prefill_together(gs))
    engine = Engine.load(resolve_model("mimo-nano"), device="cpu", dtype="float32")
    worker = GenerationWorker(engine, 256, 8, {"draft_tokens": 0}, parallel=4)
    settings = SamplingSettings(temperature=0.0, max_tokens=6)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(GenerationRequest(engine.prompt_ids(f"Chapter {n}. It is a truth"), settings), loop)
                for n in range(4)]
        for job in jobs:
            worker.submit(job)
            time.sleep(0.001)  # as an event loop hands over requests it parsed one after the other
        for job in jobs:
            while not isinstance(await job.events.get(), DoneEvent):
                pass

    try:
        asyncio.run(main())
    finally:
        worker.stop()
    assert forwards == [4], forwards
