"""Scripted checkpoints that really emit MiMo's tool-call tokens (mimo_local/dev/scripted_chat.py),
run through the engine and read back by the server's parser (mimo_local/serve/parsers.py)."""

from __future__ import annotations

import json

import pytest

from mimo_local.dev.scripted_chat import TOOL_ANSWER, TOOL_THINKING, chat_template, make_scripted_chat_checkpoint
from mimo_local.engine import Engine
from mimo_local.errors import MimoError
from mimo_local.sampling import SamplingSettings
from mimo_local.serve.parsers import OutputParser, prompt_ends_in_reasoning, tool_format_for

from weather_tool import PARIS, QUESTION, ROME, WEATHER

TAGS = ("<tool_call>", "</tool_call>", "<function=get_weather>", "</function>", "<parameter=city>", "</parameter>")


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    """MiMo-V2-Flash architecture and template; thinks, says TOOL_ANSWER, then calls for Paris and Rome."""
    path = tmp_path_factory.mktemp("flash") / "scripted"
    make_scripted_chat_checkpoint(path, TOOL_THINKING, TOOL_ANSWER, family="mimo_v2_flash",
                                  template="mimo-v2-flash", tool_calls=[PARIS, ROME])
    return Engine.load(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def mimo7b(tmp_path_factory):
    """MiMo-7B architecture and template; thinks, then one JSON call for Paris (no answer text)."""
    path = tmp_path_factory.mktemp("mimo7b") / "scripted"
    make_scripted_chat_checkpoint(path, TOOL_THINKING, "", family="mimo", template="mimo-7b", tool_calls=[PARIS])
    return Engine.load(path, device="cpu", dtype="float32")


_generated: dict[tuple, list[str]] = {}


def generate(engine: Engine, prompt: str, mtp: bool = False, max_tokens: int = 300) -> list[str]:
    """Greedy generation: the text of each token, in order (kept: greedy runs are deterministic)."""
    key = (engine.path, prompt, mtp, max_tokens)
    if key not in _generated:
        settings = SamplingSettings(temperature=0, max_tokens=max_tokens)
        events = engine.stream(engine.tokenizer.encode(prompt), settings, **engine.speculation(mtp))
        _generated[key] = [event.text for event in events if hasattr(event, "text")]
    return _generated[key]


def parse_stream(engine: Engine, prompt: str, tools, tokens: list[str], parse_reasoning: bool = True):
    """Feed the tokens one by one; returns the parser and the deltas."""
    tool_format = tool_format_for(engine.tokenizer.chat_template, engine.config.family)
    parser = OutputParser(tool_format, tools, prompt_ends_in_reasoning(prompt), parse_reasoning)
    deltas = [parser.feed(text) for text in tokens] + [parser.finish()]
    return parser, deltas


def calls_of(parser: OutputParser) -> list[dict]:
    return [{"name": call.name, "arguments": json.loads(call.arguments)} for call in parser.tool_calls]


def test_flash_thinks_then_streams_two_xml_calls_split_across_tokens(flash):
    assert flash.config.family == "mimo_v2_flash"
    assert tool_format_for(flash.tokenizer.chat_template, flash.config.family) == "xml"
    prompt = flash.tokenizer.render_chat(QUESTION, tools=[WEATHER], enable_thinking=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    tokens = generate(flash, prompt)
    text = "".join(tokens)
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>" in text
    assert not any(tag in token for tag in TAGS for token in tokens)  # every tag arrives in pieces

    parser, deltas = parse_stream(flash, prompt, [WEATHER], tokens)
    assert (parser.reasoning, parser.content) == (TOOL_THINKING, TOOL_ANSWER)
    assert calls_of(parser) == [PARIS, ROME]
    streamed = [call for delta in deltas for call in delta.tool_calls]
    assert [c.index for c in streamed] == [0, 0, 0, 0, 1, 1, 1, 1]  # name, city, days, "}" for each
    assert [c.name for c in streamed if c.name] == ["get_weather", "get_weather"]
    assert "".join(c.arguments for c in streamed if c.index == 1) == parser.tool_calls[1].arguments
    assert len({c.id for c in parser.tool_calls}) == 2


def test_flash_default_prompt_answers_without_thinking(flash):
    prompt = flash.tokenizer.render_chat(QUESTION, tools=[WEATHER])
    assert prompt.endswith("<|im_start|>assistant\n<think></think>")
    parser, _ = parse_stream(flash, prompt, [WEATHER], generate(flash, prompt, mtp=True))
    assert (parser.reasoning, parser.content) == ("", TOOL_ANSWER)
    assert calls_of(parser) == [PARIS, ROME]


def test_prompt_that_opens_the_think_block_itself(flash):
    prompt = flash.tokenizer.render_chat(QUESTION, tools=[WEATHER], enable_thinking=True) + "<think>"
    assert prompt_ends_in_reasoning(prompt)
    parser, _ = parse_stream(flash, prompt, [WEATHER], generate(flash, prompt))
    assert (parser.reasoning, parser.content) == (TOOL_THINKING, TOOL_ANSWER)
    assert calls_of(parser) == [PARIS, ROME]


def test_reasoning_format_none_and_no_tools(flash):
    prompt = flash.tokenizer.render_chat(QUESTION, tools=[WEATHER], enable_thinking=True)
    tokens = generate(flash, prompt)
    parser, _ = parse_stream(flash, prompt, [WEATHER], tokens, parse_reasoning=False)
    assert parser.content == f"<think>{TOOL_THINKING}</think>{TOOL_ANSWER}"
    assert calls_of(parser) == [PARIS, ROME]
    parser, _ = parse_stream(flash, prompt, None, tokens)
    assert parser.content == "".join(tokens).split("</think>")[1] and parser.tool_calls == []


def test_call_cut_off_by_max_tokens(flash):
    prompt = flash.tokenizer.render_chat(QUESTION, tools=[WEATHER])
    tokens = generate(flash, prompt)
    cut = next(i for i in range(len(tokens)) if "<parameter=days>" in "".join(tokens[: i + 1]))
    parser, _ = parse_stream(flash, prompt, [WEATHER], generate(flash, prompt, max_tokens=cut + 1))
    assert calls_of(parser) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert parser.content.startswith(TOOL_ANSWER) and "<parameter=days>" in parser.content


def test_mimo7b_thinks_then_writes_a_json_call(mimo7b):
    assert tool_format_for(mimo7b.tokenizer.chat_template, mimo7b.config.family) == "json"
    prompt = mimo7b.tokenizer.render_chat(QUESTION, tools=[WEATHER])
    assert prompt.endswith("<|im_start|>assistant\n") and not prompt_ends_in_reasoning(prompt)
    tokens = generate(mimo7b, prompt)
    assert generate(mimo7b, prompt, mtp=True) == tokens
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    assert call in "".join(tokens)
    assert not any("<tool_call>" in token or "</tool_call>" in token for token in tokens)
    parser, deltas = parse_stream(mimo7b, prompt, [WEATHER], tokens)
    assert (parser.reasoning, parser.content) == (TOOL_THINKING, "")
    assert calls_of(parser) == [PARIS]
    assert [(c.index, c.name) for d in deltas for c in d.tool_calls] == [(0, "get_weather")]


def test_templates_and_bad_arguments():
    assert "<function=example_function_name>" in chat_template("mimo-v2-flash")
    assert "<tool_call>" in chat_template("mimo-7b") and "<function=" not in chat_template("mimo-7b")
    with pytest.raises(MimoError, match="unknown chat template"):
        chat_template("llama")
    with pytest.raises(MimoError, match="unknown family"):
        make_scripted_chat_checkpoint("/nonexistent/x", family="gpt")


def test_template_whose_generation_prompt_opens_the_think_block(tmp_path):
    template = chat_template("mimo-7b").replace("{{- '<|im_start|>assistant\\n' }}",
                                                "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert template != chat_template("mimo-7b")
    path = make_scripted_chat_checkpoint(tmp_path / "scripted", TOOL_THINKING, TOOL_ANSWER, template=template,
                                         tool_calls=[PARIS])
    engine = Engine.load(path, device="cpu", dtype="float32")
    prompt = engine.tokenizer.render_chat(QUESTION, tools=[WEATHER])
    assert prompt.endswith("assistant\n<think>\n") and prompt_ends_in_reasoning(prompt)
    tokens = generate(engine, prompt)
    assert not "".join(tokens).startswith("<think>")
    parser, _ = parse_stream(engine, prompt, [WEATHER], tokens)
    assert (parser.reasoning, parser.content) == (TOOL_THINKING, TOOL_ANSWER)
    assert calls_of(parser) == [PARIS]
