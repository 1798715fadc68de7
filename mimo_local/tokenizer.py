"""The checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json)."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from . import limits
from .chat_template import render_template
from .errors import MimoError


class ChatTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        with limits.reading(model_dir):
            self._read(model_dir)

    def _read(self, model_dir: Path) -> None:
        path = model_dir / "tokenizer.json"
        if not os.path.lexists(path):
            raise MimoError(f"{model_dir}: no tokenizer.json")
        data = limits.read_capped(path, limits.MAX_TOKENIZER_BYTES)
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as error:  # the tokenizers library raises plain Exception subclasses
            raise MimoError(f"{path}: cannot be read ({str(error).splitlines()[0][:200] if str(error) else type(error).__name__})") from None
        config_path = model_dir / "tokenizer_config.json"
        self.config = (
            limits.read_json_object(config_path, limits.MAX_TOKENIZER_CONFIG_BYTES) if os.path.lexists(config_path) else {}
        )
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = next(
                (t.get("template") for t in self.chat_template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise MimoError(f"{config_path}: chat_template is {limits.json_type(self.chat_template)}, not a string")

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def special_token(self, key: str) -> str | None:
        value = self.config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """`template_kwargs`: further template variables (`tools`, `enable_thinking`, ...). Rendering is
        bounded in time and size (chat_template.py) and safe to call from any thread."""
        if not self.chat_template:
            raise MimoError("this model's tokenizer_config.json has no chat_template (use --raw)")
        return render_template(
            self.chat_template,
            **template_kwargs,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special_token("bos_token") or "",
            eos_token=self.special_token("eos_token") or "",
        )


UTF8_MAX_BYTES = 4


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            return self._commit(len(self.ids), full[len(prefix) :])
        if len(self.ids) - self.read_offset >= UTF8_MAX_BYTES:
            # Only the last three tokens can still be the start of a character (one byte per token at
            # least): what came before is invalid for good and goes out as U+FFFD, so a model that
            # repeats a stray byte token does not hold its stream back until the end.
            cut = len(self.ids) - (UTF8_MAX_BYTES - 1)
            return self._commit(cut, decode(self.ids[self.prefix_offset : cut])[len(prefix) :])
        return ""

    def _commit(self, read_to: int, text: str) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, read_to
        return text

    def flush(self) -> str:
        """Whatever is still held back (e.g. a final incomplete UTF-8 sequence, shown as U+FFFD)."""
        decode = self.tokenizer.decode
        rest = decode(self.ids[self.prefix_offset :])[len(decode(self.ids[self.prefix_offset : self.read_offset])) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest
