"""What a request asks of the sampler (no torch here: the CLI reads these defaults at start-up)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import MimoError


@dataclass
class SamplingSettings:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingSettings":
        numbers = (self.temperature, self.top_p, self.min_p, self.repetition_penalty, self.presence_penalty,
                   self.frequency_penalty)
        if not all(math.isfinite(number) for number in numbers):
            raise MimoError("sampling settings must be finite numbers (not inf or nan)")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise MimoError(message)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
