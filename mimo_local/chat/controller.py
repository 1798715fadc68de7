"""What a line typed into the chat does, independent of the front end that shows the result."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import MimoError
from . import commands, store
from .session import ChatSession
from .settings import describe


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Outcome:
    notice: str = ""
    table: Table | None = None
    reply: Iterator | None = None  # a generation for the front end to run (and stop by closing it)
    user_text: str | None = None  # the user message the reply answers, to show in the transcript
    edit_text: str | None = None  # text to put back into the input box
    copy_text: str | None = None
    switch_model: str | None = None  # slow: run `controller.switch_model` off the UI thread
    transcript_changed: bool = False  # messages were removed or replaced: redraw from the session
    exit: bool = False


class ChatController:
    def __init__(self, session: ChatSession, load_engine: Callable[[str], object]):
        self.session = session
        self.load_engine = load_engine  # model name -> Engine

    def handle(self, line: str) -> Outcome:
        """Run one submitted line: a message to answer or a slash command. Raises MimoError for
        anything the user got wrong, with a one-line message."""
        if not commands.is_command(line):
            text = line[1:] if line.startswith("//") else line  # '//' sends a message that starts with '/'
            return Outcome(reply=self.session.ask(text), user_text=text)
        command = commands.parse(line)
        return getattr(self, f"_{command.name}")(command.argument)

    def switch_model(self, name: str) -> str:
        engine = self.load_engine(name)
        self.session.use_engine(engine, name)
        return f"now chatting with {name} (the next answer prefills the whole conversation)"

    # -- commands ----------------------------------------------------------------------------------

    def _help(self, argument: str) -> Outcome:
        rows = [list(row) for row in commands.help_rows(argument or None)]
        if not argument:
            rows += [["Enter / Shift+Enter, Ctrl+J", "send / new line"], ["Esc, Ctrl+C", "stop the answer"],
                     ["Up / Down", "input history"], ["Tab", "complete a command"], ["Ctrl+D", "quit"]]
        return Outcome(table=Table("commands", ["command", "what it does"], rows))

    def _clear(self, _: str) -> Outcome:
        self.session.clear()
        return Outcome(notice="new conversation", transcript_changed=True)

    def _regen(self, _: str) -> Outcome:
        if not self.session.messages:
            raise MimoError("nothing to regenerate yet")
        return Outcome(reply=self.session.regenerate(), transcript_changed=True)

    def _undo(self, _: str) -> Outcome:
        if self.session.undo() is None:
            raise MimoError("nothing to undo")
        return Outcome(notice="removed the last exchange", transcript_changed=True)

    def _edit(self, argument: str) -> Outcome:
        if not any(m["role"] == "user" for m in self.session.messages):
            raise MimoError("no message to edit yet")
        previous = self.session.undo()
        if argument:
            return Outcome(reply=self.session.ask(argument), user_text=argument, transcript_changed=True)
        return Outcome(edit_text=previous, transcript_changed=True, notice="editing the last message")

    def _system(self, argument: str) -> Outcome:
        self.session.set_system(argument)
        return Outcome(notice=f"system prompt: {argument}" if argument else "system prompt cleared")

    def _set(self, argument: str) -> Outcome:
        if argument:
            self.session.set_settings(self.session.settings.with_assignments(argument.split()))
        return Outcome(notice=describe(self.session.settings))

    def _think(self, argument: str) -> Outcome:
        self.session.set_settings(self.session.settings.with_assignments([f"think={argument.lower()}"]))
        return Outcome(notice="thinking on: the model reasons first (folded)" if self.session.settings.think
                       else "thinking off: the model answers directly")

    def _save(self, name: str) -> Outcome:
        path = store.save_session(name, self.session.to_payload())
        return Outcome(notice=f"saved session '{name}' ({path})")

    def _load(self, name: str) -> Outcome:
        payload = store.load_session(name)
        self.session.restore(payload)
        notice = f"loaded session '{name}' ({len(self.session.messages)} messages)"
        if payload.get("model") and payload["model"] != self.session.model_name:
            notice += f"; it was saved with {payload['model']} (/model {payload['model']} to switch)"
        return Outcome(notice=notice, transcript_changed=True)

    def _sessions(self, _: str) -> Outcome:
        infos = store.list_sessions()
        if not infos:
            return Outcome(notice=f"no saved sessions in {store.sessions_dir()}")
        rows = [[i.name, i.saved_at.replace("T", " "), i.model, str(i.messages)] for i in infos]
        return Outcome(table=Table("saved sessions", ["name", "saved", "model", "messages"], rows))

    def _stats(self, _: str) -> Outcome:
        stats, turn = self.session.last_stats, self.session.last_turn
        if turn is None:
            raise MimoError("no answer yet")
        rows = [
            ["prompt tokens", f"{turn.prompt_tokens} ({turn.reused_tokens} reused from the cache)"],
            ["context", f"{self.session.context_used} / {self.session.context} tokens"],
        ]
        if stats is None:
            rows.append(["finish", "stopped"])
        else:
            rows += [
                ["prefill", f"{stats.prompt_tokens} tok at {stats.prefill_tokens_per_s:.1f} tok/s"],
                ["decode", f"{stats.completion_tokens} tok at {stats.decode_tokens_per_s:.1f} tok/s"],
                ["finish", stats.finish_reason],
            ]
            if stats.speculation:
                s = stats.speculation
                rows.append(["MTP", f"{s.accepted}/{s.drafted} drafts accepted, mean accepted length {s.mean_accepted_length:.2f}"])
        if turn.dropped_messages:
            rows.append(["dropped", f"{turn.dropped_messages} oldest messages left the context"])
        return Outcome(table=Table("last answer", ["", ""], rows))

    def _model(self, name: str) -> Outcome:
        return Outcome(switch_model=name, notice=f"loading {name}...")

    def _copy(self, _: str) -> Outcome:
        answer = self.session.last_answer()
        if answer is None:
            raise MimoError("no answer to copy yet")
        return Outcome(copy_text=answer)

    def _exit(self, _: str) -> Outcome:
        return Outcome(exit=True)


def memory_rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def plain_table(table: Table) -> str:
    widths = [max(len(str(row[i])) for row in [table.columns] + table.rows) for i in range(len(table.columns))]
    lines = [table.title]
    if any(table.columns):
        lines.append("  ".join(c.ljust(w) for c, w in zip(table.columns, widths)).rstrip())
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table.rows]
    return "\n".join(lines) + "\n"
