"""Token ids for GPTQ calibration and for the quality report, from the texts shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import MimoError
from ..tokenizer import ChatTokenizer


def shipped_text(name: str) -> str:
    return resources.files("mimo_local.quant").joinpath(name).read_text(encoding="utf-8")


def text_ids(model_dir: Path, text: str, limit: int, what: str) -> list[int]:
    ids = ChatTokenizer(model_dir).encode(text)[:limit]
    if len(ids) < 2:
        raise MimoError(f"the {what} text has fewer than 2 tokens")
    return ids


def calibration_ids(model_dir: Path, text: str | None, tokens: int) -> list[int]:
    """`tokens` ids of `text` (the shipped calibration text by default), repeated if it is shorter."""
    ids = text_ids(model_dir, text if text is not None else shipped_text("calibration_text.txt"), tokens, "calibration")
    while len(ids) < tokens:
        ids = ids + ids[: tokens - len(ids)]
    return ids


def read_text_file(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MimoError(f"cannot read text file {path}: {error}") from None
