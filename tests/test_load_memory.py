"""Streaming (copying) load: peak RSS grows by at most 1.3x the weights it loads."""

import json
import subprocess
import sys

import pytest

from mimo_local.dev.tiny import make_checkpoint

MEASURE = """
import json, sys, torch
from mimo_local.loader import load_model

def status(key):  # VmHWM, not ru_maxrss: the latter inherits the parent's peak across fork
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024

dtype = getattr(torch, sys.argv[2])
load_model(sys.argv[3], dtype, mmap=False)  # warm-up: one-time costs of torch's lazy initialisation
before = status("VmRSS")
model = load_model(sys.argv[1], dtype, mmap=False)  # the copying load (mapped weights are tested apart)
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "weights": weights}))
"""


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory):
    shape = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=1408)
    return make_checkpoint(tmp_path_factory.mktemp("medium") / "ckpt", "mimo", shards=3, overrides=shape)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_rss_during_load(medium_checkpoint, checkpoints, dtype):
    command = [sys.executable, "-c", MEASURE, str(medium_checkpoint), dtype, str(checkpoints("mimo"))]
    out = subprocess.run(command,
                         capture_output=True, text=True, check=True, timeout=300)
    figures = json.loads(out.stdout)
    assert figures["weights"] > 80_000_000
    growth = figures["peak"] - figures["before"]
    assert growth <= 1.3 * figures["weights"], figures
