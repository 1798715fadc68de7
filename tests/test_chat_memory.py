"""A long chat with a capped context (drop the oldest turns) keeps its memory flat."""

import gc
import io

from mimo_local.chat.controller import ChatController
from mimo_local.chat.repl import run_repl
from mimo_local.chat.session import ChatSession
from mimo_local.chat.settings import ChatSettings
from mimo_local.engine import Engine

TURNS = 150


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def test_150_capped_turns_end_within_10_percent_of_turn_20(scripted_chat):
    engine = Engine.load(scripted_chat)
    session = ChatSession(engine, "scripted", ChatSettings(temperature=0, overflow="drop"), context=256)
    controller = ChatController(session, lambda name: engine)
    measured = {}

    def lines():
        for turn in range(TURNS):
            if turn in (20, TURNS - 1):
                gc.collect()
                measured[turn] = resident_bytes()
            yield f"Hello, this is message number {turn} of a long chat.\n"

    out, err = io.StringIO(), io.StringIO()
    run_repl(controller, lines(), out, err)
    gc.collect()
    end = resident_bytes()
    assert "error" not in err.getvalue(), err.getvalue()[-500:]
    assert out.getvalue().count("Hello! How can I help you today?") == TURNS
    assert session.context_start > TURNS  # the oldest turns were dropped from the context ...
    assert len(session.messages) == 2 * TURNS  # ... and kept in the transcript
    assert session.cache.length <= session.context
    assert end <= measured[20] * 1.10, f"RSS grew from {measured[20] / 1e6:.0f} MB at turn 20 to {end / 1e6:.0f} MB"


def test_the_app_shows_a_bounded_number_of_entries(scripted_chat, monkeypatch, tmp_path):
    """The Textual transcript was what grew (a few widgets per entry, +0.35 MB and slower layout per
    turn): it keeps the newest MAX_TRANSCRIPT_ENTRIES on screen, the session keeps every message."""
    import asyncio

    from mimo_local.chat import app as chat_app
    from mimo_local.chat.app import ChatApp, ChatInput

    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    monkeypatch.setattr(chat_app, "MAX_TRANSCRIPT_ENTRIES", 6)
    engine = Engine.load(scripted_chat)
    session = ChatSession(engine, "scripted", ChatSettings(temperature=0, overflow="drop"), context=256)
    app = ChatApp(ChatController(session, lambda name: engine), device="cpu")
    counts = []

    async def main():
        async with app.run_test(size=(100, 40)) as pilot:
            for turn in range(8):
                pilot.app.query_one(ChatInput).load_text(f"Hello number {turn}")
                await pilot.press("enter")
                await pilot.pause()
                while pilot.app.generating:
                    await pilot.pause(0.02)
                await pilot.pause(0.1)
                counts.append(len(pilot.app.transcript.children))

    asyncio.run(main())
    assert max(counts) <= 6 + 1 and counts[-1] <= 6, counts  # (+1: the next user entry before the trim)
    assert len(session.messages) == 16
