"""The Textual chat app, driven headless with Pilot against real tiny checkpoints."""

import asyncio
import dataclasses

import pytest
from textual.widgets import Collapsible, Markdown, Static

from mimo_local.chat.app import AssistantTurn, ChatApp, ChatInput, Notice, UserTurn
from mimo_local.chat.controller import ChatController
from mimo_local.chat.session import ChatSession
from mimo_local.chat.settings import ChatSettings
from mimo_local.dev.scripted_chat import ANSWER, THINKING
from mimo_local.engine import Engine
from mimo_local.store.resolve import resolve_model


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))


def make_app(model_dir, mtp=False, **settings):
    session = ChatSession(Engine.load(model_dir), model_dir.name, ChatSettings(**settings), mtp=mtp)
    return ChatApp(ChatController(session, lambda name: Engine.load(resolve_model(name))), device="cpu")


def run(app, scenario):
    async def main():
        async with app.run_test(size=(100, 40)) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def send(pilot, text):
    await pilot.click(ChatInput)
    pilot.app.query_one(ChatInput).load_text(text)
    await pilot.press("enter")
    await pilot.pause()
    await wait_idle(pilot)


async def wait_idle(pilot, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pilot.app.generating and loop.time() < deadline:
        await pilot.pause(0.02)
    await pilot.pause(0.1)
    assert not pilot.app.generating


def notices(app):
    return [n.plain for n in app.query(Notice)]


def last_answer(app):
    turn = app.query(AssistantTurn).last()
    return turn, turn.query_one(Markdown).source, str(turn.query_one(".thinking-text", Static).render())


def status(app):
    return str(app.query_one("#status", Static).render())


def test_answer_streams_into_markdown_and_the_thinking_block_folds(scripted_chat):
    app = make_app(scripted_chat, mtp=True)

    async def scenario(pilot):
        await send(pilot, "hi")
        assert [str(u.render()) for u in app.query(UserTurn)] == ["hi"]
        turn, answer, thinking = last_answer(app)
        assert (answer, thinking) == (ANSWER, THINKING)
        block = turn.query_one(Collapsible)
        assert block.collapsed and block.display and block.title.startswith("thought")
        line = status(app)
        for part in ["scripted", "prefill", "decode", "MTP 100% accepted", "ctx ", "/32768", "cpu", "RSS"]:
            assert part in line
        await pilot.click(turn.query_one("CollapsibleTitle"))  # expand the thought again
        assert not block.collapsed

    run(app, scenario)


def test_thinking_block_stays_open_while_thinking(scripted_chat):
    app = make_app(scripted_chat)

    async def scenario(pilot):
        turn = AssistantTurn(opened_thinking=False)
        await app.query_one("#transcript").mount(turn)
        for text in ["<thi", "<think>The user", f"<think>{THINKING}</think>Hel", f"<think>{THINKING}</think>{ANSWER}"]:
            turn.pending = text
            turn.refresh_text()
            await pilot.pause()
            if "</think>" not in text:
                assert not turn.query_one(Collapsible).collapsed
                assert turn.query_one(Markdown).source == ""
        assert turn.query_one(Collapsible).collapsed
        assert turn.query_one(Markdown).source == ANSWER

    run(app, scenario)


def test_think_off_shows_no_thinking_block(scripted_chat):
    app = make_app(scripted_chat)

    async def scenario(pilot):
        await send(pilot, "/think off")
        assert notices(app)[-1] == "thinking off: the model answers directly"
        await send(pilot, "hi")
        turn, answer, _ = last_answer(app)
        assert answer == ANSWER and not turn.query_one(Collapsible).display

    run(app, scenario)


@pytest.mark.parametrize("key", ["escape", "ctrl+c"])
def test_escape_and_ctrl_c_stop_the_answer_without_quitting(checkpoints, key):
    app = make_app(checkpoints("mimo"), temperature=0, max_tokens=20000)
    model = app.session.engine.model  # random weights: without an end-of-text id the answer runs until stopped
    model.config = dataclasses.replace(model.config, eos_token_ids=())

    async def scenario(pilot):
        await pilot.click(ChatInput)
        app.query_one(ChatInput).load_text("hello there")
        await pilot.press("enter")
        while not app.query(AssistantTurn) or not app.query(AssistantTurn).last().pending:
            await pilot.pause(0.02)
        await pilot.press(key)
        await wait_idle(pilot, timeout=10)
        assert app.is_running and notices(app)[-1] == "stopped"
        assert app.session.last_turn.stopped and app.session.messages[-1]["role"] == "assistant"
        assert 0 < app.session.context_used < 20000

    run(app, scenario)


def test_input_keys_history_and_completion(scripted_chat):
    app = make_app(scripted_chat)

    async def scenario(pilot):
        box = app.query_one(ChatInput)
        await pilot.click(ChatInput)
        await pilot.press("a", "ctrl+j", "b")
        assert box.text == "a\nb"
        await pilot.press("enter")
        await wait_idle(pilot)
        assert [str(u.render()) for u in app.query(UserTurn)] == ["a\nb"]
        await send(pilot, "/stats")
        await pilot.press("up")
        assert box.text == "/stats"
        await pilot.press("up")
        assert box.text == "a\nb"
        await pilot.press("up")  # inside a multi-line entry the arrows move the cursor first
        assert box.text == "a\nb" and box.cursor_location[0] == 0
        await pilot.press("down", "down")
        assert box.text == "/stats"
        await pilot.press("down")
        assert box.text == ""
        await pilot.press("/", "t", "h", "tab")
        assert box.text == "/think "
        await pilot.press("o", "f", "tab")
        assert box.text == "/think off"

    run(app, scenario)


def test_each_command(scripted_chat, checkpoints, tmp_path):
    app = make_app(scripted_chat, temperature=0)

    async def scenario(pilot):
        session = app.session
        await send(pilot, "/help")
        help_table = notices(app)[-1]
        assert "/regen" in help_table and "Ctrl+D" in help_table
        await send(pilot, "hi")
        await send(pilot, "/stats")
        assert "prompt tokens" in notices(app)[-1] and "finish" in notices(app)[-1]
        await send(pilot, "/regen")
        assert len(session.messages) == 2 and len(app.query(AssistantTurn)) == 1
        assert session.last_turn.reused_tokens > 0
        await send(pilot, "/copy")
        assert app.clipboard == ANSWER and notices(app)[-1].startswith("copied the last answer")
        await send(pilot, "/system Be brief.")
        assert session.system == "Be brief." and notices(app)[-1] == "system prompt: Be brief."
        await send(pilot, "/set temperature=0.3 max_tokens=64")
        assert (session.settings.temperature, session.settings.max_tokens) == (0.3, 64)
        await send(pilot, "/think off")
        assert session.settings.think is False
        await send(pilot, "/think on")
        await send(pilot, "/save chat1")
        assert (tmp_path / "sessions" / "chat1.json").exists()
        await send(pilot, "/sessions")
        assert "chat1" in notices(app)[-1]
        await send(pilot, "/edit")
        assert app.query_one(ChatInput).text == "hi" and session.messages == []
        await send(pilot, "/load chat1")
        assert len(session.messages) == 2 and len(app.query(AssistantTurn)) == 1
        assert session.settings.temperature == 0.3 and session.system == "Be brief."
        await send(pilot, "/edit hello")
        assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello"]
        await send(pilot, "/undo")
        assert session.messages == [] and not app.query(AssistantTurn)
        await send(pilot, "hi")
        await send(pilot, "/clear")
        assert session.messages == [] and not app.query(UserTurn)
        other = checkpoints("mimo")
        await send(pilot, f"/model {other}")
        while "now chatting with" not in notices(app)[-1]:
            await pilot.pause(0.05)
        assert session.engine.path == other and "now chatting with" in notices(app)[-1]
        await send(pilot, "/exit")
        assert not app.is_running

    run(app, scenario)


def test_inline_errors(scripted_chat):
    app = make_app(scripted_chat)

    async def scenario(pilot):
        for line, message in [
            ("/frob", "error: unknown command /frob (try /help)"),
            ("/set temperature=hot", "error: temperature must be a number, got 'hot'"),
            ("/set top_p=3", "error: top_p must be in (0, 1]"),
            ("/think sometimes", "error: /think takes on or off, got 'sometimes'"),
            ("/load missing", "error: no saved session 'missing' (see /sessions)"),
            ("/regen", "error: nothing to regenerate yet"),
            ("/copy", "error: no answer to copy yet"),
            ("/model /no/such/model", "error: "),
        ]:
            await send(pilot, line)
            while line.startswith("/model") and "/no/such/model" not in notices(app)[-1]:
                await pilot.pause(0.05)
            assert notices(app)[-1].startswith(message), (line, notices(app)[-1])
        assert app.is_running

    run(app, scenario)


def test_ctrl_d_quits(scripted_chat):
    app = make_app(scripted_chat)

    async def scenario(pilot):
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert not app.is_running

    run(app, scenario)


def long_answering_app(checkpoints, **settings):
    """A tiny random model that never ends its answer (no end-of-text id): stopped only by Esc."""
    app = make_app(checkpoints("mimo"), mtp=False, temperature=0, max_tokens=20000, **settings)
    model = app.session.engine.model
    model.config = dataclasses.replace(model.config, eos_token_ids=())
    return app


def stats_rows(app) -> dict:
    table = notices(app)[-1]
    assert table.startswith("last answer"), table
    return {line[:15].strip(): line[15:].strip() for line in table.splitlines()[1:]}


def test_stats_right_after_escape_describe_the_stopped_answer(checkpoints):
    app = long_answering_app(checkpoints)

    async def scenario(pilot):
        await send(pilot, "/set max_tokens=5")
        await send(pilot, "hi")
        await send(pilot, "/stats")
        finished = stats_rows(app)
        assert finished["finish"] == "length" and finished["decode"].startswith("5 tok")
        await send(pilot, "/set max_tokens=20000")
        await pilot.click(ChatInput)
        app.query_one(ChatInput).load_text("hello there")
        await pilot.press("enter")
        while not app.query(AssistantTurn) or len(app.query(AssistantTurn).last().pending) < 40:
            await pilot.pause(0.02)
        await pilot.press("escape")
        app.query_one(ChatInput).load_text("/stats")  # typed before the answer has stopped
        await pilot.press("enter")
        await wait_idle(pilot, timeout=10)
        await pilot.pause(0.2)
        assert notices(app)[-2] == "stopped"
        rows = stats_rows(app)
        figures = app.controller.figures
        assert rows["finish"] == "stopped" and figures.finish == "stopped"
        assert rows["decode"].startswith(f"{figures.tokens} tok") and figures.tokens > 5
        assert rows["prompt tokens"].startswith(f"{figures.turn.prompt_tokens} (")
        assert figures.turn.prompt_tokens > figures.turn.reused_tokens > 0  # this turn's, not the first's
        assert figures.decode_tokens_per_s > 0 and f"decode {figures.decode_tokens_per_s:.1f} tok/s" in status(app)
        assert rows["context"].startswith(f"{app.session.context_used} / ")
        transcript = app.transcript  # the table is in view, not below the fold
        assert transcript.scroll_y == transcript.max_scroll_y
        table = app.query(Notice).last().region
        assert table.height and transcript.region.contains_region(table)

    run(app, scenario)


def test_clear_load_and_model_reset_the_figures(scripted_chat, checkpoints):
    app = make_app(scripted_chat, mtp=True)

    async def scenario(pilot):
        await send(pilot, "hi")
        assert "MTP 100% accepted" in status(app) and "decode" in status(app)
        await send(pilot, "/save first")
        await send(pilot, "/clear")
        line = status(app)
        assert "ctx 0/32768" in line and "decode" not in line and "accepted" not in line
        await send(pilot, "/stats")
        assert notices(app)[-1] == "error: no answer yet"
        await send(pilot, "hi")
        await send(pilot, "/load first")
        assert "ctx 0/32768" in status(app) and "decode" not in status(app)
        await send(pilot, "hi again")
        other = checkpoints("mimo")
        await send(pilot, f"/model {other}")
        while "now chatting with" not in notices(app)[-1]:
            await pilot.pause(0.05)
        line = status(app)
        assert line.startswith(str(other)) and "accepted" not in line and "decode" not in line and " 0/" in line
        await send(pilot, "/stats")
        assert notices(app)[-1] == "error: no answer yet"  # not the other model's answer
        await send(pilot, "hello")
        await send(pilot, "/stats")
        assert stats_rows(app)["model"] == str(other)

    run(app, scenario)


def test_a_message_after_set_shows_at_once(scripted_chat):
    app = make_app(scripted_chat)

    async def scenario(pilot):
        for _ in range(3):  # fill the transcript past the screen
            await send(pilot, "/help")
        await send(pilot, "/set temperature=0.5")
        await pilot.click(ChatInput)
        app.query_one(ChatInput).load_text("a message")
        await pilot.press("enter")
        await pilot.pause(0.1)
        user = app.query(UserTurn).last()
        assert str(user.render()) == "a message" and app.transcript.region.contains_region(user.region)
        await wait_idle(pilot)

    run(app, scenario)
