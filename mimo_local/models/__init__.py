"""The MiMo families, one module each (mimo.py: MiMo-7B, mimo_v2_flash.py: MiMo-V2-Flash and its
successors), the registry the loader, the planner and the converter share, and the one way to build
a model on the meta device."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from . import mimo, mimo_v2_flash
from .layers import Router

FAMILIES = {"mimo": mimo, "mimo_v2_flash": mimo_v2_flash}


def family_module(config):
    """The module of `config`'s family: build(), weight_map(), count_mtp_layers()."""
    return FAMILIES[config.family]


@contextlib.contextmanager
def meta_device():
    """Build modules without allocating or initialising weights: torch's meta device context keeps
    the constructors from allocating (a V2-Flash MoE layer is 17 GB), and the random initialisers
    are skipped: on meta they do nothing but import torch._dynamo (~3 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def build_meta_model(config, num_mtp: int, dtype: torch.dtype):
    """The model of `config` with `num_mtp` MTP layers on the meta device, weights in `dtype` but
    the routers in float32 (routing is computed in fp32, as in the reference). Call inside
    `meta_device()` to change it further before it is materialized."""
    config = dataclasses.replace(config, num_mtp_layers=num_mtp)
    with meta_device():
        model = family_module(config).build(config, num_mtp).to(dtype)
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.float()
    if config.tie_word_embeddings:  # outside: meta_device() wraps every parameter it sees registered anew
        model.lm_head.weight = model.embed_tokens.weight
    return model
