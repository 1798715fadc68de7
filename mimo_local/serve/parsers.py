"""Streaming parsers for MiMo's output: `<think>` reasoning and tool calls.

MiMo writes its reasoning as `<think>...</think>` before the answer, and tool calls after it:
MiMo-V2-Flash and later in XML (the template's own words: "the value enclosed between parameter
tags is preserved exactly as-is"),

    <tool_call>
    <function=get_weather>
    <parameter=city>Paris</parameter>
    <parameter=days>3</parameter>
    </function>
    </tool_call>

and MiMo-7B in the Qwen2.5 JSON form, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Text arrives a token at a time, so a tag can be split anywhere: each stage holds back only a tail
that could still become a tag and passes everything else on at once. Facts about the formats come
from the MiMo chat templates and from vLLM's and SGLang's MiMo/Qwen parsers; the code is our own.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
MAX_TAG_NAME = 256  # a `<function=` or `<parameter=` name longer than this is not a tag

ToolFormat = Literal["xml", "json"]
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def tool_format_for(chat_template: str | None, model_type: str) -> ToolFormat:
    """XML for MiMo-V2-Flash and later (or any template that teaches `<function=`), JSON for MiMo-7B."""
    if chat_template and FUNCTION_OPEN in chat_template:
        return "xml"
    if chat_template and CALL_OPEN in chat_template:
        return "json"
    return "xml" if model_type.startswith("mimo_v2") else "json"


def prompt_ends_in_reasoning(rendered_prompt: str) -> bool:
    """Whether the generation prompt opened a think block (the template wrote `<think>` itself)."""
    return rendered_prompt.rstrip().endswith(THINK_OPEN)


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # on the first delta of a call only
    name: str | None = None  # on the first delta of a call only
    arguments: str = ""  # a fragment: a call's fragments joined are its final JSON arguments


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's `function.arguments`)


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: "ParsedDelta") -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def _held_tail(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`."""
    longest = 0
    for tag in tags:
        for length in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:length]):
                longest = length
                break
    return longest


def _is_tag_prefix(text: str, tag: str) -> bool:
    return len(text) < len(tag) and tag.startswith(text)


class _ReasoningSplitter:
    """Splits output into reasoning and content. A think block is open from the start when the
    prompt opened it (`in_reasoning`), or when the output starts with `<think>` (after whitespace).
    With `raw` (--reasoning-format none) the block stays in the text, tags and all, but is still
    marked so that the tool-call stage never reads calls inside it."""

    def __init__(self, in_reasoning: bool, raw: bool):
        self.raw = raw
        self.state = "reasoning" if in_reasoning else "start"
        self.buffer = ""
        self.trim_newlines = not raw  # drop the newlines right after an opening/closing tag

    def feed(self, text: str) -> list[tuple[str, str]]:
        """(kind, text) segments, kind "reasoning" or "content", in order."""
        self.buffer += text
        segments: list[tuple[str, str]] = []
        while self._step(segments):
            pass
        return [(kind, part) for kind, part in segments if part]

    def _step(self, segments: list[tuple[str, str]]) -> bool:
        """Consume what can be decided from the buffer; False when more text is needed."""
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if not stripped or _is_tag_prefix(stripped, THINK_OPEN):
                return False
            if stripped.startswith(THINK_OPEN):
                if self.raw:
                    segments.append(("reasoning", self.buffer[: len(self.buffer) - len(stripped) + len(THINK_OPEN)]))
                self.buffer = stripped[len(THINK_OPEN):]
                self.state = "reasoning"
            else:
                self.state = "content"
                self.trim_newlines = False
            return True
        if self.trim_newlines:
            self.buffer = self.buffer.lstrip("\n")
            if not self.buffer:
                return False
            self.trim_newlines = False
        if self.state == "content":
            segments.append(("content", self.buffer))
            self.buffer = ""
            return False
        end = self.buffer.find(THINK_CLOSE)
        if end >= 0:
            reasoning = self.buffer[: end + len(THINK_CLOSE)] if self.raw else self.buffer[:end].rstrip("\n")
            segments.append(("reasoning", reasoning))
            self.buffer = self.buffer[end + len(THINK_CLOSE):]
            self.state = "content"
            self.trim_newlines = not self.raw
            return True
        ready = self.buffer[: len(self.buffer) - _held_tail(self.buffer, (THINK_CLOSE,))]
        if not self.raw:  # newlines right before `</think>` are dropped: hold them until we know
            ready = ready.rstrip("\n")
        segments.append(("reasoning", ready))
        self.buffer = self.buffer[len(ready):]
        return False

    def finish(self) -> list[tuple[str, str]]:
        rest, self.buffer = self.buffer, ""
        if not rest:
            return []
        if self.state == "reasoning":
            return [("reasoning", rest if self.raw else rest.rstrip("\n"))]
        return [("content", rest)]


@dataclass
class _OpenCall:
    index: int
    id: str
    name: str
    arguments: str = ""  # streamed so far


class _ToolCallExtractor:
    """Finds tool calls in the content stream. A well-formed call becomes a tool call; what is not
    one (an unknown function, bad JSON, a call cut off before it named its function) stays in the
    content as the text the model wrote. An XML call is committed, and streams, once its
    `<function=NAME>` names a known tool; one cut off after that is closed with what it has."""

    def __init__(self, tool_format: ToolFormat, tools: list[dict]):
        self.tool_format = tool_format
        self.schemas: dict[str, dict] = {}  # tool name -> its parameters' JSON-schema properties
        for tool in tools:
            function = tool.get("function", tool) if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                parameters = function.get("parameters")
                properties = parameters.get("properties") if isinstance(parameters, dict) else None
                self.schemas[function["name"]] = properties if isinstance(properties, dict) else {}
        self.buffer = ""
        self.state = "text"  # text, or inside a call: json | header, body, tail (XML)
        self.held_space = ""  # whitespace before a possible call: dropped if a call follows
        self.after_call = False  # only whitespace since the last call
        self.content_written = False
        self.functions_in_block = 0  # XML: functions completed in the current <tool_call> block
        self.searched = 0  # how much of the buffer holds no start of the closing tag awaited
        self.open_call: _OpenCall | None = None
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> ParsedDelta:
        self.buffer += text
        delta = ParsedDelta()
        while self._step(delta):
            pass
        return delta

    def finish(self) -> ParsedDelta:
        delta = ParsedDelta()
        rest = self.buffer.strip()
        if self.open_call is not None:  # cut off inside a function: close it with what it has
            self._close_call(delta)
            self._write(delta, rest)
        elif self.state == "text":
            self._text(delta, self.buffer, final=True)
        elif self.functions_in_block:  # after a complete function, before `</tool_call>`
            if not any(_is_tag_prefix(rest, tag) for tag in (CALL_CLOSE, FUNCTION_OPEN)):
                self._write(delta, rest)
        else:  # never became a call: it is text
            self._write(delta, self.held_space + CALL_OPEN + self.buffer)
        self.buffer = self.held_space = ""
        self.state = "text"
        self.searched = 0
        return delta

    def _step(self, delta: ParsedDelta) -> bool:
        """Consume what can be decided from the buffer; False when more text is needed."""
        if self.state == "text":
            start = self.buffer.find(CALL_OPEN)
            if start < 0:
                ready = len(self.buffer) - _held_tail(self.buffer, (CALL_OPEN,))
                self._text(delta, self.buffer[:ready])
                self.buffer = self.buffer[ready:]
                return False
            self._text(delta, self.buffer[:start])
            self.buffer = self.buffer[start + len(CALL_OPEN):]
            self.state = "header" if self.tool_format == "xml" else "json"
            return True
        if self.state == "json":
            return self._json_call(delta)
        return self._xml_step(delta)

    def _text(self, delta: ParsedDelta, text: str, final: bool = False) -> None:
        """Content outside calls. Whitespace between a call and text (or another call) is a
        separator, not content; it is held back until it is known which."""
        text = self.held_space + text
        body = text if final else text.rstrip()
        self.held_space = text[len(body):]
        if self.after_call:
            if not body.strip():
                return
            if not self.content_written:
                body = body.lstrip()
            self.after_call = False
        self._write(delta, body)

    def _write(self, delta: ParsedDelta, text: str) -> None:
        if text:
            delta.content += text
            self.content_written = True
            self.after_call = False

    def _not_a_call(self, delta: ParsedDelta) -> None:
        """What follows `<tool_call>` is no call: the tag is content, and the rest is read as text."""
        self._write(delta, self.held_space + CALL_OPEN)
        self.held_space = ""
        self.state = "text"

    def _call_committed(self) -> None:
        self.held_space = ""
        self.after_call = False

    # MiMo-7B: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    def _json_call(self, delta: ParsedDelta) -> bool:
        end = self.buffer.find(CALL_CLOSE, self.searched)
        if end < 0:
            self.searched = max(0, len(self.buffer) - len(CALL_CLOSE) + 1)
            return False
        self.searched = 0
        body = self.buffer[:end]
        self.buffer = self.buffer[end + len(CALL_CLOSE):]
        self.state = "text"
        parsed = self._json_call_body(body)
        if parsed is None:
            self._write(delta, self.held_space + CALL_OPEN + body + CALL_CLOSE)
            self.held_space = ""
            return True
        self._call_committed()
        call = ToolCall(new_call_id(), *parsed)
        delta.tool_calls.append(ToolCallDelta(len(self.calls), call.id, call.name, call.arguments))
        self.calls.append(call)
        self.after_call = True
        return True

    def _json_call_body(self, body: str) -> tuple[str, str] | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.schemas:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return value["name"], json.dumps(arguments, ensure_ascii=False)

    # MiMo-V2-Flash and later: `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...`
    def _xml_step(self, delta: ParsedDelta) -> bool:
        stripped = self.buffer.lstrip()
        if self.state == "header":
            return self._function_header(delta, stripped)
        if self.state == "body":
            if not stripped or any(_is_tag_prefix(stripped, tag) for tag in (PARAMETER_OPEN, FUNCTION_CLOSE)):
                return False
            if stripped.startswith(FUNCTION_CLOSE):
                self.buffer = stripped[len(FUNCTION_CLOSE):]
                self._close_call(delta)
                self.functions_in_block += 1
                self.state = "tail"
                return True
            if stripped.startswith(PARAMETER_OPEN):
                return self._parameter(delta, stripped)
            # Text inside the function that is not a parameter: content, up to the next tag.
            junk_end = stripped.find("<", 1)
            junk_end = junk_end if junk_end > 0 else len(stripped)
            self._write(delta, stripped[:junk_end])
            self.buffer = stripped[junk_end:]
            return True
        # tail: after `</function>` comes `</tool_call>`, or another function of the same block
        if not stripped or any(_is_tag_prefix(stripped, tag) for tag in (CALL_CLOSE, FUNCTION_OPEN)):
            return False
        if stripped.startswith(FUNCTION_OPEN):
            self.buffer = stripped
            self.state = "header"
            return True
        self.buffer = stripped[len(CALL_CLOSE):] if stripped.startswith(CALL_CLOSE) else stripped
        self.state = "text"
        self.functions_in_block = 0
        self.after_call = True
        return True

    def _function_header(self, delta: ParsedDelta, stripped: str) -> bool:
        if not stripped or _is_tag_prefix(stripped, FUNCTION_OPEN):
            return False
        name_end = stripped.find(">", len(FUNCTION_OPEN)) if stripped.startswith(FUNCTION_OPEN) else -1
        name = stripped[len(FUNCTION_OPEN):name_end]
        if stripped.startswith(FUNCTION_OPEN) and name_end < 0:
            pending = stripped[len(FUNCTION_OPEN):]
            if len(pending) <= MAX_TAG_NAME and "\n" not in pending:
                return False  # the name is still arriving
        if name_end < 0 or name not in self.schemas:
            if self.functions_in_block:  # a broken second function: the rest of the block is text
                self.state = "text"
                self.functions_in_block = 0
                self.buffer = stripped
                return True
            self._not_a_call(delta)
            return True
        self.buffer = stripped[name_end + 1:]
        self._call_committed()
        self.open_call = _OpenCall(len(self.calls), new_call_id(), name)
        delta.tool_calls.append(ToolCallDelta(self.open_call.index, self.open_call.id, name, ""))
        self.state = "body"
        return True

    def _parameter(self, delta: ParsedDelta, stripped: str) -> bool:
        self.buffer = stripped
        key_end = stripped.find(">", len(PARAMETER_OPEN))
        if key_end < 0:
            if len(stripped) - len(PARAMETER_OPEN) > MAX_TAG_NAME:  # not a tag after all: text
                self._write(delta, stripped[: len(PARAMETER_OPEN)])
                self.buffer = stripped[len(PARAMETER_OPEN):]
                return True
            return False
        value_end = stripped.find(PARAMETER_CLOSE, max(key_end + 1, self.searched))
        if value_end < 0:  # a long value arrives over many tokens: search only the new text next time
            self.searched = max(0, len(stripped) - len(PARAMETER_CLOSE) + 1)
            return False
        self.searched = 0
        key = stripped[len(PARAMETER_OPEN):key_end].strip()
        call = self.open_call
        value = _parameter_value(stripped[key_end + 1:value_end], self.schemas[call.name].get(key))
        fragment = ("{" if not call.arguments else ", ") + json.dumps(key, ensure_ascii=False) + ": "
        fragment += json.dumps(value, ensure_ascii=False)
        call.arguments += fragment
        delta.tool_calls.append(ToolCallDelta(call.index, arguments=fragment))
        self.buffer = stripped[value_end + len(PARAMETER_CLOSE):]
        return True

    def _close_call(self, delta: ParsedDelta) -> None:
        call, self.open_call = self.open_call, None
        fragment = "}" if call.arguments else "{}"
        call.arguments += fragment
        delta.tool_calls.append(ToolCallDelta(call.index, arguments=fragment))
        self.calls.append(ToolCall(call.id, call.name, call.arguments))
        self.after_call = True


_TRUE, _FALSE, _NULL = ("true",), ("false",), ("null", "none")


def _parameter_value(text: str, schema: dict | None):
    """An XML parameter value, cast to its JSON-schema type. Values are verbatim (MiMo's template
    promises so); only a value laid out on lines of its own (`<parameter=k>\\nV\\n</parameter>`,
    Qwen3-Coder's layout) loses those two framing newlines. A value that does not parse as its
    type stays the string the model wrote."""
    if len(text) >= 2 and text.startswith("\n") and text.endswith("\n"):
        text = text[1:-1]
    types = schema.get("type") if isinstance(schema, dict) else None
    types = [types] if isinstance(types, str) else [t for t in types or [] if isinstance(t, str)]
    if not types or types == ["string"]:
        return text
    word = text.strip()
    if "null" in types and word.lower() in _NULL:
        return None
    if "boolean" in types and word.lower() in _TRUE + _FALSE:
        return word.lower() in _TRUE
    try:
        value = json.loads(word)
    except ValueError:
        return text
    if isinstance(value, float) and "integer" in types and "number" not in types and value.is_integer():
        value = int(value)
    matches = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "null": value is None,
    }
    return value if any(matches.get(t, False) for t in types) else text


class OutputParser:
    """Feed the model's text as it streams; get reasoning, content and tool-call deltas back.

    `in_reasoning`: the prompt ended inside a think block (see `prompt_ends_in_reasoning`).
    `parse_reasoning=False` (--reasoning-format none): the think block stays in the content, tags
    and all. Tool calls are parsed only when `tools` is non-empty, and never inside a think block."""

    def __init__(self, tool_format: ToolFormat, tools: list[dict] | None, in_reasoning: bool,
                 parse_reasoning: bool = True):
        if tool_format not in ("xml", "json"):
            raise ValueError(f"unknown tool format {tool_format!r}")
        self.parse_reasoning = parse_reasoning
        self.splitter = _ReasoningSplitter(in_reasoning, raw=not parse_reasoning)
        self.extractor = _ToolCallExtractor(tool_format, tools) if tools else None
        self.reasoning = ""
        self.content = ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls completed so far (all of them after finish())."""
        return list(self.extractor.calls) if self.extractor else []

    def feed(self, text: str) -> ParsedDelta:
        return self._route(self.splitter.feed(text), finish=False)

    def finish(self) -> ParsedDelta:
        return self._route(self.splitter.finish(), finish=True)

    def _route(self, segments: list[tuple[str, str]], finish: bool) -> ParsedDelta:
        delta = ParsedDelta()
        for kind, text in segments:
            if kind == "reasoning" and self.parse_reasoning:
                delta.reasoning += text
            elif kind == "reasoning":
                delta.content += text  # raw think block: content, but no tool calls read in it
            elif self.extractor:
                delta.extend(self.extractor.feed(text))
            else:
                delta.content += text
        if finish and self.extractor:
            delta.extend(self.extractor.finish())
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta


def parse_output(text: str, tool_format: ToolFormat, tools: list[dict] | None, in_reasoning: bool,
                 parse_reasoning: bool = True) -> tuple[str, str, list[ToolCall]]:
    """The whole output at once: (reasoning, content, tool calls)."""
    parser = OutputParser(tool_format, tools, in_reasoning, parse_reasoning)
    parser.feed(text)
    parser.finish()
    return parser.reasoning, parser.content, parser.tool_calls
