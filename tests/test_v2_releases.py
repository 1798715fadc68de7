"""MiMo-V2.5 / V2.6 checkpoints in their hub layout (`mimo dev make-tiny --preset mimo_v2.5 | mimo_v2.6`):
they load exactly like the same weights in the V2-Flash layout, their encoders are never read or
counted, and the CLI runs them."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mimo_local.checkpoint import Checkpoint
from mimo_local.cli import app
from mimo_local.dev.tiny import make_checkpoint
from mimo_local.loader import load_model
from mimo_local.models.weights import ENCODER_PREFIXES
from mimo_local.store.local import model_facts


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """release(preset) -> (hub-layout checkpoint, its V2-Flash-layout twin), made once."""
    made = {}

    def get(preset: str):
        if preset not in made:
            root = tmp_path_factory.mktemp(preset)
            made[preset] = (make_checkpoint(root / "hub", preset), make_checkpoint(root / "twin", preset, twin=True))
        return made[preset]

    return get


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize("preset", ["mimo_v2.5", "mimo_v2.6"])
def test_make_tiny_writes_the_release_layout(tmp_path, preset):
    result = invoke("dev", "make-tiny", tmp_path / "made", "--preset", preset)
    assert result.exit_code == 0, result.output
    out = tmp_path / "made"
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["attention_projection_layout"]) == ("mimo_v2", "fused_qkv")
    assert "num_nextn_predict_layers" not in config and {"vision_config", "audio_config"} <= set(config)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model_pp0_ep0_shard1.safetensors", "model_pp0_ep1_shard1.safetensors",
                                                 "model_mtp.safetensors"}
    assert ("tp_size" in index["metadata"]) == (preset == "mimo_v2.6")
    assert (out / ("audio_tokenizer" if preset == "mimo_v2.5" else "dflash") / "model.safetensors").exists()
    entries = Checkpoint(out).entries
    split = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight")
    assert not [name for name in entries if name.startswith("model.") and name.endswith(split)]
    # 8 heads x 32 + 2 KV heads x (32 + 16) = 352 rows in 2 shards of 176: 2 x 2 block rows, not 3
    assert entries["model.layers.0.self_attn.qkv_proj.weight"].shape == (352, 64)
    assert entries["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == (4, 1)
    assert entries["model.mtp.layers.2.self_attn.qkv_proj.weight"].shape == (448, 64)  # sliding: 4 KV heads
    assert any(name.startswith(ENCODER_PREFIXES) for name in entries)


def test_release_layout_loads_the_same_weights_as_the_v2_flash_layout(release, decode_logits):
    """(V2.6, whose experts stay MXFP4: tests/test_mxfp4.py.)"""
    hub, twin = release("mimo_v2.5")
    ours, reference = load_model(hub), load_model(twin)
    assert len(ours.mtp_layers) == 3  # counted from the checkpoint: the config does not say
    reference_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(param, reference_params[name]), name
    assert torch.equal(decode_logits(ours, 3), decode_logits(reference, 3))


def test_run_gives_the_same_greedy_ids_as_the_v2_flash_layout(release):
    hub, twin = release("mimo_v2.5")
    runs = [invoke("run", "-m", path, "--temperature", "0", "-n", "12", "--json", "Hello") for path in (hub, twin)]
    assert all(run.exit_code == 0 for run in runs), [run.output for run in runs]
    ours, reference = (json.loads(run.stdout) for run in runs)
    assert ours["token_ids"] == reference["token_ids"] and ours["completion_tokens"] == 12


def test_encoder_tensors_are_never_read(release, monkeypatch):
    hub, _ = release("mimo_v2.5")
    read = []
    original = Checkpoint._read_bytes
    monkeypatch.setattr(Checkpoint, "_read_bytes",
                        staticmethod(lambda entry, out: (read.append(entry), original(entry, out))))
    load_model(hub, mmap=False)
    assert read and not [entry.name for entry in read if entry.name.startswith(ENCODER_PREFIXES)]
    assert {entry.file.parent for entry in read} == {hub}  # nothing of audio_tokenizer/
    mapped = load_model(hub).mapped_files.paths()  # mapped: only the text model's shards and its runtime layout
    assert {path.parent for path in mapped} <= {hub, hub / ".mimo-runtime"}


def test_plan_and_show_count_the_text_model_only(release):
    hub, twin = release("mimo_v2.5")
    assert model_facts(hub).parameters == model_facts(twin).parameters

    def plan(path):
        result = invoke("plan", path, "--gpu-mem", "0", "--cpu-mem", "8GiB", "--ctx", "256", "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    ours, reference = plan(hub), plan(twin)
    for key in ("total_params", "mtp_params", "weight_bytes", "kv_bytes_per_token"):
        assert ours[key] == reference[key], key


def test_quantize_writes_the_fused_qkv_in_our_row_order(release, tmp_path):
    """`mimo quantize` reads the TP-sharded q|k|v regrouped, writes it in one shard (tp_size 1) and
    quantizes it like the split q/k/v of the twin (int8 per output row, rows the same)."""
    hub, twin = release("mimo_v2.5")
    for source, out in ((hub, tmp_path / "hub-q"), (twin, tmp_path / "twin-q")):
        result = invoke("quantize", source, "--recipe", "v2flash-mixed", "--out", out, "--no-eval")
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hub-q" / "model.safetensors.index.json").read_text())["metadata"]["tp_size"] == 1
    ours, reference = load_model(tmp_path / "hub-q").state_dict(), load_model(tmp_path / "twin-q").state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
