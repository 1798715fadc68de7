"""What a line typed into the chat does, independent of the front end that shows the result."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import MimoError
from ..generate import DoneEvent, GenerationStats
from . import commands, store
from .session import ChatSession, TurnInfo
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


@dataclass
class AnswerFigures:
    """What the last answer cost, measured as its tokens arrive: the generator's own statistics come
    only with its last event, which a stopped answer never reaches."""

    model: str
    started: float
    turn: TurnInfo | None = None
    tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    stats: GenerationStats | None = None  # the generator's, when the answer ran to its end
    failed: bool = False

    @property
    def finish(self) -> str:
        return self.stats.finish_reason if self.stats else "error" if self.failed else "stopped"

    @property
    def prefilled_tokens(self) -> int:
        return self.turn.prompt_tokens - self.turn.reused_tokens if self.turn else 0

    @property
    def prefill_tokens_per_s(self) -> float:
        if self.stats:
            return self.stats.prefill_tokens_per_s
        seconds = (self.first_token or self.started) - self.started
        return self.prefilled_tokens / seconds if seconds > 0 else 0.0

    @property
    def completion_tokens(self) -> int:
        return self.stats.completion_tokens if self.stats else self.tokens

    @property
    def decode_tokens_per_s(self) -> float:
        if self.stats:
            return self.stats.decode_tokens_per_s
        seconds = (self.last_token or 0.0) - (self.first_token or 0.0)
        return (self.tokens - 1) / seconds if self.tokens > 1 and seconds > 0 else 0.0


class ChatController:
    def __init__(self, session: ChatSession, load_engine: Callable[[str], object]):
        self.session = session
        self.load_engine = load_engine  # model name -> Engine
        self.figures: AnswerFigures | None = None  # the last answer of this conversation with this model

    def handle(self, line: str) -> Outcome:
        """Run one submitted line: a message to answer or a slash command. Raises MimoError for
        anything the user got wrong, with a one-line message."""
        if not commands.is_command(line):
            text = line[1:] if line.startswith("//") else line  # '//' sends a message that starts with '/'
            return Outcome(reply=self._measured(self.session.ask(text)), user_text=text)
        command = commands.parse(line)
        return getattr(self, f"_{command.name}")(command.argument)

    def switch_model(self, name: str) -> str:
        engine = self.load_engine(name)
        self.session.use_engine(engine, name)
        self.figures = None
        return f"now chatting with {name} (the next answer prefills the whole conversation)"

    @property
    def context_used(self) -> int:
        """Tokens the conversation holds in the context: none after /clear, /load or /model (the
        cache still holds the old tokens until the next answer rewinds it)."""
        return self.session.context_used if self.figures is not None else 0

    def _measured(self, reply: Iterator) -> Iterator:
        """`reply`, recording its figures in self.figures as tokens arrive (also when it is stopped
        by closing it, or fails). The figures are the new answer's from now on."""
        self.figures = AnswerFigures(self.session.model_name, time.perf_counter())
        return self._record(reply, self.figures, self.session.last_turn)

    def _record(self, reply: Iterator, figures: AnswerFigures, previous_turn) -> Iterator:
        def this_turn():
            turn = self.session.last_turn
            return turn if turn is not previous_turn else None

        figures.started = time.perf_counter()
        try:
            for event in reply:
                now = time.perf_counter()
                figures.turn = this_turn()
                if isinstance(event, DoneEvent):
                    figures.stats = event.stats
                elif event.token_id >= 0:  # -1: the detokenizer's held-back tail, not a token
                    figures.tokens += 1
                    figures.first_token = figures.first_token or now
                    figures.last_token = now
                yield event
        except Exception:
            figures.failed = True
            raise
        finally:
            reply.close()
            figures.turn = this_turn()

    # -- commands ----------------------------------------------------------------------------------

    def _help(self, argument: str) -> Outcome:
        rows = [list(row) for row in commands.help_rows(argument or None)]
        if not argument:
            rows += [["Enter / Shift+Enter, Ctrl+J", "send / new line"], ["Esc, Ctrl+C", "stop the answer"],
                     ["Up / Down", "input history"], ["Tab", "complete a command"], ["Ctrl+D", "quit"]]
        return Outcome(table=Table("commands", ["command", "what it does"], rows))

    def _clear(self, _: str) -> Outcome:
        self.session.clear()
        self.figures = None
        return Outcome(notice="new conversation", transcript_changed=True)

    def _regen(self, _: str) -> Outcome:
        if not self.session.messages:
            raise MimoError("nothing to regenerate yet")
        return Outcome(reply=self._measured(self.session.regenerate()), transcript_changed=True)

    def _undo(self, _: str) -> Outcome:
        if self.session.undo() is None:
            raise MimoError("nothing to undo")
        return Outcome(notice="removed the last exchange", transcript_changed=True)

    def _edit(self, argument: str) -> Outcome:
        if not any(m["role"] == "user" for m in self.session.messages):
            raise MimoError("no message to edit yet")
        previous = self.session.undo()
        if argument:
            return Outcome(reply=self._measured(self.session.ask(argument)), user_text=argument, transcript_changed=True)
        return Outcome(edit_text=previous, transcript_changed=True, notice="editing the last message")

    def _system(self, argument: str) -> Outcome:
        self.session.set_system(argument)
        return Outcome(notice=f"system prompt: {argument}" if argument else "system prompt cleared")

    def _set(self, argument: str) -> Outcome:
        if argument:
            self.session.set_settings(self.session.settings.with_assignments(argument.split()))
        return Outcome(notice=describe(self.session.settings))

    def _think(self, argument: str) -> Outcome:
        if self.session.settings.raw:
            raise MimoError("a raw chat has no chat template to switch thinking in (/set raw=off first)")
        self.session.set_settings(self.session.settings.with_assignments([f"think={argument.lower()}"]))
        return Outcome(notice="thinking on: the model reasons first (folded)" if self.session.settings.think
                       else "thinking off: the model answers directly")

    def _save(self, name: str) -> Outcome:
        path = store.save_session(name, self.session.to_payload())
        return Outcome(notice=f"saved session '{name}' ({path})")

    def _load(self, name: str) -> Outcome:
        payload = store.load_session(name)
        self.session.restore(payload)
        self.figures = None
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
        figures = self.figures
        if figures is None:
            raise MimoError("no answer yet")
        rows = [["model", figures.model]]
        if figures.turn is not None:
            turn = figures.turn
            rows.append(["prompt tokens", f"{turn.prompt_tokens} ({turn.reused_tokens} reused from the cache)"])
        rows += [
            ["context", f"{self.context_used} / {self.session.context} tokens"],
            ["prefill", f"{figures.prefilled_tokens} tok at {figures.prefill_tokens_per_s:.1f} tok/s"],
            ["decode", f"{figures.completion_tokens} tok at {figures.decode_tokens_per_s:.1f} tok/s"],
            ["finish", figures.finish],
        ]
        if figures.stats is not None and figures.stats.speculation:
            s = figures.stats.speculation
            rows.append(["MTP", f"{s.accepted}/{s.drafted} drafts accepted, mean accepted length {s.mean_accepted_length:.2f}"])
        elif figures.stats is None and self.session.speculation["draft_tokens"]:
            rows.append(["MTP", "not counted for an answer that did not finish"])
        if figures.turn is not None and figures.turn.dropped_messages:
            rows.append(["dropped", f"{figures.turn.dropped_messages} oldest messages left the context"])
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
