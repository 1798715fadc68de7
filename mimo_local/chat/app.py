"""The Textual chat app: a streaming markdown transcript, a status line and a multi-line input."""

from __future__ import annotations

import threading
from typing import Iterator

from rich.table import Table as RichTable
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea

from ..errors import MimoError
from ..generate import DoneEvent
from ..prefill_bar import PROGRESS_MIN_TOKENS
from . import commands, store
from .controller import ChatController, Outcome, Table, memory_rss_bytes, plain_table
from .session import split_thinking

REFRESH_SECONDS = 0.05
# Entries shown at most: older ones leave the screen (the session keeps every message; /save writes
# them all). Each entry is a few widgets, so without a cap a long chat grows in memory and slows.
MAX_TRANSCRIPT_ENTRIES = 200


class ChatInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J adds a line; Up/Down on the first/last line walk the
    history; Tab completes slash commands."""

    BINDINGS = [
        Binding("up", "history(-1)", show=False),
        Binding("down", "history(1)", show=False),
        Binding("tab", "complete", show=False),
    ]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(
            soft_wrap=True, show_line_numbers=False, placeholder="Message  (Enter sends, Shift+Enter new line, /help)", **kwargs
        )
        self.sent: list[str] = []
        self.sent_index = 0
        self.draft = ""

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.prevent_default()
            event.stop()
            text = self.text
            if text.strip():
                self.sent.append(text)
                self.sent_index = len(self.sent)
                self.clear()
                self.post_message(self.Submitted(text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.prevent_default()
            event.stop()
            self.insert("\n")
            return
        await super()._on_key(event)

    def action_history(self, step: int) -> None:
        row = self.cursor_location[0]
        if step < 0 and row > 0:
            return self.action_cursor_up()
        if step > 0 and row < self.document.line_count - 1:
            return self.action_cursor_down()
        target = self.sent_index + step
        if not 0 <= target <= len(self.sent):
            return
        if self.sent_index == len(self.sent):
            self.draft = self.text
        self.sent_index = target
        self.load_text(self.sent[target] if target < len(self.sent) else self.draft)
        self.move_cursor(self.document.end)

    def action_complete(self) -> None:
        candidates = commands.complete(self.text, [info.name for info in store.list_sessions()])
        completed = commands.common_completion(self.text, candidates)
        if completed != self.text:
            self.load_text(completed)
            self.move_cursor(self.document.end)
        elif len(candidates) > 1:
            self.app.notify("  ".join(candidates), title="completions", timeout=4)


class UserTurn(Static):
    def __init__(self, text: str):
        super().__init__(Text(text), classes="user")


class Notice(Static):
    def __init__(self, text: str | RichTable, error: bool = False, plain: str | None = None):
        super().__init__(text, classes="error" if error else "notice", markup=False)
        self.plain = text if plain is None else plain  # what it says, as text


class AssistantTurn(Vertical):
    """An answer: a dimmed thinking block that folds once the answer starts, then the markdown answer."""

    def __init__(self, opened_thinking: bool, text: str = ""):
        super().__init__(classes="assistant")
        self.opened_thinking = opened_thinking
        self.pending = text  # written by the generation thread, shown by `refresh_text`
        self.shown = None
        self.folded = False

    def compose(self) -> ComposeResult:
        with Collapsible(title="thinking…", collapsed=False, classes="thinking"):
            yield Static("", classes="thinking-text", markup=False)
        yield Markdown("", classes="answer")

    def on_mount(self) -> None:
        self.refresh_text()

    def refresh_text(self) -> None:
        text = self.pending
        if text == self.shown:
            return
        self.shown = text
        parts = split_thinking(text, self.opened_thinking)
        block = self.query_one(Collapsible)
        block.display = parts.has_thinking or not parts.thinking_done
        self.query_one(".thinking-text", Static).update(parts.thinking)
        if parts.thinking_done and parts.has_thinking and not self.folded:
            self.folded = True
            block.title = "thought (click to expand)"
            block.collapsed = True
        self.query_one(Markdown).update(parts.answer)


class ChatApp(App):
    TITLE = "mimo chat"
    CSS = """
    #transcript { height: 1fr; padding: 0 1; }
    .user { background: $boost; color: $text; padding: 0 1; margin: 1 0 0 0; border-left: thick $accent; }
    .assistant { height: auto; margin: 1 0 0 0; }
    .thinking { color: $text-muted; text-style: dim; border: none; padding: 0; margin: 0; }
    .thinking-text { color: $text-muted; text-style: dim italic; }
    .answer { margin: 0; padding: 0 1; }
    .notice { color: $text-muted; margin: 1 0 0 0; }
    .error { color: $error; margin: 1 0 0 0; }
    #status { height: 1; background: $panel; color: $text-muted; padding: 0 1; }
    ChatInput { height: auto; max-height: 10; min-height: 3; }
    """
    BINDINGS = [
        Binding("escape", "stop", "stop", priority=True),
        Binding("ctrl+c", "stop", "stop", priority=True, show=False),
        Binding("ctrl+d", "quit_chat", "quit", priority=True),
    ]

    def __init__(self, controller: ChatController, device: str):
        super().__init__()
        self.controller = controller
        self.device = device
        self.generating = False
        self.stop_requested = threading.Event()
        self.current: AssistantTurn | None = None
        self.waiting: list[str] = []  # lines typed after Esc, before the answer had stopped
        self.prefill_note = ""  # how far a long prompt has been read, while it is
        controller.session.on_prefill = self._prefill_progress

    @property
    def session(self):
        return self.controller.session

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="transcript")
        yield Static(id="status", markup=False)
        yield ChatInput(id="input")

    def on_mount(self) -> None:
        self.query_one(ChatInput).focus()
        self.set_interval(REFRESH_SECONDS, self._refresh_stream)
        self.set_interval(1.0, self.update_status)
        self.redraw_transcript()
        self.update_status()

    # -- transcript --------------------------------------------------------------------------------

    @property
    def transcript(self) -> VerticalScroll:
        return self.query_one("#transcript", VerticalScroll)

    def add(self, widget) -> None:
        self.transcript.mount(widget)
        self.scroll_to_end()

    def scroll_to_end(self) -> None:
        """Scroll once the widgets just mounted are laid out: scrolling now would stop short of them."""
        self.call_after_refresh(self.transcript.scroll_end, animate=False)

    def notice(self, text, error: bool = False) -> None:
        self.add(Notice(f"error: {text}" if error else text, error=error))

    def redraw_transcript(self) -> None:
        self.transcript.remove_children()
        opened = self.session.thinking_opened_by_prompt()
        for message in self.session.messages:
            if message["role"] == "user":
                self.add(UserTurn(message["content"]))
            else:
                self.add(AssistantTurn(opened, message["content"]))

    def update_status(self) -> None:
        """The current model, the last answer's figures (none after /clear, /load, /model), context."""
        session, figures = self.session, self.controller.figures
        parts = [session.model_name]
        if figures is not None and figures.first_token is not None:
            parts.append(f"prefill {figures.prefill_tokens_per_s:.1f} tok/s")
            if figures.decode_tokens_per_s:
                parts.append(f"decode {figures.decode_tokens_per_s:.1f} tok/s")
        stats = figures.stats if figures is not None else None
        if stats is not None and stats.speculation and stats.speculation.drafted:
            spec = stats.speculation
            parts.append(f"MTP {100 * spec.accepted / spec.drafted:.0f}% accepted")
        elif session.speculation["draft_tokens"]:
            parts.append(f"MTP {session.speculation['draft_tokens']} drafts")
        parts.append(f"ctx {self.controller.context_used}/{session.context}")
        parts.append(self.device)
        parts.append(f"RSS {memory_rss_bytes() / 2**30:.2f} GiB")
        if self.generating:
            parts.append(f"{self.prefill_note or 'answering…'} Esc stops")
        self.query_one("#status", Static).update(" │ ".join(parts))

    # -- input -------------------------------------------------------------------------------------

    @on(ChatInput.Submitted)
    def submitted(self, message: ChatInput.Submitted) -> None:
        text = message.text
        if self.generating:
            if text.strip() == "/exit":
                self.action_quit_chat()
            elif self.stop_requested.is_set():  # stopping: run it as soon as the answer has ended
                self.waiting.append(text)
            else:
                self.notice("still answering: press Esc to stop first", error=True)
            return
        self.run_line(text)

    def run_line(self, text: str) -> None:
        try:
            outcome = self.controller.handle(text)
        except MimoError as error:
            if not commands.is_command(text):
                self.add(UserTurn(text))
            self.notice(str(error), error=True)
            return
        self.show(outcome)

    def show(self, outcome: Outcome) -> None:
        if outcome.transcript_changed:
            self.redraw_transcript()
        if outcome.notice:
            self.notice(outcome.notice)
        if outcome.table:
            self.add(Notice(_rich_table(outcome.table), plain=plain_table(outcome.table)))
        if outcome.edit_text is not None:
            box = self.query_one(ChatInput)
            box.load_text(outcome.edit_text)
            box.move_cursor(box.document.end)
        if outcome.copy_text is not None:
            self.copy_to_clipboard(outcome.copy_text)
            self.notice(f"copied the last answer ({len(outcome.copy_text)} characters) to the clipboard")
        if outcome.switch_model:
            self.run_worker(lambda: self._switch_model(outcome.switch_model), thread=True, group="model")
        if outcome.reply is not None:
            if outcome.user_text is not None and not outcome.transcript_changed:
                self.add(UserTurn(outcome.user_text))
            self.start_reply(outcome.reply)
        if outcome.exit:
            self.exit()
        self.update_status()

    # -- generation --------------------------------------------------------------------------------

    def start_reply(self, reply: Iterator) -> None:
        self.current = AssistantTurn(self.session.thinking_opened_by_prompt())
        self.add(self.current)
        self.generating = True
        self.stop_requested.clear()
        self.run_worker(lambda: self._generate(reply, self.current), thread=True, group="generate")

    def _prefill_progress(self, done: int, total: int) -> None:
        """Worker thread, after each prompt chunk: the status line counts a long prompt's tokens;
        Esc stops the prompt here, a chunk at a time."""
        if self.stop_requested.is_set():
            raise MimoError(f"stopped while reading the prompt ({done} of {total} tokens read)")
        if total >= PROGRESS_MIN_TOKENS:
            self.prefill_note = f"reading the prompt {done}/{total} tok…" if done < total else ""
            self.call_from_thread(self.update_status)

    def _generate(self, reply: Iterator, turn: AssistantTurn) -> None:
        """Worker thread: pull tokens, stopping between tokens when asked (closing the generator)."""
        text, error = "", None
        try:
            for event in reply:
                if not isinstance(event, DoneEvent):
                    text += event.text
                    turn.pending = text
                if self.stop_requested.is_set():
                    break
        except MimoError as caught:
            error = str(caught)
        except Exception as caught:  # keep the chat alive; the message says what broke
            error = f"{type(caught).__name__}: {caught}"
        finally:
            reply.close()
        if self.is_running:  # Ctrl+D may have closed the app while the last token was on its way
            self.call_from_thread(self._reply_ended, turn, error)

    def _reply_ended(self, turn: AssistantTurn, error: str | None) -> None:
        self.generating = False
        self.prefill_note = ""
        turn.refresh_text()
        figures = self.controller.figures
        if error:
            self.notice(error, error=True)
        elif self.stop_requested.is_set():
            self.notice("stopped")
        elif figures and figures.turn and figures.turn.dropped_messages:
            self.notice(f"the {figures.turn.dropped_messages} oldest messages left the context")
        if figures and figures.finish == "length":
            self.notice("the answer hit max_tokens or the end of the context (/set max_tokens=N)")
        self.current = None
        for entry in list(self.transcript.children)[:-MAX_TRANSCRIPT_ENTRIES]:
            entry.remove()
        self.scroll_to_end()
        self.update_status()
        while self.waiting and not self.generating:  # a message among them starts the next answer:
            self.run_line(self.waiting.pop(0))      # the lines after it wait for that one to end

    def _refresh_stream(self) -> None:
        if self.current is not None and self.current.is_mounted:
            before = self.current.shown
            self.current.refresh_text()
            if self.current.shown != before:
                self.scroll_to_end()

    def _switch_model(self, name: str) -> None:
        try:
            message, error = self.controller.switch_model(name), False
        except (MimoError, OSError, RuntimeError, ValueError) as caught:
            message, error = str(caught), True
        self.call_from_thread(self._model_switched, message, error)

    def _model_switched(self, message: str, error: bool) -> None:
        self.notice(message, error=error)
        self.update_status()

    # -- keys --------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self.stop_requested.set()

    def action_quit_chat(self) -> None:
        self.stop_requested.set()
        self.exit()


def _rich_table(table: Table) -> RichTable:
    rich = RichTable(title=table.title, title_justify="left", show_header=any(table.columns), box=None, padding=(0, 2))
    for column in table.columns:
        rich.add_column(column)
    for row in table.rows:
        rich.add_row(*row)
    return rich
