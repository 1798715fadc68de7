"""Slash commands: what exists, how each is spelled, parsing with one-line errors, and completion."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import MimoError
from .settings import SETTING_NAMES
from .store import check_name


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    help: str
    argument: str = "none"  # none | optional | required | name


COMMANDS = {
    spec.name: spec
    for spec in [
        CommandSpec("help", "/help [COMMAND]", "list commands, or explain one", "optional"),
        CommandSpec("clear", "/clear", "start a new conversation (settings and system prompt stay)"),
        CommandSpec("regen", "/regen", "answer the last message again"),
        CommandSpec("undo", "/undo", "remove the last exchange"),
        CommandSpec("edit", "/edit [TEXT]", "edit the last message (TEXT replaces it and asks again)", "optional"),
        CommandSpec("system", "/system [TEXT]", "set the system prompt (no TEXT: none)", "optional"),
        CommandSpec("set", "/set KEY=VALUE ...", "change settings, e.g. temperature=0.6 top_p=0.95 max_tokens=N", "optional"),
        CommandSpec("think", "/think on|off", "let the model think first (shown folded) or answer directly", "required"),
        CommandSpec("save", "/save NAME", "save the conversation and settings", "name"),
        CommandSpec("load", "/load NAME", "restore a saved conversation and its settings", "name"),
        CommandSpec("sessions", "/sessions", "list saved sessions"),
        CommandSpec("stats", "/stats", "speed and token counts of the last answer"),
        CommandSpec("model", "/model NAME", "switch to another model (the conversation stays)", "required"),
        CommandSpec("copy", "/copy", "copy the last answer to the clipboard"),
        CommandSpec("exit", "/exit", "quit"),
    ]
}


@dataclass(frozen=True)
class Command:
    name: str
    argument: str = ""


def is_command(line: str) -> bool:
    return line.startswith("/") and not line.startswith("//")


def parse(line: str) -> Command:
    """Parse '/name argument'; raises MimoError for unknown commands and missing or extra arguments."""
    head, _, rest = line.strip()[1:].partition(" ")
    name, argument = head.lower(), rest.strip()
    spec = COMMANDS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean /{close[0]}?" if close else "try /help"
        raise MimoError(f"unknown command /{name} ({hint})")
    if spec.argument == "none" and argument:
        raise MimoError(f"/{name} takes no argument (usage: {spec.usage})")
    if spec.argument in ("required", "name") and not argument:
        raise MimoError(f"/{name} needs an argument (usage: {spec.usage})")
    if spec.argument == "name":
        check_name(argument)
    if name == "think" and argument.lower() not in ("on", "off"):
        raise MimoError(f"/think takes on or off, got '{argument}'")
    if name == "help" and argument and argument.lstrip("/") not in COMMANDS:
        raise MimoError(f"no command /{argument.lstrip('/')} (try /help)")
    return Command(name, argument)


def help_rows(name: str | None = None) -> list[tuple[str, str]]:
    specs = [COMMANDS[name.lstrip("/")]] if name else COMMANDS.values()
    return [(spec.usage, spec.help) for spec in specs]


def complete(text: str, session_names: list[str] = ()) -> list[str]:
    """Full-line completions for a partly typed command (empty when `text` is not a command)."""
    if not text.startswith("/"):
        return []
    head, space, rest = text[1:].partition(" ")
    if not space:
        return [f"/{name}" + (" " if COMMANDS[name].argument in ("required", "name") else "") for name in COMMANDS if name.startswith(head.lower())]
    head = head.lower()
    if head == "think":
        options = ["on", "off"]
    elif head in ("load", "save"):
        options = list(session_names)
    elif head == "help":
        options = list(COMMANDS)
    elif head == "set":
        done, _, word = rest.rpartition(" ")
        prefix = f"/set {done} " if done else "/set "
        return [prefix + f"{key}=" for key in SETTING_NAMES if key.startswith(word) and "=" not in word]
    else:
        return []
    return [f"/{head} {option}" for option in options if option.startswith(rest)]


def common_completion(text: str, candidates: list[str]) -> str:
    """What Tab turns `text` into: the one candidate, or the longest prefix they share."""
    if not candidates:
        return text
    if len(candidates) == 1:
        return candidates[0]
    prefix = candidates[0]
    for candidate in candidates[1:]:
        while not candidate.startswith(prefix):
            prefix = prefix[:-1]
    return prefix if len(prefix) > len(text) else text
