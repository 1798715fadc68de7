"""A transient progress bar on stderr while a long prompt is prefilled (`mimo run`, the chat REPL):
generate tells `on_prefill(done, total)` after each chunk; the bar appears for prompts of
PROGRESS_MIN_TOKENS or more and is gone before the answer starts."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

PROGRESS_MIN_TOKENS = 2048


class PrefillBar:
    def __init__(self, console: Console | None = None, min_tokens: int = PROGRESS_MIN_TOKENS):
        self.console = console or Console(stderr=True)
        self.min_tokens = min_tokens
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if total < self.min_tokens or not self.console.is_terminal:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("reading the prompt"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("tokens"), TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("prefill", total=total)
        self.progress.update(self.task, completed=done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> "PrefillBar":
        return self

    def __exit__(self, *_) -> None:
        self.close()
