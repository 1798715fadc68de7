"""The reasoning/tool-call parsers of `mimo serve` (mimo_local/serve/parsers.py).

Every case is fed whole, a character at a time, split at every single point and in random chunks:
the totals must not depend on where the text was cut (tags split mid-token included)."""

from __future__ import annotations

import json
import random
import re

import pytest

from mimo_local.serve.parsers import (
    OutputParser,
    parse_output,
    prompt_ends_in_reasoning,
    tool_format_for,
)

from weather_tool import WEATHER
TYPED = {
    "type": "function",
    "function": {
        "name": "configure",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "count": {"type": "integer"},
                "ratio": {"type": "number"},
                "enabled": {"type": "boolean"},
                "options": {"type": "object"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "nothing": {"type": "null"},
                "maybe": {"type": ["integer", "null"]},
            },
        },
    },
}
TOOLS = [WEATHER, TYPED]


def xml_call(function: str, /, **parameters) -> str:
    body = "".join(f"<parameter={key}>{value}</parameter>\n" for key, value in parameters.items())
    return f"<tool_call>\n<function={function}>\n{body}</function>\n</tool_call>"


def json_call(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def chunkings(text: str):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    generator = random.Random(len(text))
    for _ in range(30):
        chunks, start = [], 0
        while start < len(text):
            size = generator.randint(1, 7)
            chunks.append(text[start : start + size])
            start += size
        yield chunks


def run(chunks: list[str], tool_format="xml", tools=TOOLS, in_reasoning=False, parse_reasoning=True):
    """Feed `chunks`; return (reasoning, content, [(name, arguments)]) rebuilt from the deltas,
    after checking they agree with the parser's own totals and complete calls."""
    parser = OutputParser(tool_format, tools, in_reasoning, parse_reasoning)
    deltas = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    streamed: dict[int, dict] = {}
    for delta in deltas:
        for call in delta.tool_calls:
            if call.index not in streamed:
                assert call.id and re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id) and call.name
                streamed[call.index] = {"id": call.id, "name": call.name, "arguments": ""}
            else:
                assert call.id is None and call.name is None
            streamed[call.index]["arguments"] += call.arguments
    assert sorted(streamed) == list(range(len(streamed)))
    assert (reasoning, content) == (parser.reasoning, parser.content)
    complete = parser.tool_calls
    assert [(c.id, c.name, c.arguments) for c in complete] == [
        (s["id"], s["name"], s["arguments"]) for _, s in sorted(streamed.items())
    ]
    for call in complete:
        assert isinstance(json.loads(call.arguments), dict)
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in complete]


def parsed_everywhere(text: str, **options):
    """The result, checked to be the same for every way of cutting `text`."""
    expected = run([text], **options)
    for chunks in chunkings(text):
        assert run(chunks, **options) == expected, chunks
    return expected


def test_plain_answer_is_content_unchanged():
    text = "  Hello!\n\nHow are you? <b>bold</b> and a < sign\n"
    assert parsed_everywhere(text) == ("", text, [])
    assert parsed_everywhere(text, tools=None) == ("", text, [])


def test_reasoning_is_split_off_and_the_newlines_around_the_tags_dropped():
    text = "<think>\nFirst, the user greets me.\nSo I greet back.\n</think>\n\nHello there!"
    assert parsed_everywhere(text) == ("First, the user greets me.\nSo I greet back.", "Hello there!", [])


def test_think_after_leading_whitespace_opens_reasoning_but_later_think_is_text():
    assert parsed_everywhere("\n <think>plan</think>answer") == ("plan", "answer", [])
    assert parsed_everywhere("answer <think>not reasoning</think>") == ("", "answer <think>not reasoning</think>", [])


def test_prompt_that_opened_the_think_block():
    text = "\nStill thinking.\n</think>\n\nThe answer."
    assert parsed_everywhere(text, in_reasoning=True) == ("Still thinking.", "The answer.", [])
    # cut off before </think>: everything is reasoning
    assert parsed_everywhere("Thinking on and on", in_reasoning=True) == ("Thinking on and on", "", [])


def test_empty_think_block_of_thinking_off():
    assert parsed_everywhere("<think>\n\n</think>\n\nDirect answer.") == ("", "Direct answer.", [])


def test_stray_close_tag_in_content_stays_content():
    assert parsed_everywhere("a </think> b") == ("", "a </think> b", [])


def test_reasoning_format_none_keeps_the_raw_text():
    text = "<think>\nplan\n</think>\n\nanswer"
    assert parsed_everywhere(text, parse_reasoning=False, tools=None) == ("", text, [])
    assert parsed_everywhere("plan</think>answer", parse_reasoning=False, in_reasoning=True) == (
        "", "plan</think>answer", [])


def test_reasoning_format_none_still_reads_no_calls_inside_the_think_block():
    inside = xml_call("get_weather", city="Oslo")
    after = xml_call("get_weather", city="Paris", days=2)
    text = f"<think>maybe {inside}</think>{after}"
    assert parsed_everywhere(text, parse_reasoning=False) == (
        "", f"<think>maybe {inside}</think>", [("get_weather", {"city": "Paris", "days": 2})])


def test_xml_call_with_text_before_and_after():
    text = "<think>Need the weather.</think>\n\nLet me look.\n\n" + xml_call("get_weather", city="Paris", days=3)
    assert parsed_everywhere(text) == (
        "Need the weather.", "Let me look.", [("get_weather", {"city": "Paris", "days": 3})])
    text = xml_call("get_weather", city="Paris") + "\n\nDone."
    assert parsed_everywhere(text) == ("", "Done.", [("get_weather", {"city": "Paris"})])


def test_xml_arguments_stream_per_parameter():
    parser = OutputParser("xml", TOOLS, in_reasoning=False)
    assert parser.feed("<tool_call>\n<function=get_wea").tool_calls == []
    first = parser.feed("ther>\n<parameter=city>Par").tool_calls
    assert len(first) == 1 and first[0].name == "get_weather" and first[0].arguments == ""
    assert [c.arguments for c in parser.feed("is</parameter>\n<parameter=days>4").tool_calls] == ['{"city": "Paris"']
    assert [c.arguments for c in parser.feed("</parameter>\n</func").tool_calls] == [', "days": 4']
    assert [c.arguments for c in parser.feed("tion>\n</tool_call>").tool_calls] == ["}"]
    assert not parser.finish()
    assert parser.tool_calls[0].arguments == '{"city": "Paris", "days": 4}'


def test_only_a_possible_tag_is_held_back():
    parser = OutputParser("xml", TOOLS, in_reasoning=False)
    assert parser.feed("<think>I think <").reasoning == "I think "
    assert parser.feed("/thi").reasoning == ""
    assert parser.feed("nk>The weather <tool").content == "The weather"
    assert parser.feed("s> are").content == " <tools> are"
    parser = OutputParser("json", None, in_reasoning=False)
    assert parser.feed("<tool_call>").content == "<tool_call>"  # no tools: nothing is held


def test_two_parallel_calls_get_index_0_and_1():
    text = xml_call("get_weather", city="Paris", days=1) + "\n" + xml_call("get_weather", city="Rome", days=2)
    assert parsed_everywhere(text) == ("", "", [
        ("get_weather", {"city": "Paris", "days": 1}), ("get_weather", {"city": "Rome", "days": 2})])
    text = json_call("get_weather", {"city": "Paris"}) + "\n" + json_call("configure", {"count": 2})
    assert parsed_everywhere(text, tool_format="json") == ("", "", [
        ("get_weather", {"city": "Paris"}), ("configure", {"count": 2})])


def test_two_functions_in_one_tool_call_block():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n</function>\n"
            "<function=get_weather>\n<parameter=city>Rome</parameter>\n</function>\n</tool_call>")
    assert parsed_everywhere(text) == ("", "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})])


def test_a_call_inside_think_is_reasoning():
    inside = xml_call("get_weather", city="Oslo")
    text = f"<think>I could write {inside} but not here.</think>No call."
    assert parsed_everywhere(text) == (f"I could write {inside} but not here.", "No call.", [])
    text = f"{inside}\n</think>\n\nAnswer."
    assert parsed_everywhere(text, in_reasoning=True) == (inside, "Answer.", [])


def test_no_tools_leaves_tool_call_text_in_content():
    text = "Sure.\n" + xml_call("get_weather", city="Paris")
    assert parsed_everywhere(text, tools=None) == ("", text, [])
    assert parsed_everywhere(text, tools=[]) == ("", text, [])


@pytest.mark.parametrize("text", [
    "Hi <tool_call>\n<function=unknown_tool>\n<parameter=a>1</parameter>\n</function>\n</tool_call> bye",
    "<tool_call>\nnot a function at all\n</tool_call>",
    "<tool_call>\n<function=get_weather",  # cut off before the function was named
    "<tool_call><tool_call>",
    "a <tool_call",
])
def test_malformed_xml_is_content(text):
    assert parsed_everywhere(text) == ("", text, [])


def test_xml_call_cut_off_after_its_name_is_closed_with_what_it_has():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=days>3"
    assert parsed_everywhere(text) == ("", "<parameter=days>3", [("get_weather", {"city": "Paris"})])
    assert parsed_everywhere("<tool_call>\n<function=get_weather>\n") == ("", "", [("get_weather", {})])


def test_a_malformed_call_next_to_a_good_one():
    good = xml_call("get_weather", city="Paris")
    bad = "<tool_call>\n<function=nope>\n</function>\n</tool_call>"
    assert parsed_everywhere(f"{bad}\n{good}") == ("", bad, [("get_weather", {"city": "Paris"})])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',  # invalid JSON
    '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
    '<tool_call>\n["get_weather"]\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": 3}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # never closed
])
def test_malformed_json_is_content(text):
    assert parsed_everywhere(text, tool_format="json") == ("", text, [])


def test_json_call_with_string_arguments_and_text_around():
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>'
    assert parsed_everywhere(text, tool_format="json") == ("", "Checking.", [("get_weather", {"city": "Paris"})])


def test_xml_values_are_cast_to_the_schema_types():
    text = xml_call(
        "configure", name="007", count="12", ratio="0.5", enabled="True",
        options='{"a": [1, 2]}', tags='["x", "y"]', nothing="null", maybe="None", unknown="42",
    )
    assert parsed_everywhere(text)[2] == [("configure", {
        "name": "007", "count": 12, "ratio": 0.5, "enabled": True, "options": {"a": [1, 2]},
        "tags": ["x", "y"], "nothing": None, "maybe": None, "unknown": "42",
    })]


def test_values_that_do_not_fit_their_type_stay_strings():
    text = xml_call("configure", count="twelve", enabled="yes", options="{broken", tags='{"not": "a list"}')
    assert parsed_everywhere(text)[2] == [("configure", {
        "count": "twelve", "enabled": "yes", "options": "{broken", "tags": '{"not": "a list"}'})]


def test_string_values_are_verbatim_except_qwen3_coder_framing_newlines():
    code = "def f():\n    return 1\n"
    text = xml_call("configure", name=code)
    assert parsed_everywhere(text)[2] == [("configure", {"name": code})]
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    assert parsed_everywhere(text)[2] == [("get_weather", {"city": "New York", "days": 2})]
    text = xml_call("get_weather", city="  <b>Paris</b> & co  ")
    assert parsed_everywhere(text)[2] == [("get_weather", {"city": "  <b>Paris</b> & co  "})]


def test_tool_format_for():
    assert tool_format_for("... <function=example_function_name> ...", "mimo") == "xml"
    assert tool_format_for('... <tool_call>\n{"name": ...', "mimo_v2_flash") == "json"
    assert tool_format_for(None, "mimo_v2_flash") == "xml"
    assert tool_format_for(None, "mimo_v2") == "xml"
    assert tool_format_for("{{ messages }}", "mimo") == "json"


def test_prompt_ends_in_reasoning():
    assert prompt_ends_in_reasoning("<|im_start|>assistant\n<think>")
    assert prompt_ends_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n")
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n<think></think>")
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_parse_output_matches_the_streaming_parser():
    text = "<think>hm</think>" + json_call("get_weather", {"city": "Paris", "days": 2})
    reasoning, content, calls = parse_output(text, "json", TOOLS, in_reasoning=False)
    assert (reasoning, content) == ("hm", "")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]
    assert calls[0].id.startswith("call_")


def test_unknown_tool_format_is_refused():
    with pytest.raises(ValueError):
        OutputParser("yaml", TOOLS, in_reasoning=False)
