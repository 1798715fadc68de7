"""A tiny chat checkpoint that answers with a fixed, readable script, for chat and server tests.

The target is the bigram model of `make_bigram_with_oracle_mtp` (logits depend on the current token
only) with an lm_head that maps every script token to the next one: after the generation prompt it
writes `<think>THINKING</think>ANSWER<|im_end|>`; after an empty thinking block (thinking switched
off) it writes `ANSWER<|im_end|>`. Its MTP layers predict what the target will, so every draft is
accepted. The tokenizer is trained with the script in its corpus so that every script token is
distinct (a bigram model cannot repeat a token with two different successors), and has `<think>`
and `</think>` as added tokens, as Qwen3-style tokenizers do.

With `tool_calls`, the answer goes on with those calls written the way the chat template teaches
(MiMo-V2-Flash's XML or MiMo-7B's JSON, see `templates/`). Tool-call text repeats itself
(`</parameter>`, `<tool_call>` for parallel calls, newlines), so it is cut into pieces that are
each written once, added to the vocabulary as tokens of their own: the pieces cut through the tags
at odd places, as a real tokenizer's merges do, so a parser reading the stream meets split tags.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken

from ..checkpoint import INDEX_FILE, write_safetensors
from ..errors import MimoError
from ..thinking import EMPTY_THINKING, generation_prompt
from .tiny import make_bigram_with_oracle_mtp, make_checkpoint
from .tokenizer_files import corpus, train_tokenizer, write_tokenizer_files

THINKING = "The user greets me, so a short friendly reply fits."
ANSWER = "Hello! How can I help you today?"
TOOL_THINKING = "Paris weather needs a lookup, so I call get_weather."  # scripts for tool-call checkpoints
TOOL_ANSWER = "Checking now!"
THINK_TAGS = ["<think>", "</think>"]
LOGIT_SCALE = 12.0
TEMPLATES_DIR = Path(__file__).parent / "templates"
TEMPLATES = {"mimo-v2-flash": "mimo-v2-flash.jinja", "mimo-v2.5": "mimo-v2.5.jinja", "mimo-7b": "mimo-7b.jinja"}
PIECE_LENGTHS = (3, 5, 4, 6, 7)  # the cycle of piece lengths tool-call text is cut into


def chat_template(name: str) -> str:
    """A MiMo chat template shipped for test checkpoints: "mimo-v2-flash", "mimo-v2.5" or "mimo-7b"."""
    if name not in TEMPLATES:
        raise MimoError(f"unknown chat template '{name}' (choose from {', '.join(TEMPLATES)})")
    return (TEMPLATES_DIR / TEMPLATES[name]).read_text()


def make_scripted_chat_checkpoint(
    out_dir: str | Path,
    thinking: str = THINKING,
    answer: str = ANSWER,
    *,
    family: str = "mimo",
    template: str | None = None,
    tool_calls: list[dict] | None = None,
) -> Path:
    """`family`: the architecture, "mimo" (MiMo-7B) or "mimo_v2_flash". `template`: the chat
    template, a name from TEMPLATES or Jinja text (default: plain ChatML). `tool_calls`:
    [{"name": ..., "arguments": {...}}, ...] the model calls after ANSWER, in the format the
    template teaches (`mimo_local.serve.parsers.tool_format_for`)."""
    from ..serve.parsers import tool_format_for
    from ..tokenizer import ChatTokenizer

    if family not in ("mimo", "mimo_v2_flash"):
        raise MimoError(f"unknown family '{family}' (choose mimo or mimo_v2_flash)")
    template_text = chat_template(template) if template in TEMPLATES else template
    out_dir = Path(out_dir)
    base = make_checkpoint(out_dir.with_name(out_dir.name + ".base"), family, shards=1)
    make_bigram_with_oracle_mtp(base, out_dir, mtp="copy")
    config = json.loads((out_dir / "config.json").read_text())

    calls_text = ""
    if tool_calls:
        calls_text = ("\n\n" if answer else "") + format_tool_calls(
            tool_calls, tool_format_for(template_text, config["model_type"]))
    most_pieces = -(-len(calls_text) // min(PIECE_LENGTHS))
    tokenizer = train_tokenizer(
        config["vocab_size"] - len(THINK_TAGS) - most_pieces, corpus() + [thinking, answer] * 400
    )
    tokenizer.add_tokens(THINK_TAGS)

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    prose = ids(f"<think>{thinking}</think>{answer}")  # before the pieces join the vocabulary
    known = tokenizer.get_vocab_size()

    def usable(piece: str) -> bool:  # a new token, and never the end of a generation prompt
        tails = ("<|im_start|>assistant\n<think></think>", EMPTY_THINKING)
        return tokenizer.token_to_id(piece) is None and not any(piece in tail for tail in tails)

    pieces = _cut_into_pieces(calls_text, usable)
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in pieces])
    piece_ids = [tokenizer.token_to_id(piece) for piece in pieces]
    if any(token < known for token in piece_ids):
        raise MimoError("a tool-call piece is already a token of the vocabulary (choose other arguments)")
    special = write_tokenizer_files(out_dir, tokenizer)
    if template_text is not None:
        _set_chat_template(out_dir, template_text)
    eos, pad = special["<|im_end|>"], special["<|endoftext|>"]
    config.update(eos_token_id=eos, pad_token_id=pad)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = json.loads((out_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [eos, pad]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))

    script = prose + piece_ids + [eos]
    repeated = [token for token in set(script) if script.count(token) > 1]
    if repeated:
        raise MimoError(f"the script repeats the token {tokenizer.decode([repeated[0]])!r}; "
                        "a bigram model cannot write it (choose other words)")
    successors = dict(zip(script, script[1:]))
    think_open, think_close = script[0], prose.index(tokenizer.token_to_id("</think>"))
    starts = {"think": think_open, "thinking": script[1], "answer": script[think_close + 1]}
    for prompt, start in _generation_prompts(ChatTokenizer(out_dir), tool_calls or []):
        last = ids(prompt)[-1]
        if successors.setdefault(last, starts[start]) != starts[start]:
            raise MimoError(f"the generation prompt ends in a script token ({prompt[-20:]!r}); cannot script it")

    _write_lm_head(out_dir, successors)
    return out_dir


def format_tool_calls(tool_calls: list[dict], tool_format: str) -> str:
    """The calls as MiMo writes them: V2-Flash's XML (values as its template renders past calls:
    JSON for objects and lists, the plain text otherwise) or MiMo-7B's JSON."""
    blocks = []
    for call in tool_calls:
        name, arguments = call["name"], call.get("arguments", {})
        if tool_format == "xml":
            parameters = "".join(
                f"<parameter={key}>{json.dumps(value) if isinstance(value, (dict, list)) else value}</parameter>\n"
                for key, value in arguments.items()
            )
            blocks.append(f"<tool_call>\n<function={name}>\n{parameters}</function>\n</tool_call>")
        else:
            blocks.append("<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>")
    return "\n".join(blocks)


def _cut_into_pieces(text: str, usable) -> list[str]:
    """Cut `text` into pieces of about PIECE_LENGTHS characters, each one different from the others
    and `usable` (not a token already, not a part of a generation prompt's end)."""
    pieces: list[str] = []
    lengths = itertools.cycle(PIECE_LENGTHS)
    start = 0
    while start < len(text):
        first_end = min(start + next(lengths), len(text))
        fresh = (text[start:end] for end in range(first_end, len(text) + 1))
        piece = next((p for p in fresh if p not in pieces and usable(p)), None)
        if piece is None:  # every piece from here on is taken: the rest joins the piece before
            if not pieces or pieces[-1] + text[start:] in pieces:
                raise MimoError("cannot cut the tool calls into distinct tokens (choose other arguments)")
            pieces[-1] += text[start:]
            break
        pieces.append(piece)
        start += len(piece)
    return pieces


def _generation_prompts(tokenizer, tool_calls: list[dict]):
    """(prompt, what the model writes next) for the ways a front end may end the prompt: the
    template's generation prompt with thinking on, off or at its default, with and without tools,
    and `mimo chat --no-think`'s empty thinking block."""
    from ..serve.parsers import prompt_ends_in_reasoning

    messages = [{"role": "user", "content": "What is the weather like?"}]
    no_parameters = {"type": "object", "properties": {}}
    tools = [{"type": "function", "function": {"name": call["name"], "parameters": no_parameters}} for call in tool_calls]
    for options in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        for tool_list in ([None, tools] if tools else [None]):
            prompt = tokenizer.render_chat(messages, tools=tool_list, **options)
            if prompt_ends_in_reasoning(prompt):
                yield prompt, "thinking"
            elif prompt.rstrip().endswith("</think>"):
                yield prompt, "answer"
            else:
                yield prompt, "think"
    yield generation_prompt(tokenizer, messages, False)[0], "answer"  # `mimo chat --no-think`


def _set_chat_template(out_dir: Path, template: str) -> None:
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _write_lm_head(out_dir: Path, successors: dict[int, int]) -> None:
    """lm_head row of each successor = the direction of its predecessor's normalized embedding."""
    index_path = out_dir / INDEX_FILE
    index = json.loads(index_path.read_text())["weight_map"] if index_path.exists() else {}
    embed_file = out_dir / index.get("model.embed_tokens.weight", "model.safetensors")
    head_file = out_dir / index.get("lm_head.weight", "model.safetensors")
    embeddings = load_file(embed_file)["model.embed_tokens.weight"].float()
    tensors = load_file(head_file)
    head = torch.zeros_like(tensors["lm_head.weight"], dtype=torch.float32)
    for token, successor in successors.items():
        direction = embeddings[token] / embeddings[token].norm()
        head[successor] += LOGIT_SCALE * direction
    tensors["lm_head.weight"] = head.to(tensors["lm_head.weight"].dtype)
    write_safetensors(head_file, tensors)
