"""The two trained demo models shipped in the package: hub layout, English-looking greedy text,
held-out perplexity, lossless MTP speculation, and parity with the training-time modules."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mimo_local
from mimo_local.cli import app
from mimo_local.dev.tiny import hub_config
from mimo_local.engine import Engine
from mimo_local.sampling import SamplingSettings

DEMO_DIR = Path(mimo_local.__file__).parent / "demo_models"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = ["mimo-nano", "mimo-nano-moe"]
FAMILY = {"mimo-nano": "mimo", "mimo-nano-moe": "mimo_v2_flash"}
# Fixed bounds, a little above what the shipped models measure (see each folder's TRAINING.md).
PERPLEXITY_BOUND = {"mimo-nano": 70, "mimo-nano-moe": 90}  # measured 60.7 and 80.2
CONTEXT = 256


@pytest.fixture(scope="module", params=MODELS)
def engine(request):
    return Engine.load(DEMO_DIR / request.param, device="cpu")


def generate(engine, prompt: str, mtp: bool, raw: bool = True, temperature: float = 0.0, max_tokens: int = 48,
             seed: int = 0):
    settings = SamplingSettings(temperature=temperature, seed=seed, max_tokens=max_tokens)
    events = list(engine.stream(engine.prompt_ids(prompt, raw=raw), settings, **engine.speculation(mtp)))
    return events[-1].stats


def share_of_training_words(text: str, distinct: int) -> float:
    vocabulary = set((DEMO_DIR / "words.txt").read_text().split())
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) >= 15 and len(set(words)) >= distinct, text
    return sum(w in vocabulary for w in words) / len(words)


def test_folder_is_the_hub_layout_within_size():
    for name in MODELS:
        folder = DEMO_DIR / name
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "LICENSE", "TRAINING.md", "training.json"} <= files
        assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 1024 * 1024
        config = json.loads((folder / "config.json").read_text())
        record = json.loads((folder / "training.json").read_text())
        expected = set(hub_config(FAMILY[name], record["shape"], fp8=False)) | {
            "bos_token_id", "eos_token_id", "pad_token_id"}
        assert set(config) == expected
        assert config["model_type"] == FAMILY[name]
        template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
        assert "<|im_start|>" in template
        assert "public domain" in (folder / "LICENSE").read_text()


def test_engine_loads_with_mtp_layers(engine):
    expected = {"mimo": 1, "mimo_v2_flash": 3}[engine.config.family]
    assert len(engine.model.mtp_layers) == expected
    if engine.config.family == "mimo_v2_flash":
        assert any(engine.config.layer_is_sliding) and not all(engine.config.layer_is_sliding)
        assert engine.config.moe is not None and not engine.config.layer_is_moe[0]


def test_greedy_story_is_made_of_training_words(engine):
    """Greedy continuation: these small models loop, but in words of the training text."""
    text = generate(engine, "Once upon a time", mtp=False).text
    assert share_of_training_words(text, distinct=4) >= 0.9, text


def test_sampled_chat_answer_is_made_of_training_words(engine):
    """What `mimo run "Once upon a time"` does by default: chat template, temperature 0.6."""
    # The answer may end after one sentence (<|im_end|>): pool three seeded answers.
    text = " ".join(
        generate(engine, "Once upon a time", mtp=True, raw=False, temperature=0.6, max_tokens=64, seed=seed).text
        for seed in range(3)
    )
    assert share_of_training_words(text, distinct=10) >= 0.85, text


def test_heldout_perplexity_below_bound(engine):
    """Windows of the 256-token context the models were trained with, each from position 0."""
    ids = torch.tensor(engine.tokenizer.encode((DEMO_DIR / "heldout.txt").read_text()))
    assert len(ids) > 1000
    total, count = 0.0, 0
    for window in ids.split(CONTEXT):
        cache = engine.model.new_cache(len(window))
        logits = engine.model(window[None], cache, all_logits=True).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="sum").item()
        count += len(window) - 1
    assert math.exp(total / count) < PERPLEXITY_BOUND[engine.path.name]


def test_mtp_speculation_is_lossless_and_accepts_drafts(engine):
    plain = generate(engine, "Once upon a time", mtp=False)
    speculative = generate(engine, "Once upon a time", mtp=True)
    assert speculative.token_ids == plain.token_ids
    assert speculative.speculation.mean_accepted_length > 1.2


def test_training_modules_match_the_engine():
    """The training-time modules (examples/trainable_mimo.py) and the engine compute the same
    logits, main model and every MTP layer, from the shipped weights (fp32, past the sliding window)."""
    sys.path.insert(0, str(EXAMPLES))
    from safetensors.torch import load_file
    from trainable_mimo import TrainableMiMo

    for name in MODELS:
        folder = DEMO_DIR / name
        engine = Engine.load(folder, device="cpu", dtype="float32")
        config = json.loads((folder / "config.json").read_text())
        trainable = TrainableMiMo(config, len(engine.model.mtp_layers))
        trainable.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        trainable.eval()
        ids = torch.tensor([engine.tokenizer.encode((DEMO_DIR / "heldout.txt").read_text())[:100]])
        with torch.no_grad():
            expected, target_hidden = trainable(ids)
        cache = engine.model.new_cache(ids.shape[1])
        output = engine.model(ids, cache, all_logits=True)
        torch.testing.assert_close(output.logits, expected, atol=2e-3, rtol=1e-3)
        for k in range(len(engine.model.mtp_layers)):
            steps = ids.shape[1] - k - 1
            hidden = engine.model.mtp_hidden(k, output.hidden[:, :steps], ids[:, k + 1 : k + 1 + steps], 0,
                                             cache.mtp_layers[k])
            with torch.no_grad():
                wanted = trainable.mtp_logits(k, target_hidden, ids)
            torch.testing.assert_close(engine.model.mtp_logits(k, hidden), wanted, atol=2e-3, rtol=1e-3)


def test_mimo_run_prints_english_and_mtp_acceptance(tmp_path, monkeypatch):
    """The README's first command: no --model runs the shipped mimo-nano and names it on stderr."""
    monkeypatch.setenv("MIMO_HOME", str(tmp_path))  # no configured default model
    result = CliRunner().invoke(app, ["run", "--seed", "0", "-n", "48", "--json", "Once upon a time"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].startswith("model: mimo-nano (default")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(re.findall(r"[A-Za-z]+", stats["text"])) >= 10, stats["text"]
    assert stats["mtp_draft_tokens"] > 0 and stats["mean_accepted_length"] > 1.0
