"""Where models live: turn what the user typed (alias, hub repo id, demo model, local directory) into a directory.

The store is `$MIMO_HOME` (default `$XDG_DATA_HOME/mimo-local`, else `~/.local/share/mimo-local`):
`models/<org>--<name>[@<revision>]/` holds each pulled repository in hub layout, and `config.json`
holds settings such as the default model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MimoError
from ..jsonfile import write_json_atomic  # noqa: F401 - the store's writers take it from here

ALIASES = {
    "mimo-7b-base": "XiaomiMiMo/MiMo-7B-Base",
    "mimo-7b-sft": "XiaomiMiMo/MiMo-7B-SFT",
    "mimo-7b-rl": "XiaomiMiMo/MiMo-7B-RL",
    "mimo-7b-rl-0530": "XiaomiMiMo/MiMo-7B-RL-0530",
    "mimo-v2-flash": "XiaomiMiMo/MiMo-V2-Flash",
    "mimo-v2-flash-base": "XiaomiMiMo/MiMo-V2-Flash-Base",
    "mimo-v2.5": "XiaomiMiMo/MiMo-V2.5",
    "mimo-v2.5-pro": "XiaomiMiMo/MiMo-V2.5-Pro",
    "mimo-v2.6-flash": "XiaomiMiMo/MiMo-V2.6-Flash-RL",
    "mimo-v2.6-pro": "XiaomiMiMo/MiMo-V2.6-Pro-RL",
}
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_models"
DEMO_MODELS = ("mimo-nano", "mimo-nano-moe")
FALLBACK_DEFAULT_MODEL = "mimo-nano"
STATE_DIR = ".mimo"  # inside a pulled model: manifest, partial files, pull lock
MANIFEST = f"{STATE_DIR}/manifest.json"  # written last: the model is complete and verified
SOURCE = f"{STATE_DIR}/source.json"  # written first: which repository this directory is pulled from

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_REVISION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]*$")


@dataclass(frozen=True)
class ModelRef:
    """A model the user named, and where its files are (or will be) on disk."""

    name: str  # how to name it again on the command line
    kind: str  # "local" | "demo" | "hub"
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # None: the default branch

    @property
    def pull_command(self) -> str:
        return f"mimo pull {self.name}"


def home() -> Path:
    if os.environ.get("MIMO_HOME"):
        return Path(os.environ["MIMO_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser() / "mimo-local"


def models_dir() -> Path:
    return home() / "models"


def store_path(repo_id: str, revision: str | None) -> Path:
    folder = repo_id.replace("/", "--")
    if revision:
        folder += "@" + revision.replace("/", "--")
    return models_dir() / folder


def hub_ref(repo_id: str, revision: str | None, name: str | None = None) -> ModelRef:
    revision = None if revision in (None, "", "main") else revision
    if name is None:
        alias = next((a for a, repo in ALIASES.items() if repo == repo_id), None)
        name = alias if alias and not revision else repo_id + (f"@{revision}" if revision else "")
    return ModelRef(name, "hub", store_path(repo_id, revision), repo_id, revision)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".\\")) or text.endswith(("/", "\\")) or text.count("/") > 1


def parse_name(name: str | Path) -> ModelRef:
    """What `name` refers to, without touching the network."""
    text = str(name).strip()
    if not text:
        raise MimoError("empty model name")
    if text.lower() in ALIASES:
        return hub_ref(ALIASES[text.lower()], None, text.lower())
    if text.lower() in DEMO_MODELS:
        return ModelRef(text.lower(), "demo", DEMO_DIR / text.lower())
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelRef(text, "local", path.resolve())
    if _looks_like_path(text.partition("@")[0]) or path.exists():
        raise MimoError(f"model directory not found: {text}")
    repo_id, at, revision = text.partition("@")
    if _REPO_ID.match(repo_id) and (not at or _REVISION.match(revision)):
        return hub_ref(repo_id, revision or None, text if at else None)
    raise MimoError(
        f"unknown model '{text}': give an alias ({', '.join(ALIASES)}), a demo model ({', '.join(DEMO_MODELS)}), "
        "a hub repo id org/name[@revision] or a model directory"
    )


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


# --- settings -------------------------------------------------------------------------------


def settings_path() -> Path:
    return home() / "config.json"


def read_settings() -> dict:
    path = settings_path()
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise MimoError(f"{path}: not valid JSON ({error}); fix or delete it") from None
    if not isinstance(settings, dict):
        raise MimoError(f"{path}: expected a JSON object; fix or delete it")
    return settings


def default_model() -> str:
    """The model used when none is named: the configured default, else the packaged mimo-nano."""
    return read_settings().get("default_model") or FALLBACK_DEFAULT_MODEL


def set_default_model(name: str | None) -> str:
    """Store `name` (checked, local directories made absolute) as the default; None restores mimo-nano."""
    settings = read_settings()
    if name is None:
        settings.pop("default_model", None)
        value = FALLBACK_DEFAULT_MODEL
    else:
        ref = parse_name(name)
        value = str(ref.path) if ref.kind == "local" else ref.name
        settings["default_model"] = value
    write_json_atomic(settings_path(), settings)
    return value


# --- resolving ------------------------------------------------------------------------------
