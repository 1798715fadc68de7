"""From an API request's messages and tools to the prompt the model sees (through its own chat
template), and the grammars that force a tool call (`tool_choice` required or a named function)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import MimoError
from ..thinking import generation_prompt
from .parsers import prompt_ends_in_reasoning, tool_format_for


RESERVED_TEMPLATE_VARIABLES = {"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"}


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]
    in_reasoning: bool  # the prompt opened a <think> block the answer continues
    tool_format: str  # "xml" (MiMo-V2 family) or "json" (MiMo-7B)


def message_text(content) -> str:
    """OpenAI content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise MimoError("only text content parts are supported (this server runs MiMo's text backbone)")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise MimoError("message content must be a string or a list of text parts")


def template_message(message: dict) -> dict:
    """A message as chat templates read it: text content, reasoning as `reasoning_content`, tool
    call arguments as objects (templates iterate over them)."""
    out = {key: value for key, value in message.items() if value is not None}
    out["content"] = message_text(message.get("content"))
    reasoning = message.get("reasoning_content") or message.get("reasoning") or message.get("thinking")
    if reasoning:
        out["reasoning_content"] = reasoning
    calls = []
    for call in message.get("tool_calls") or []:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise MimoError(f"tool call arguments are not valid JSON: {arguments[:80]!r}") from None
        calls.append({**call, "function": function, "type": call.get("type", "function")})
    if calls:
        out["tool_calls"] = calls
    return out


def build_chat_prompt(engine, messages: list[dict], tools: list[dict] | None, thinking: bool | None,
                      template_kwargs: dict | None = None) -> ChatPrompt:
    """`thinking`: None = the template's default; False starts the answer after an empty thinking
    block (whether or not the template knows `enable_thinking`)."""
    if not messages:
        raise MimoError("messages must not be empty")
    tokenizer = engine.tokenizer
    kwargs = dict(template_kwargs or {})
    reserved = sorted(set(kwargs) & RESERVED_TEMPLATE_VARIABLES)
    if reserved:
        raise MimoError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    if tools:
        kwargs["tools"] = tools
    text, _ = generation_prompt(tokenizer, [template_message(m) for m in messages], thinking, **kwargs)
    tool_format = tool_format_for(tokenizer.chat_template, engine.config.family)
    return ChatPrompt(text, tokenizer.encode(text), prompt_ends_in_reasoning(text), tool_format)


COMPACT = {"x-guidance": {"whitespace_flexible": False}}  # no endless padding between JSON tokens


def _lark_literal(text: str) -> str:
    return json.dumps(text)


def _closed(parameters: dict | None) -> dict:
    """The arguments' schema without properties the tool did not declare (unless it allows them)."""
    parameters = dict(parameters or {"type": "object"})
    parameters.setdefault("additionalProperties", False)
    return parameters


def _xml_value(schema: dict) -> str:
    """A parameter value as the XML format writes it: strings verbatim, anything else as JSON."""
    if schema.get("type", "string") == "string":
        if schema.get("enum"):
            return "(" + " | ".join(_lark_literal(str(option)) for option in schema["enum"]) + ")"
        return "PLAIN"
    return f"%json {json.dumps({**schema, **COMPACT})}"


def forced_tool_call_grammar(tools: list[dict], tool_format: str, name: str | None = None) -> str:
    """A Lark grammar (llguidance dialect) for one call to one of `tools` (or to `name`), written
    the way the model writes calls, so `tool_choice: required` always yields a parseable call."""
    functions = [tool["function"] for tool in tools if tool.get("type", "function") == "function"]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise MimoError(f"tool_choice names {name!r}, which is not among the tools")
    if not functions:
        raise MimoError("tool_choice needs at least one function in tools")
    if tool_format == "json":
        schema = {"oneOf": [{
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _closed(f.get("parameters"))},
            "required": ["name", "arguments"], "additionalProperties": False,
        } for f in functions]}
        return f'start: "<tool_call>\\n" %json {json.dumps({**schema, **COMPACT})} "\\n</tool_call>"\n'
    rules, alternatives = [], []
    for number, function in enumerate(functions):
        parameters = (function.get("parameters") or {}).get("properties") or {}
        required = set((function.get("parameters") or {}).get("required") or [])
        parts = []
        for key, schema in parameters.items():
            value = _xml_value(schema or {})
            part = f'"<parameter=" {_lark_literal(key)} ">" {value} "</parameter>\\n"'
            parts.append(part if key in required else f"({part})?")
        rules.append(f'call{number}: {_lark_literal(function["name"])} ">\\n" {" ".join(parts)}')
        alternatives.append(f"call{number}")
    return (
        f'start: "<tool_call>\\n<function=" ({" | ".join(alternatives)}) "</function>\\n</tool_call>"\n'
        + "\n".join(rules)
        + "\nPLAIN: /[^<]*/\n"
    )
