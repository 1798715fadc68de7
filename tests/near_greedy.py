"""Greedy answers of two models that compute the same thing up to a known rounding (MXFP4 experts on
int8-rounded activations against their float twin): where the reference has a top-2 tie closer than
that rounding, either token is its answer, so token-for-token equality would test luck. Instead the
reference, fed the other's answer, must score each of its tokens within the bound of its best."""

import torch

from mimo_local.engine import Engine

LOGIT_BOUND = 0.02  # of 1 + the largest logit: tests/test_mxfp4.py measured 0.05 at logits up to 4


def assert_near_greedy(reference_dir, prompt: str, tokens: list[int]) -> None:
    engine = Engine.load(reference_dir, dtype="bfloat16")
    ids = engine.prompt_ids(prompt)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids + tokens]), engine.model.new_cache(len(ids) + len(tokens)),
                              all_logits=True).logits[0, len(ids) - 1 : -1].float()
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    shortfall = logits.max(-1).values - chosen
    assert shortfall.max() <= LOGIT_BOUND * (1 + logits.abs().max()), shortfall.tolist()
