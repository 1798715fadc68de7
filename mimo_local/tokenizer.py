"""The checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .errors import MimoError


class ChatTokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise MimoError(f"{model_dir}: no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises plain Exception subclasses
            raise MimoError(f"{path}: cannot be read ({error})") from None
        config_path = model_dir / "tokenizer_config.json"
        try:
            self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MimoError(f"{config_path}: not valid JSON ({error})") from None
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = next(
                (t["template"] for t in self.chat_template if t.get("name") == "default"), None
            )

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def special_token(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """`template_kwargs`: further template variables (`tools`, `enable_thinking`, ...)."""
        if not self.chat_template:
            raise MimoError("this model's tokenizer_config.json has no chat_template (use --raw)")
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_template_error
        environment.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
        try:
            template = environment.from_string(self.chat_template)
            return template.render(
                **template_kwargs,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.special_token("bos_token") or "",
                eos_token=self.special_token("eos_token") or "",
            )
        except TemplateError as error:
            raise MimoError(f"chat template failed: {error}") from None


def _raise_template_error(message: str):
    raise TemplateError(message)


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
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a final incomplete UTF-8 sequence, shown as U+FFFD)."""
        decode = self.tokenizer.decode
        rest = decode(self.ids[self.prefix_offset :])[len(decode(self.ids[self.prefix_offset : self.read_offset])) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return rest
