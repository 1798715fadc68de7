"""Saved chat sessions: one JSON file per name under the data directory, written atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import MimoError
from ..store.names import home

SESSION_FORMAT = "mimo-chat-session"
SESSION_VERSION = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def sessions_dir() -> Path:
    return home() / "sessions"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise MimoError(f"bad session name '{name}': use letters, digits, '.', '_' or '-'")
    return name


def session_path(name: str) -> Path:
    return sessions_dir() / f"{check_name(name)}.json"


def save_session(name: str, payload: dict) -> Path:
    """Write through a temporary file and rename it into place, so a crash or kill leaves either
    the old file or the new one, never a torn one."""
    path = session_path(name)
    document = {"format": SESSION_FORMAT, "version": SESSION_VERSION, "saved_at": _now(), **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(document, file, ensure_ascii=False, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as error:
        raise MimoError(f"cannot save session '{name}': {error.strerror or error}") from None
    return path


def load_session(name: str) -> dict:
    path = session_path(name)
    if not path.exists():
        raise MimoError(f"no saved session '{name}' (see /sessions)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MimoError(f"session '{name}' cannot be read: {error}") from None
    if not isinstance(document, dict) or document.get("format") != SESSION_FORMAT:
        raise MimoError(f"{path} is not a mimo chat session")
    if document.get("version") != SESSION_VERSION:
        raise MimoError(f"session '{name}' has format version {document.get('version')}, expected {SESSION_VERSION}")
    return document


@dataclass
class SessionInfo:
    name: str
    saved_at: str
    model: str
    messages: int


def list_sessions() -> list[SessionInfo]:
    """Saved sessions, newest first (files that are not readable sessions are left out)."""
    infos = []
    directory = sessions_dir()
    for path in directory.glob("*.json") if directory.is_dir() else []:
        try:
            document = load_session(path.stem)
        except MimoError:
            continue
        infos.append(
            SessionInfo(path.stem, document.get("saved_at", ""), document.get("model", ""), len(document.get("messages", [])))
        )
    return sorted(infos, key=lambda info: info.saved_at, reverse=True)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
