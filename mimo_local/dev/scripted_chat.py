"""A tiny chat checkpoint that answers with a fixed, readable script, for chat tests and demos.

The target is the bigram model of `make_bigram_with_oracle_mtp` (logits depend on the current token
only) with an lm_head that maps every script token to the next one: after the generation prompt it
writes `<think>THINKING</think>ANSWER<|im_end|>`; after an empty thinking block (thinking switched
off) it writes `ANSWER<|im_end|>`. Its MTP layers predict what the target will, so every draft is
accepted. The tokenizer is trained with the script in its corpus so that every script token is
distinct (a bigram model cannot repeat a token with two different successors), and has `<think>`
and `</think>` as added tokens, as Qwen3-style tokenizers do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import INDEX_FILE, write_safetensors
from ..errors import MimoError
from .tiny import make_bigram_with_oracle_mtp, make_checkpoint
from .tokenizer_files import corpus, train_tokenizer, write_tokenizer_files

THINKING = "The user greets me, so a short friendly reply fits."
ANSWER = "Hello! How can I help you today?"
THINK_TAGS = ["<think>", "</think>"]
LOGIT_SCALE = 12.0


def make_scripted_chat_checkpoint(out_dir: str | Path, thinking: str = THINKING, answer: str = ANSWER) -> Path:
    out_dir = Path(out_dir)
    base = make_checkpoint(out_dir.with_name(out_dir.name + ".base"), "mimo", shards=1)
    make_bigram_with_oracle_mtp(base, out_dir, mtp="copy")
    config = json.loads((out_dir / "config.json").read_text())

    tokenizer = train_tokenizer(config["vocab_size"] - len(THINK_TAGS), corpus() + [thinking, answer] * 400)
    tokenizer.add_tokens(THINK_TAGS)
    special = write_tokenizer_files(out_dir, tokenizer)
    eos, pad = special["<|im_end|>"], special["<|endoftext|>"]
    config.update(eos_token_id=eos, pad_token_id=pad)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = json.loads((out_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [eos, pad]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    generation_prompt = ids("<|im_start|>assistant\n")
    thinking_off = ids("<think>\n\n</think>\n\n")
    script = [generation_prompt[-1]] + ids(f"<think>{thinking}</think>{answer}") + [special["<|im_end|>"]]
    successors = dict(zip(script, script[1:]))
    answer_start = ids(f"</think>{answer}")[1]
    if len(set(script)) != len(script) or thinking_off[-1] in successors:
        raise MimoError("the script repeats a token; a bigram model cannot write it (choose other words)")
    successors[thinking_off[-1]] = answer_start

    _write_lm_head(out_dir, successors)
    return out_dir


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
