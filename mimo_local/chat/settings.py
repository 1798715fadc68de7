"""The knobs a chat user can turn with /set and /think, with MiMo's model-card defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from ..errors import MimoError
from ..sampling import SamplingSettings

OVERFLOW_POLICIES = ("refuse", "drop")


SAMPLING_DEFAULTS = SamplingSettings()


@dataclass(frozen=True)
class ChatSettings:
    temperature: float = SAMPLING_DEFAULTS.temperature
    top_p: float = SAMPLING_DEFAULTS.top_p
    top_k: int = SAMPLING_DEFAULTS.top_k
    min_p: float = SAMPLING_DEFAULTS.min_p
    repetition_penalty: float = SAMPLING_DEFAULTS.repetition_penalty
    max_tokens: int = 2048
    seed: int | None = None
    think: bool = True
    overflow: str = "refuse"  # what a turn that does not fit the context does: refuse, or drop oldest turns
    stop: tuple[str, ...] = ()  # stop strings: an answer ends before the first one it writes
    ignore_eos: bool = False  # go on past end-of-text tokens up to max_tokens
    raw: bool = False  # no chat template: the prompt is the conversation's texts one after the other

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
        )

    def validate(self) -> "ChatSettings":
        self.sampling().validate()
        if self.overflow not in OVERFLOW_POLICIES:
            raise MimoError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise MimoError("stop must be a list of non-empty strings")
        return self

    def with_assignments(self, assignments: list[str]) -> "ChatSettings":
        """A copy with `key=value` assignments applied; raises MimoError on any bad key or value."""
        changes = {}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            if not sep or not key or not value:
                raise MimoError(f"expected key=value, got '{assignment}'")
            changes[key] = parse_value(key, value)
        return replace(self, **changes).validate()

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ChatSettings":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("stop"), list):  # JSON has no tuples
            values["stop"] = tuple(values["stop"])
        return cls(**values).validate()


SETTING_NAMES = tuple(f.name for f in fields(ChatSettings))
_TYPES = {f.name: f.type for f in fields(ChatSettings)}
_BOOLEANS = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}


def parse_value(key: str, value: str):
    kind = _TYPES.get(key)
    if kind is None:
        raise MimoError(f"unknown setting '{key}' (settings: {', '.join(SETTING_NAMES)})")
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            return int(value)
        if kind == "int | None":
            return None if value.lower() in ("none", "random") else int(value)
        if kind == "bool":
            return _BOOLEANS[value.lower()]
        if kind == "tuple[str, ...]":  # one stop string per /set (none: no stop strings)
            return () if value.lower() == "none" else (value,)
        return value
    except (ValueError, KeyError):
        expected = {"float": "a number", "int": "an integer", "int | None": "an integer or none", "bool": "on or off"}
        raise MimoError(f"{key} must be {expected[kind]}, got '{value}'") from None


def describe(settings: ChatSettings) -> str:
    def shown(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        if value is None:
            return "random"
        if isinstance(value, tuple):
            return json.dumps(list(value), ensure_ascii=False) if value else "none"
        return f"{value:g}" if isinstance(value, float) else value

    return " ".join(f"{k}={shown(v)}" for k, v in settings.as_dict().items())
