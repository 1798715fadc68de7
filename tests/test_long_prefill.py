"""Chunked prefill of long prompts: peak memory set by the chunk (and within the plan's activation
estimate), a Ctrl-C stops it within one chunk, and front ends are told its progress."""

import _thread
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mimo_local.budget import PREFILL_CHUNK
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.generate import prefill_chunks
from mimo_local.loader import load_model
from mimo_local.offload.plan import workspace_bytes

MEASURE = """
import json, sys, torch
from mimo_local.generate import prefill
from mimo_local.loader import load_model
from mimo_local.offload.plan import workspace_bytes

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024

torch.set_num_threads(1)
directory, dtype, tokens = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
model = load_model(directory, dtype)
ids = torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
prefill(model, model.new_cache(64), ids[:17])  # torch's lazy initialisation, on a few tokens
cache = model.new_cache(tokens)
for layer in cache.layers:  # fault the cache in: its bytes are the plan's KV, not activations
    layer.keys.fill_(1)
    layer.values.fill_(1)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
prefill(model, cache, ids)
print(json.dumps({"growth": status("VmHWM") - before, "estimate": workspace_bytes(model.config, tokens, dtype.itemsize, 0)}))
"""

WIDE = dict(vocab_size=1024, hidden_size=768, num_attention_heads=16, intermediate_size=1536, mtp_layers=0)
SHAPES = {
    "mimo": dict(WIDE, num_key_value_heads=4),
    "mimo_v2_flash": dict(WIDE, head_dim=96, v_head_dim=64, num_key_value_heads=2, swa_num_key_value_heads=4,
                          sliding_window_size=128, moe_intermediate_size=256),
}


@pytest.mark.parametrize("family, dtype, tokens", [("mimo", "bfloat16", 8192), ("mimo_v2_flash", "float32", 4096)])
def test_peak_rss_of_a_long_prefill_is_the_plans_activation_estimate(tmp_path, family, dtype, tokens):
    """Tiny-but-wide models (hidden 768, 16 heads), prompts of 8 and 16 chunks: the peak RSS growth
    stays within the estimate (+10% at most), which does not depend on the context, and the estimate
    is not wasteful (growth at least half of it: malloc's reuse of freed blocks makes the measured
    peak 0.5-0.77x of the estimate from run to run on the same machine). (V2-Flash in float32:
    bfloat16 expert GEMMs of ever new row counts grow oneDNN's primitive cache, which is no activation.)"""
    directory = make_checkpoint(tmp_path / family, family, shards=1, overrides=SHAPES[family])
    out = subprocess.run([sys.executable, "-c", MEASURE, str(directory), dtype, str(tokens)], capture_output=True,
                         text=True, check=True, timeout=300)
    figures = json.loads(out.stdout)
    assert 0.5 * figures["estimate"] <= figures["growth"] <= 1.10 * figures["estimate"], figures
    config = load_model(directory, torch.float32).config
    assert workspace_bytes(config, tokens, 2, 0) == workspace_bytes(config, config.max_position_embeddings, 2, 0)


def test_ctrl_c_stops_a_long_prefill_within_one_chunk(checkpoints):
    """An interrupt that lands while a chunk runs stops the prefill within that chunk, and the cache
    holds whole chunks only (the interrupted one is not committed)."""
    model = load_model(checkpoints("mimo_v2_flash"), torch.float32)
    ids = torch.randint(0, 1000, (PREFILL_CHUNK * 12,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = model.new_cache(len(ids))
    steps = prefill_chunks(model, cache, ids)
    next(steps)  # the first chunk also pays torch's lazy set-up: time the second
    began = time.perf_counter()
    next(steps)
    chunk = time.perf_counter() - began
    fired = []

    def interrupt():
        fired.append(time.perf_counter())
        _thread.interrupt_main()

    timer = threading.Timer(chunk * 1.5, interrupt)  # halfway through the fourth chunk
    # A shell's background job starts with SIGINT ignored, and Python keeps that: Ctrl-C as a terminal has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in steps:
                pass
        stopped = time.perf_counter()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert stopped - fired[0] < 2 * chunk + 0.5, (stopped - fired[0], chunk)
    assert 2 * PREFILL_CHUNK <= cache.length < len(ids) and cache.length % PREFILL_CHUNK == 0


def test_progress_is_told_after_each_chunk_and_the_bar_leaves_no_trace(checkpoints):
    import io

    from rich.console import Console

    from mimo_local.generate import stream
    from mimo_local.prefill_bar import PrefillBar
    from mimo_local.sampling import SamplingSettings
    from mimo_local.tokenizer import ChatTokenizer

    directory = checkpoints("mimo")
    model = load_model(directory, torch.float32)
    ids = torch.randint(0, 1000, (PREFILL_CHUNK * 4 + 5,), generator=torch.Generator().manual_seed(0)).tolist()
    told = []
    screen = io.StringIO()
    bar = PrefillBar(Console(file=screen, force_terminal=True, width=100), min_tokens=1024)

    def on_prefill(done, total):
        told.append((done, total))
        bar(done, total)

    settings = SamplingSettings(temperature=0, max_tokens=2)
    list(stream(model, ChatTokenizer(directory), ids, settings, on_prefill=on_prefill))
    total = len(ids)
    assert told == [(min(n * PREFILL_CHUNK, total), total) for n in range(1, 6)]
    assert "reading the prompt" in screen.getvalue() and bar.progress is None  # drawn, then gone
    quiet = io.StringIO()
    PrefillBar(Console(file=quiet, force_terminal=True), min_tokens=1024)(100, 500)  # a short prompt: no bar
    assert quiet.getvalue() == ""
