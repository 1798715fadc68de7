"""What a front end holds: a loaded model with its tokenizer, turning text into a token stream."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from . import generate
from .errors import MimoError
from .loader import load_model, resolve_device, resolve_dtype
from .models.model import MiMoForCausalLM
from .offload.hotness import start_recording
from .offload.options import with_budgets
from .offload.plan import MemoryPlan, PlanRequest, make_plan
from .sampling import SamplingSettings
from .thinking import generation_prompt
from .tokenizer import ChatTokenizer


DRAFT_VOCAB = 32768


def default_draft_vocab(vocab_size: int) -> int:
    """How many token ids MTP drafts over by default: the first 32768 of a large vocabulary (0: all).
    Byte-level BPE gives the earliest, most frequent merges the lowest ids, so these few rows hold
    nearly every token a draft gets right (FR-Spec's frequency-ranked drafting), while a draft
    over all 151k rows of MiMo's head reads them all for every drafted token."""
    return DRAFT_VOCAB if vocab_size > 2 * DRAFT_VOCAB else 0


def plan_load(path: str | Path, placement: PlanRequest, device, dtype, quant: str | None) -> MemoryPlan:
    """The memory plan of loading `path` with these flags on this machine (budgets detected where
    the flags leave them out)."""
    return make_plan(path, with_budgets(dataclasses.replace(placement, dtype=dtype, quant=quant), device))


@dataclass
class Engine:
    model: MiMoForCausalLM
    tokenizer: ChatTokenizer
    path: Path

    plan: MemoryPlan | None = None  # the offload plan the model was placed by

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", show_progress: bool = False,
             quant: str | None = None, placement: PlanRequest | None = None, mmap: bool = True, mlock: bool = False):
        """`placement`: the offload flags (budgets, --cpu-moe, ...): the model is planned first,
        refused when the plan does not fit, and loaded where the plan puts each part. `mmap`, `mlock`:
        see loader.load_model."""
        if not Path(path).is_dir():
            raise MimoError(f"model directory not found: {path}")
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        tokenizer = ChatTokenizer(path)
        plan = None
        if placement is not None:
            plan = plan_load(path, placement, torch_device, torch_dtype, quant)
            if not plan.fits:
                raise MimoError(plan.verdict())
            plan.placement.check_available()
        model = load_model(path, torch_dtype, torch_device, show_progress=show_progress, quant=quant,
                           placement=plan.placement if plan else None, mmap=mmap, mlock=mlock)
        if placement is not None:
            model.cache_type = placement.cache_type  # checked by make_plan
        start_recording(model)  # router statistics, saved beside the model by the front end
        return cls(model, tokenizer, Path(path), plan)

    @property
    def config(self):
        return self.model.config

    def prompt_ids(self, prompt: str, system: str | None = None, raw: bool = False,
                   thinking: bool | None = None) -> list[int]:
        """`thinking` None: the chat template's default (thinking.py)."""
        if raw:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.encode(generation_prompt(self.tokenizer, messages, thinking)[0])

    def speculation(self, mtp: bool | None, draft_tokens: int = 0, draft_vocab: int | None = None) -> dict:
        """stream() arguments for MTP speculation: on by default when the checkpoint has MTP layers,
        one draft per MTP layer unless `draft_tokens` says otherwise, drafting over
        `default_draft_vocab` ids unless `draft_vocab` says otherwise (0: the whole vocabulary)."""
        layers = len(self.model.mtp_layers)
        if mtp and not layers:
            raise MimoError(f"{self.path.name} has no MTP layers: --mtp is not possible")
        if mtp is False or not layers:
            return {"draft_tokens": 0}
        if draft_vocab is None:
            draft_vocab = default_draft_vocab(self.model.config.vocab_size)
        return {"draft_tokens": draft_tokens or layers, "draft_vocab": draft_vocab or None}

    def stream(self, prompt_ids: list[int], settings: SamplingSettings, cache=None, **speculation) -> Iterator:
        return generate.stream(self.model, self.tokenizer, prompt_ids, settings, cache=cache, **speculation)
