"""Where models live: turn what the user typed (alias, hub repo id, local directory) into a directory."""

from __future__ import annotations

from pathlib import Path

from .errors import MimoError


def resolve_model(name: str | Path | None, *, assume_yes: bool = False) -> Path:
    """The local model directory for `name`. The hub store (aliases, repo ids, pulls) builds on this."""
    if name is None:
        raise MimoError("no model given: pass --model PATH")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise MimoError(f"model directory not found: {name}")
