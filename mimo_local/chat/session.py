"""One conversation: messages, settings, and a KV cache reused across turns.

Each turn renders the whole conversation with the checkpoint's chat template, finds the longest
common prefix with the token ids already in the cache, rewinds the cache to it (when every layer
still holds those positions) and feeds only the rest to the one generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..budget import spare_slots
from ..errors import MimoError
from ..generate import DoneEvent, GenerationStats, TokenEvent
from ..thinking import generation_prompt, prompt_opens_thinking
from .settings import ChatSettings

MAX_DEFAULT_CONTEXT = 32768


class ContextFull(MimoError):
    """The next turn does not fit the context and dropping old turns is not allowed (or not enough)."""


@dataclass
class TurnInfo:
    """What the last turn cost: how much of the prompt came from the cache."""

    prompt_tokens: int
    reused_tokens: int
    stopped: bool = False
    dropped_messages: int = 0


class ChatSession:
    def __init__(
        self,
        engine,
        model_name: str,
        settings: ChatSettings | None = None,
        system: str = "",
        mtp: bool | None = None,
        draft_tokens: int = 0,
        context: int | None = None,
    ):
        self.settings = check_raw((settings or ChatSettings()).validate(), system)
        self.system = system
        self.mtp, self.draft_tokens = mtp, draft_tokens
        self.requested_context = context
        self.messages: list[dict] = []
        self.context_start = 0  # messages before this index were dropped from the model's context
        self.last_stats: GenerationStats | None = None
        self.last_turn: TurnInfo | None = None
        self.on_prefill = None  # the front end's progress callback: (prompt tokens read, prompt tokens)
        self.answer_prefix = ""  # what the last prompt appended after the template's output
        self.use_engine(engine, model_name)

    # -- model and cache ---------------------------------------------------------------------------

    def use_engine(self, engine, model_name: str) -> None:
        speculation = engine.speculation(self.mtp, self.draft_tokens)
        limit = engine.config.max_position_embeddings
        context = self.requested_context or min(limit, MAX_DEFAULT_CONTEXT)
        if context < 16 or context > limit:
            raise MimoError(f"--ctx must be between 16 and {limit} for {model_name}")
        self.engine, self.model_name, self.speculation, self.context = engine, model_name, speculation, context
        self.cache = None

    @property
    def context_used(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def _cache_for(self, prompt_ids: list[int]) -> int:
        """Rewind (or allocate) the cache for `prompt_ids`; returns how many of them it already holds."""
        if self.cache is None:
            drafts = self.speculation["draft_tokens"]
            self.cache = self.engine.model.new_cache(self.context, spare_slots=spare_slots(drafts, rewind=True))
        # The cache holds exactly what was fed: that leaves out the last sampled token of the previous
        # answer and includes any drafts fed past a stop.
        return self.cache.rewind_for(prompt_ids)

    # -- conversation ------------------------------------------------------------------------------

    def prompt_text(self, messages: list[dict]) -> tuple[str, str]:
        """The prompt for `messages` with /think on or off (the template's `enable_thinking`), and the
        empty think block appended after the template's output when thinking is off and the template
        has no switch of its own (it begins the answer, so the answer is stored with it).
        Raw (no chat template): the messages' texts one after the other, as a text to continue."""
        if self.settings.raw:
            return "".join(message["content"] for message in messages), ""
        conversation = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return generation_prompt(self.engine.tokenizer, conversation, self.settings.think)

    def render(self, messages: list[dict]) -> list[int]:
        text, self.answer_prefix = self.prompt_text(messages)
        return self.engine.tokenizer.encode(text)

    def thinking_opened_by_prompt(self) -> bool:
        """Whether the rendered prompt already opened a <think> block the answer continues."""
        return prompt_opens_thinking(self.prompt_text([{"role": "user", "content": ""}])[0])

    def _fitting_prompt(self) -> tuple[list[int], int]:
        """Token ids of the conversation in context, dropping oldest turns if the settings allow."""
        room = min(self.settings.max_tokens, max(1, self.context // 4)) + self.speculation["draft_tokens"] + 1
        dropped = 0
        while True:
            ids = self.render(self.messages[self.context_start :])
            if len(ids) + room <= self.context:
                return ids, dropped
            in_context = self.messages[self.context_start :]
            if self.settings.overflow != "drop" or len(in_context) <= 1:
                hint = (
                    "/set overflow=drop drops the oldest turns, /clear starts over, --ctx gives more room"
                    if self.settings.overflow != "drop"
                    else "the last message alone is too long; shorten it or start with a larger --ctx"
                )
                raise ContextFull(
                    f"context full: {len(ids)} prompt tokens + {room} for the answer exceed the "
                    f"{self.context}-token context ({hint})"
                )
            # Drop the oldest user turn with its answer.
            step = 2 if len(in_context) > 2 and in_context[1]["role"] == "assistant" else 1
            self.context_start += step
            dropped += step

    def ask(self, text: str) -> Iterator[TokenEvent | DoneEvent]:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # a user turn left unanswered by an error is replaced, not stacked
        self.messages.append({"role": "user", "content": text})
        return self.reply()

    def reply(self) -> Iterator[TokenEvent | DoneEvent]:
        """Generate the assistant's answer to the last user message. Closing the iterator early stops
        the generation; the partial answer is kept and the cache stays exact."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise MimoError("nothing to answer: send a message first")
        prompt_ids, dropped = self._fitting_prompt()
        return self._generate(prompt_ids, dropped)

    def _generate(self, prompt_ids: list[int], dropped: int) -> Iterator[TokenEvent | DoneEvent]:
        reused = self._cache_for(prompt_ids)
        self.last_turn = TurnInfo(len(prompt_ids), reused, stopped=True, dropped_messages=dropped)
        pieces: list[str] = []
        events = self.engine.stream(
            prompt_ids[reused:], self.settings.sampling(), cache=self.cache, on_prefill=self.on_prefill,
            eos_ids=() if self.settings.ignore_eos else None, **self.speculation
        )
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    pieces.append(event.text)
                else:
                    self.last_stats = event.stats
                    self.last_turn.stopped = False
                yield event
        finally:
            events.close()
            if pieces or not self.last_turn.stopped:  # an error before the first token leaves no answer
                self.messages.append({"role": "assistant", "content": self.answer_prefix + "".join(pieces)})

    def regenerate(self) -> Iterator[TokenEvent | DoneEvent]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        return self.reply()

    def undo(self) -> str | None:
        """Remove the last exchange; returns the user text removed (None when there is nothing)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            return None
        removed = self.messages.pop()["content"]
        self.context_start = min(self.context_start, len(self.messages))
        return removed

    def clear(self) -> None:
        self.messages.clear()
        self.context_start = 0
        self.last_stats = self.last_turn = None

    def set_system(self, text: str) -> None:
        check_raw(self.settings, text)
        self.system = text

    def set_settings(self, settings: ChatSettings) -> None:
        self.settings = check_raw(settings.validate(), self.system)

    def last_answer(self) -> str | None:
        answers = [m["content"] for m in self.messages if m["role"] == "assistant"]
        return split_thinking(answers[-1]).answer if answers else None

    # -- persistence -------------------------------------------------------------------------------

    def to_payload(self) -> dict:
        return {
            "model": self.model_name,
            "system": self.system,
            "settings": self.settings.as_dict(),
            "messages": list(self.messages),
            "context_start": self.context_start,
        }

    def restore(self, payload: dict) -> None:
        messages = payload.get("messages", [])
        if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str) for m in messages):
            raise MimoError("the saved session has malformed messages")
        settings, system = ChatSettings.from_dict(payload.get("settings", {})), payload.get("system", "") or ""
        self.settings, self.system = check_raw(settings, system), system
        self.messages = [dict(m) for m in messages]
        self.context_start = min(int(payload.get("context_start", 0)), len(self.messages))
        self.last_stats = self.last_turn = None


def check_raw(settings: ChatSettings, system: str) -> ChatSettings:
    if settings.raw and system:
        raise MimoError("a raw chat sends its text without the chat template: it cannot have a system prompt")
    return settings


@dataclass
class Thinking:
    thinking: str
    answer: str
    thinking_done: bool  # the </think> arrived (or there was no thinking block at all)
    has_thinking: bool


def split_thinking(text: str, opened: bool = False) -> Thinking:
    """Split an answer into its <think>...</think> block and the rest. `opened`: the prompt already
    opened the block, so the text starts inside it."""
    stripped = text.lstrip()
    if not opened:
        if not stripped.startswith("<think>"):
            if "<think>".startswith(stripped) and stripped:  # the tag is still arriving
                return Thinking("", "", False, True)
            return Thinking("", text, True, False)
        stripped = stripped[len("<think>") :]
    body, closed, rest = stripped.partition("</think>")
    if not closed:
        return Thinking(body.strip("\n"), "", False, True)
    return Thinking(body.strip("\n"), rest.lstrip("\n"), True, bool(body.strip()))
