"""The chat without a terminal (`echo hi | mimo chat`): one line in, the answer out, no escape codes.

Answers go to stdout; notices, tables and errors to stderr, so a pipe receives only the answers.
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console

from ..errors import MimoError
from ..generate import DoneEvent
from ..prefill_bar import PrefillBar
from .controller import ChatController, Outcome, plain_table


def run_repl(controller: ChatController, lines: TextIO, out: TextIO, err: TextIO) -> None:
    controller.session.on_prefill = PrefillBar(Console(file=err))  # shows only where stderr is a terminal
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            outcome = controller.handle(line)
            if _show(controller, outcome, out, err):
                return
        except MimoError as error:
            err.write(f"error: {error}\n")
            err.flush()


def _show(controller: ChatController, outcome: Outcome, out: TextIO, err: TextIO) -> bool:
    """Print one outcome; True when the chat should end."""
    if outcome.switch_model:
        err.write(controller.switch_model(outcome.switch_model) + "\n")
    elif outcome.notice:
        err.write(outcome.notice + "\n")
    if outcome.table:
        err.write(plain_table(outcome.table))
    if outcome.edit_text is not None:
        err.write(f"removed the last message; send its new text:\n{outcome.edit_text}\n")
    if outcome.copy_text is not None:
        out.write(outcome.copy_text + "\n")  # no clipboard here: the answer goes to stdout
    if outcome.reply is not None:
        try:
            _stream(outcome.reply, out, err)
        finally:
            if isinstance(controller.session.on_prefill, PrefillBar):
                controller.session.on_prefill.close()  # an interrupted prompt's bar goes too
    out.flush()
    err.flush()
    return outcome.exit


def _stream(reply, out: TextIO, err: TextIO) -> None:
    try:
        for event in reply:
            if isinstance(event, DoneEvent):
                stats = event.stats
                err.write(
                    f"[{stats.prompt_tokens} new prompt tok {stats.prefill_tokens_per_s:.1f} tok/s | "
                    f"{stats.completion_tokens} tok {stats.decode_tokens_per_s:.1f} tok/s | {stats.finish_reason}]\n"
                )
            elif event.text:
                out.write(event.text)
                out.flush()
    except KeyboardInterrupt:
        err.write("\n[stopped]\n")
    finally:
        reply.close()
        out.write("\n")
