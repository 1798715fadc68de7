"""From a name to a model directory, pulling a hub model the store lacks (with consent): the top of the
store's one-way chain names -> download -> pull -> resolve."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import MimoError
from . import pull
from .names import default_model, is_complete, parse_name


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def resolve_model(name: str | Path | None, *, assume_yes: bool = False, ask: bool = True) -> Path:
    """The local model directory for `name` (None: the default model).

    A hub model missing from the store is pulled first: with `assume_yes`, or after asking on a
    terminal (`ask=False`: never ask, e.g. inside a full-screen app). Otherwise the error names the
    pull command instead.
    """
    ref = parse_name(default_model() if name is None else name)
    if ref.kind == "local":
        return ref.path
    if ref.kind == "demo":
        if not (ref.path / "config.json").is_file():
            raise MimoError(f"demo model {ref.name} is missing from this installation (expected {ref.path})")
        return ref.path
    if is_complete(ref.path):
        return ref.path
    if pull.offline():
        raise pull.offline_error(ref)
    if not assume_yes and not (ask and _interactive()):
        raise MimoError(f"{ref.name} is not downloaded: run `{ref.pull_command}` first (or pass --yes)")
    plan = pull.fetch_plan(ref)
    if not assume_yes and not _confirm(f"{ref.name} ({ref.repo_id}) is not downloaded. Pull {plan.size_text} now?"):
        raise MimoError(f"{ref.name} is not downloaded: run `{ref.pull_command}` to get it")
    return pull.download(plan)


def _confirm(question: str) -> bool:
    from rich.console import Console
    from rich.prompt import Confirm

    return Confirm.ask(question, console=Console(stderr=True), default=True)
