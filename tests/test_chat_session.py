"""Chat sessions: KV reuse across turns is exact, rewinds respect sliding windows, context overflow,
saved sessions, settings and slash-command parsing."""

import json

import pytest
import torch

from mimo_local.chat import commands, store
from mimo_local.chat.session import ChatSession, ContextFull, split_thinking
from mimo_local.chat.controller import ChatController
from mimo_local.chat.settings import ChatSettings, describe
from mimo_local.dev.scripted_chat import ANSWER, THINKING
from mimo_local.engine import Engine
from mimo_local.errors import MimoError
from mimo_local.generate import DoneEvent


def drain(events):
    return "".join(e.text for e in events if not isinstance(e, DoneEvent))


def next_turn_logits(session, text):
    """Logits for the first answer token of a new turn, through the session's reused cache, and from
    a fresh cache with the whole conversation prefilled."""
    session.messages.append({"role": "user", "content": text})
    ids = session.render(session.messages)
    reused = session._cache_for(ids)
    model = session.engine.model
    reused_logits = model(torch.tensor([ids[reused:]]), session.cache).logits[0, -1]
    fresh_logits = model(torch.tensor([ids]), model.new_cache(len(ids) + 8)).logits[0, -1]
    return reused, len(ids), reused_logits, fresh_logits


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_reused_cache_logits_equal_a_fresh_prefill(checkpoints, family):
    engine = Engine.load(checkpoints(family), dtype="float32")
    session = ChatSession(engine, family, ChatSettings(temperature=0, max_tokens=12), mtp=False, context=512)
    drain(session.ask("What does the with statement do?"))
    drain(session.ask("And a for loop?"))
    reused, total, reused_logits, fresh_logits = next_turn_logits(session, "Thanks.")
    assert 0 < reused < total
    assert torch.allclose(reused_logits, fresh_logits, atol=1e-4)


def test_stopping_mid_answer_keeps_the_cache_exact(checkpoints):
    engine = Engine.load(checkpoints("mimo"), dtype="float32")
    session = ChatSession(engine, "mimo", ChatSettings(temperature=0, max_tokens=200), mtp=False, context=512)
    events = session.ask("Tell me a long story.")
    for _, event in zip(range(5), events):
        pass
    events.close()  # what Esc does between tokens
    assert session.last_turn.stopped and session.messages[-1]["role"] == "assistant"
    assert session.last_stats is None
    reused, _, reused_logits, fresh_logits = next_turn_logits(session, "Go on.")
    assert reused > 0
    assert torch.allclose(reused_logits, fresh_logits, atol=1e-4)


def test_mtp_answers_continue_on_the_reused_cache(scripted_chat):
    session = ChatSession(Engine.load(scripted_chat), "scripted", ChatSettings(temperature=0))
    assert session.speculation["draft_tokens"] == 1
    first = drain(session.ask("hi"))
    second = drain(session.ask("hi again"))
    assert first == second == f"<think>{THINKING}</think>{ANSWER}"
    assert session.last_stats.speculation.accepted > 0
    assert session.last_turn.reused_tokens > session.last_stats.prompt_tokens  # history came from the cache


def test_second_turn_prefills_only_the_new_turn(scripted_chat):
    session = ChatSession(Engine.load(scripted_chat), "scripted", ChatSettings(temperature=0), mtp=False)
    drain(session.ask("hi"))
    new_tokens = []
    for _ in range(3):
        drain(session.ask("hi again"))
        new_tokens.append(session.last_stats.prompt_tokens)
        assert session.last_turn.reused_tokens + session.last_stats.prompt_tokens == session.last_turn.prompt_tokens
    # The model's own answer re-tokenizes identically: each turn prefills the same few new tokens
    # (the new user turn and the previous answer's last token, never fed back) whatever the history.
    assert new_tokens[0] == new_tokens[1] == new_tokens[2] < 24
    assert session.context_used == session.last_turn.prompt_tokens + session.last_stats.completion_tokens - 1


def test_rewinding_a_ring_past_its_spare_slots_is_refused(checkpoints):
    engine = Engine.load(checkpoints("mimo_v2_flash"), dtype="float32")
    model = engine.model
    cache = model.new_cache(256, spare_slots=4)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    model(ids, cache)
    assert cache.can_truncate(40) and cache.can_truncate(36)
    assert not cache.can_truncate(35)
    assert cache.can_truncate(0) and not cache.can_truncate(41)
    cache.truncate(36)
    continued = model(ids[:, 36:], cache, all_logits=True).logits
    fresh = model(ids, model.new_cache(256), all_logits=True).logits[:, 36:]
    assert (continued - fresh).abs().max().item() < 1e-4
    full = Engine.load(checkpoints("mimo"), dtype="float32").model
    full_cache = full.new_cache(64)
    full(ids, full_cache)
    assert full_cache.can_truncate(1)


def test_editing_far_back_on_sliding_layers_falls_back_to_a_full_prefill(checkpoints):
    engine = Engine.load(checkpoints("mimo_v2_flash"), dtype="float32")
    session = ChatSession(engine, "v2", ChatSettings(temperature=0, max_tokens=150), mtp=False, context=512)
    drain(session.ask("first question"))
    drain(session.ask("second question"))
    session.undo()  # the rewind target is now ~160 tokens back: beyond the ring's spare slots
    reused, total, reused_logits, fresh_logits = next_turn_logits(session, "another second question")
    assert reused == 0
    assert torch.allclose(reused_logits, fresh_logits, atol=1e-4)


def test_context_overflow_refuses_or_drops_the_oldest_turns(scripted_chat):
    engine = Engine.load(scripted_chat)
    long = "hi again, " * 6
    probe = ChatSession(engine, "scripted", ChatSettings(temperature=0), mtp=False)
    drain(probe.ask("hi"))
    both = len(probe.render(probe.messages + [{"role": "user", "content": long}]))
    context = both + 24  # room for the answer: min(max_tokens, context // 4) + 1 = 25 tokens

    session = ChatSession(engine, "scripted", ChatSettings(temperature=0, max_tokens=24), mtp=False, context=context)
    assert drain(session.ask("hi")).endswith(ANSWER)
    with pytest.raises(ContextFull, match=rf"context full: {both} prompt tokens \+ 25 .* {context}-token context \(/set overflow=drop"):
        drain(session.ask(long))
    session.set_settings(session.settings.with_assignments(["overflow=drop"]))
    assert drain(session.ask(long)).endswith(ANSWER)
    assert session.last_turn.dropped_messages == 2 and session.context_start == 2
    assert len(session.messages) == 4  # the transcript keeps what left the context
    with pytest.raises(ContextFull, match="the last message alone is too long"):
        drain(session.ask("word " * 100))


def test_think_off_starts_the_answer_after_an_empty_thinking_block(scripted_chat):
    session = ChatSession(Engine.load(scripted_chat), "scripted", ChatSettings(temperature=0, think=False), mtp=False)
    assert drain(session.ask("hi")) == ANSWER
    parts = split_thinking(session.messages[-1]["content"])
    assert parts.answer == ANSWER and not parts.has_thinking


def test_split_thinking_while_streaming():
    assert split_thinking("<thi") == split_thinking("<thi")  # a tag still arriving is not the answer
    assert split_thinking("<thi").answer == "" and not split_thinking("<thi").thinking_done
    partial = split_thinking("<think>\nweighing it")
    assert (partial.thinking, partial.answer, partial.thinking_done) == ("weighing it", "", False)
    done = split_thinking("<think>\nweighing it\n</think>\n\nYes.")
    assert (done.thinking, done.answer, done.thinking_done, done.has_thinking) == ("weighing it", "Yes.", True, True)
    assert split_thinking("plain answer").answer == "plain answer"
    assert split_thinking("still thinking", opened=True).thinking == "still thinking"


def test_sessions_are_saved_atomically_and_restored(scripted_chat, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    session = ChatSession(Engine.load(scripted_chat), "scripted", ChatSettings(temperature=0), mtp=False)
    session.set_system("Be brief.")
    drain(session.ask("hi"))
    path = store.save_session("greeting", session.to_payload())
    assert path == tmp_path / "sessions" / "greeting.json"
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save_session("greeting", {"messages": []})
    monkeypatch.undo()
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["greeting.json"]  # no temporary left behind

    other = ChatSession(Engine.load(scripted_chat), "scripted", mtp=False)
    other.restore(store.load_session("greeting"))
    assert other.messages == session.messages and other.system == "Be brief." and other.settings.temperature == 0
    assert [info.name for info in store.list_sessions()] == ["greeting"]
    (path.parent / "broken.json").write_text("{not json")
    with pytest.raises(MimoError, match="session 'broken' cannot be read"):
        store.load_session("broken")
    with pytest.raises(MimoError, match="no saved session 'nope'"):
        store.load_session("nope")
    with pytest.raises(MimoError, match="bad session name"):
        store.save_session("../escape", {})


def test_xdg_data_home_is_the_default_base(monkeypatch, tmp_path):
    monkeypatch.delenv("MIMO_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert store.sessions_dir() == tmp_path / "mimo-local" / "sessions"


def test_settings_assignments_and_their_errors():
    settings = ChatSettings().with_assignments(["temperature=0.2", "top_p=0.9", "max_tokens=64", "think=off"])
    assert (settings.temperature, settings.top_p, settings.max_tokens, settings.think) == (0.2, 0.9, 64, False)
    assert ChatSettings() == ChatSettings(temperature=0.6, top_p=0.95)  # MiMo's model-card defaults
    for bad, message in [
        ("temperature=hot", "temperature must be a number, got 'hot'"),
        ("top_p=2", r"top_p must be in \(0, 1\]"),
        ("max_tokens=0", "max_tokens must be >= 1"),
        ("colour=red", "unknown setting 'colour'"),
        ("temperature", "expected key=value"),
        ("overflow=sometimes", "overflow must be one of refuse, drop"),
    ]:
        with pytest.raises(MimoError, match=message):
            ChatSettings().with_assignments([bad])


def test_stop_ignore_eos_and_raw_settings(scripted_chat, tmp_path, monkeypatch):
    """/set changes them like any setting, a saved session keeps them, and a raw chat (no chat
    template) refuses what only a template can carry: a system prompt and the thinking switch."""
    settings = ChatSettings().with_assignments(["stop=How", "ignore_eos=on", "raw=on"])
    assert (settings.stop, settings.ignore_eos, settings.raw) == (("How",), True, True)
    assert 'stop=["How"]' in describe(settings) and "stop=none" in describe(ChatSettings())
    assert settings.with_assignments(["stop=none"]).stop == ()
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))
    session = ChatSession(Engine.load(scripted_chat), "scripted", settings, mtp=False)
    store.save_session("raw", session.to_payload())
    restored = ChatSession(session.engine, "scripted", mtp=False)
    restored.restore(store.load_session("raw"))
    assert restored.settings == settings
    controller = ChatController(session, load_engine=None)
    for line, message in [("/system Be brief.", "cannot have a system prompt"), ("/think off", "no chat template")]:
        with pytest.raises(MimoError, match=message):
            controller.handle(line)
    session.set_settings(ChatSettings())
    controller.handle("/system Be brief.")
    with pytest.raises(MimoError, match="cannot have a system prompt"):
        controller.handle("/set raw=on")
    assert not session.settings.raw


def test_command_parsing_errors_and_completion():
    assert commands.parse("/set temperature=0.1") == commands.Command("set", "temperature=0.1")
    assert commands.parse("/THINK off") == commands.Command("think", "off")
    for line, message in [
        ("/sav x", r"unknown command /sav \(did you mean /save\?\)"),
        ("/frobnicate", r"unknown command /frobnicate \(try /help\)"),
        ("/clear now", "/clear takes no argument"),
        ("/save", "/save needs an argument"),
        ("/load a/b", "bad session name"),
        ("/think maybe", "/think takes on or off"),
        ("/model", "/model needs an argument"),
    ]:
        with pytest.raises(MimoError, match=message):
            commands.parse(line)
    assert commands.complete("/s") == ["/system", "/set", "/save ", "/sessions", "/stats"]
    assert commands.common_completion("/se", commands.complete("/se")) == "/se"  # /set, /sessions
    assert commands.common_completion("/th", commands.complete("/th")) == "/think "
    assert commands.complete("/think o") == ["/think on", "/think off"]
    assert commands.complete("/set temperature=0.1 to") == ["/set temperature=0.1 top_p=", "/set temperature=0.1 top_k="]
    assert commands.complete("/load gr", ["greeting", "other"]) == ["/load greeting"]
    assert commands.complete("hello") == []
