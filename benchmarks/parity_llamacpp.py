"""Parity with llama.cpp's own converter: tiny MiMo-V2.5 / V2.6 checkpoints in their hub layout,
converted by llama.cpp's convert_hf_to_gguf.py (f32 GGUF; V2.6's MXFP4 experts are repacked as
they are into ggml's MXFP4 type), run greedily by llama.cpp and by us on the same prompt ids.
Not a speed measurement. Prints one JSON line per checkpoint.

    .venv/bin/python benchmarks/parity_llamacpp.py [--llamacpp-python /work/llvenv/bin/python]

The llama.cpp side runs in --llamacpp-python (llama_cpp bindings, the converter's dependencies;
LLAMA_CPP_LIB_PATH names the built library). Tiny random models have near ties, so besides the
greedy ids each step's logits are compared (max |difference|) and the top-2 margin is reported:
a differing id is a disagreement only where the margin is larger than the logits' difference.

The checkpoints are the `mimo_v2.5` / `mimo_v2.6` presets with the attention of the real releases
scaled down: 4 KV heads on the global layers, so q|k|v are stored in 4 TP shards as in
MiMo-V2.5 (tp 4), and head sizes whose shard rows make that TP count unambiguous to the
converter. The converter does not read the TP count (num_key_value_heads, or V2.6's index
`tp_size`): it guesses 8 or 4 from the number of FP8 scale rows of each fused q|k|v. The presets as
they are (`--default-preset`) store q|k|v in 2 shards (their 2 global KV heads); the converter takes
those for 4 without a word and writes wrong attention weights, so llama.cpp disagrees from the
first token. At the real sizes (V2.5: tp 4, V2.5-Pro: tp 8) the guess is right.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers.llamacpp_peer import CONVERT_SHIM, find_llamacpp_dir  # noqa: E402

from mimo_local.dev.tiny import make_checkpoint  # noqa: E402
from mimo_local.loader import load_model  # noqa: E402

# x = q|k|v rows per shard at tp 4: 3*80+32 = 272 (global), 4*80+2*32 = 384 (sliding); both leave
# x mod 256 in [1, 128], where 4*ceil(x/128) != 8*ceil(x/256) and the scale rows tell tp 4 from tp 8
REAL_TP = dict(num_attention_heads=8, num_key_value_heads=4, swa_num_key_value_heads=8, head_dim=80, v_head_dim=32)
PROMPT = [100 + (7 * i) % 800 for i in range(24)]
STEPS = 16
# max |logit difference| called agreement. f32 GGUF, but both engines multiply MXFP4 by activations
# rounded to int8 per block of 32 with the block's scale in float16 (Q8_0, ggml_vec_dot_mxfp4_q8_0;
# ours: cpu_quant.c's round_to_half); the two still sum in different orders. Measured 2026-12-03 on
# the tiny V2.6: max 0.036 over 16 steps (0.025-0.08 and one step of 1.32 while our scales were
# float32), the same greedy ids. V2.5 (no MXFP4) agrees within 0.0012.
TOLERANCE = 0.1

LLAMA_RUN = r"""
import json, sys
from llama_cpp import Llama
gguf, prompt, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=gguf, n_ctx=len(prompt) + steps + 1, n_batch=len(prompt), n_threads=1,
            logits_all=True, verbose=False)
ids, logits = [], []
llm.eval(prompt)
for _ in range(steps):
    row = [float(v) for v in llm.scores[llm.n_tokens - 1]]
    token = max(range(len(row)), key=row.__getitem__)
    ids.append(token); logits.append(row)
    llm.eval([token])
print(json.dumps({"ids": ids, "logits": logits}))
"""


def convert(checkpoint: Path, out: Path, llamacpp_dir: str, python: str) -> None:
    """llama.cpp's converter on the checkpoint as it is, but for config.json's sliding_window:
    llama.cpp's n_swa counts the query itself, MiMo's window does not (as llamacpp_peer.py does)."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["sliding_window"] = config["sliding_window_size"] + 1
    with tempfile.TemporaryDirectory(prefix="parity_") as staging:
        for entry in checkpoint.iterdir():
            if entry.name != "config.json":
                os.symlink(entry.resolve(), os.path.join(staging, entry.name))
        Path(staging, "config.json").write_text(json.dumps(config, indent=2))
        cmd = [python, "-c", CONVERT_SHIM, llamacpp_dir, "", staging, "--outtype", "f32", "--outfile", str(out),
               "--no-mtp"]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {lines[-1] if lines else result.returncode}")


def llamacpp_greedy(gguf: Path, python: str) -> tuple[list[int], torch.Tensor]:
    result = subprocess.run([python, "-c", LLAMA_RUN, str(gguf), json.dumps(PROMPT), str(STEPS)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    answer = json.loads(result.stdout)
    return answer["ids"], torch.tensor(answer["logits"])


@torch.no_grad()
def our_greedy(checkpoint: Path) -> tuple[list[int], torch.Tensor]:
    model = load_model(checkpoint)
    cache = model.new_cache(len(PROMPT) + STEPS + 1)
    step = model(torch.tensor([PROMPT]), cache).logits[0, -1]
    ids, logits = [], []
    for _ in range(STEPS):
        token = int(step.argmax())
        ids.append(token)
        logits.append(step.float())
        step = model(torch.tensor([[token]]), cache).logits[0, -1]
    return ids, torch.stack(logits)


def compare(preset: str, overrides: dict | None, work: Path, llamacpp_dir: str, python: str) -> dict:
    checkpoint = make_checkpoint(work / preset, preset, overrides=overrides)
    report = {"preset": preset, "overrides": overrides or {}, "prompt_tokens": len(PROMPT), "steps": STEPS}
    gguf = work / f"{preset}.gguf"
    try:
        convert(checkpoint, gguf, llamacpp_dir, python)
    except RuntimeError as error:
        return {**report, "converted": False, "error": str(error)}
    theirs, their_logits = llamacpp_greedy(gguf, python)
    ours, our_logits = our_greedy(checkpoint)
    vocab = min(their_logits.shape[1], our_logits.shape[1])  # llama.cpp pads no rows; ours has vocab_size
    difference = (their_logits[:, :vocab] - our_logits[:, :vocab]).abs().amax(dim=1)
    top2 = our_logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), STEPS)
    return {**report, "converted": True, "gguf_bytes": gguf.stat().st_size,
            "greedy_ids_equal": ours == theirs, "first_difference": None if same == STEPS else same,
            "ours": ours, "llamacpp": theirs,
            "max_logit_difference": float(difference.max()), "min_top2_margin": float(margin.min()),
            "agreement": agreement(ours, theirs, difference, margin)}


def agreement(ours: list[int], theirs: list[int], difference: torch.Tensor, margin: torch.Tensor) -> str:
    """'same ids' (logits within TOLERANCE), 'near-tie flips' (ids differ only at steps whose top-2
    margin is within twice the logits' difference, logits within TOLERANCE), else 'disagree'."""
    if float(difference.max()) > TOLERANCE:
        return "disagree"
    if ours == theirs:
        return "same ids"
    flips = [i for i in range(len(ours)) if ours[i] != theirs[i]]
    first = flips[0]  # after a flip the two continue from different tokens: only the first one counts
    return "near-tie flips" if float(margin[first]) <= 2 * float(difference[first]) else "disagree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp-python", default="/work/llvenv/bin/python")
    parser.add_argument("--llamacpp-dir", default=None, help="llama.cpp sources (convert_hf_to_gguf.py)")
    parser.add_argument("--default-preset", action="store_true",
                        help="also try the presets as they are (q|k|v in 2 TP shards, which the converter cannot place)")
    args = parser.parse_args()
    llamacpp_dir = find_llamacpp_dir(args.llamacpp_dir)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="parity_llamacpp_") as work:
        for preset in ("mimo_v2.5", "mimo_v2.6"):
            runs = [REAL_TP] + ([None] if args.default_preset else [])
            for overrides in runs:
                print(json.dumps(compare(preset, overrides, Path(work) / ("tp4" if overrides else "tp2"),
                                         llamacpp_dir, args.llamacpp_python)), flush=True)


if __name__ == "__main__":
    main()
