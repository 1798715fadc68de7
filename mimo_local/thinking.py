"""The generation prompt with thinking switched on, off, or left to the chat template's default.

MiMo's templates take `enable_thinking` and differ in what they do with it (tokenizer_config.json's
`chat_template`, see mimo_local/dev/templates/README.md for the sources):

- MiMo-V2-Flash: default off; on ends the prompt at `<|im_start|>assistant\\n` (the model writes
  `<think>` itself), off at `<|im_start|>assistant\\n<think></think>`;
- MiMo-V2.5 / V2.5-Pro / V2.6: the same two endings, default on;
- MiMo-7B (and any ChatML template): no such variable; thinking off is asked for by starting the
  answer after an empty think block, the way Qwen3's template does it.

So `enable_thinking` is passed whenever the caller chose, and the empty block is appended only when
thinking is off and the template has not closed a think block already (appending it after the V2
templates' `<think></think>` would show the model two).
"""

from __future__ import annotations

EMPTY_THINKING = "<think>\n\n</think>\n\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def generation_prompt(tokenizer, messages: list[dict], thinking: bool | None, **template_kwargs) -> tuple[str, str]:
    """(prompt text, what was appended to the template's output). `thinking` None: the template's default."""
    if thinking is not None:
        template_kwargs["enable_thinking"] = thinking
    text = tokenizer.render_chat(messages, **template_kwargs)
    appended = EMPTY_THINKING if thinking is False and not text.rstrip().endswith(THINK_CLOSE) else ""
    return text + appended, appended


def prompt_opens_thinking(text: str) -> bool:
    """Whether the prompt itself opened a think block that the answer continues."""
    return text.rstrip().endswith(THINK_OPEN)
