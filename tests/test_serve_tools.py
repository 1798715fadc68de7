"""Reasoning and tool calls through `mimo serve`, on scripted checkpoints whose greedy output is
MiMo's real tool-call tokens (MiMo-V2-Flash XML, MiMo-7B JSON), with the openai and ollama clients."""

import json

import httpx
import ollama
import openai
import pytest

from mimo_local.dev.scripted_chat import TOOL_ANSWER, TOOL_THINKING, make_scripted_chat_checkpoint
from serve_server import running_server

from weather_tool import PARIS, QUESTION, ROME, WEATHER

THINKING_ON = {"chat_template_kwargs": {"enable_thinking": True}}


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    path = tmp_path_factory.mktemp("flash") / "scripted"
    make_scripted_chat_checkpoint(path, TOOL_THINKING, TOOL_ANSWER, family="mimo_v2_flash",
                                  template="mimo-v2-flash", tool_calls=[PARIS, ROME])
    with running_server(path, "flash", defaults=None) as (base, _):
        yield base


@pytest.fixture(scope="module")
def mimo7b(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimo7b") / "scripted"
    make_scripted_chat_checkpoint(path, TOOL_THINKING, "", family="mimo", template="mimo-7b", tool_calls=[PARIS])
    with running_server(path, "mimo7b", defaults=None) as (base, _):
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def calls(message) -> list[dict]:
    return [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls]


def test_v2_flash_reasoning_and_parallel_xml_calls(flash):
    answer = client(flash).chat.completions.create(model="flash", messages=QUESTION, tools=[WEATHER], temperature=0,
                                                   extra_body=THINKING_ON)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.model_dump()["message"]
    assert message["reasoning_content"] == message["reasoning"] == TOOL_THINKING
    assert message["content"].strip() == TOOL_ANSWER and "<" not in message["content"]
    assert calls(choice.message) == [PARIS, ROME]
    assert len({c.id for c in choice.message.tool_calls}) == 2


def test_v2_flash_calls_stream_with_indexes_and_argument_fragments(flash):
    chunks = list(client(flash).chat.completions.create(model="flash", messages=QUESTION, tools=[WEATHER],
                                                        temperature=0, stream=True, extra_body=THINKING_ON))
    reasoning = "".join(c.choices[0].delta.model_dump().get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == TOOL_THINKING and content.strip() == TOOL_ANSWER
    names, arguments, ids = {}, {}, {}
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or []:
            if call.id:
                ids[call.index] = call.id
            if call.function.name:
                names[call.index] = call.function.name
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    assert names == {0: "get_weather", 1: "get_weather"} and len(set(ids.values())) == 2
    assert [json.loads(arguments[i]) for i in (0, 1)] == [PARIS["arguments"], ROME["arguments"]]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_go_back_through_the_template(flash):
    first = client(flash).chat.completions.create(model="flash", messages=QUESTION, tools=[WEATHER], temperature=0,
                                                  max_tokens=300, extra_body=THINKING_ON).choices[0].message
    history = QUESTION + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny"})}
        for call in first.tool_calls]
    again = client(flash).chat.completions.create(model="flash", messages=history, tools=[WEATHER], temperature=0,
                                                  max_tokens=5, extra_body={"return_token_ids": True})
    prompt = httpx.post(f"{flash}/detokenize", json={"tokens": again.model_dump()["prompt_token_ids"]}).json()["content"]
    assert prompt.count('{"forecast": "sunny"}') == 2  # both results, through the template
    assert prompt.count("<function=get_weather>") == 2 and "<parameter=city>Rome</parameter>" in prompt


def test_reasoning_format_none_keeps_the_raw_tags(flash):
    answer = client(flash).chat.completions.create(model="flash", messages=QUESTION, temperature=0, max_tokens=40,
                                                   extra_body={**THINKING_ON, "reasoning_format": "none"})
    content = answer.choices[0].message.content
    assert content.startswith("<think>" + TOOL_THINKING + "</think>")


def test_tool_choice_none_leaves_calls_unparsed_and_unshown(flash):
    answer = client(flash).chat.completions.create(model="flash", messages=QUESTION, tools=[WEATHER], temperature=0,
                                                   tool_choice="none", max_tokens=300, extra_body=THINKING_ON)
    assert not answer.choices[0].message.tool_calls and answer.choices[0].finish_reason == "stop"


def test_mimo_7b_json_call(mimo7b):
    answer = client(mimo7b).chat.completions.create(model="mimo7b", messages=QUESTION, tools=[WEATHER],
                                                    temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and calls(choice.message) == [PARIS]
    assert choice.model_dump()["message"]["reasoning_content"] == TOOL_THINKING
    assert not choice.message.content


def test_ollama_client_gets_thinking_and_tool_calls_as_objects(flash):
    answer = ollama.Client(host=flash).chat(model="flash", messages=QUESTION, tools=[WEATHER], think=True,
                                            options={"temperature": 0})
    assert answer.message.thinking == TOOL_THINKING
    assert [{"name": c.function.name, "arguments": dict(c.function.arguments)} for c in answer.message.tool_calls] \
        == [PARIS, ROME]
    streamed = list(ollama.Client(host=flash).chat(model="flash", messages=QUESTION, tools=[WEATHER], think=True,
                                                   stream=True, options={"temperature": 0}))
    assert "".join(part.message.thinking or "" for part in streamed) == TOOL_THINKING
    assert len(streamed[-1].message.tool_calls) == 2 and streamed[-1].done


def test_parallel_tool_calls_false_keeps_the_first_call(flash):
    answer = client(flash).chat.completions.create(model="flash", messages=QUESTION, tools=[WEATHER], temperature=0,
                                                   parallel_tool_calls=False, extra_body=THINKING_ON)
    assert calls(answer.choices[0].message) == [PARIS]
    chunks = list(client(flash).chat.completions.create(model="flash", messages=QUESTION, tools=[WEATHER],
                                                        temperature=0, parallel_tool_calls=False, stream=True,
                                                        extra_body=THINKING_ON))
    indexes = {call.index for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []}
    assert indexes == {0}
