"""Model names, the default model, and `mimo list/show/rm/config` through the real CLI."""

from pathlib import Path

import pytest

from mimo_local.errors import MimoError
from mimo_local.store.names import DEMO_DIR, home, parse_name
from mimo_local.store.resolve import resolve_model
from mimo_local.store.pull import format_bytes
from mimo_local.store.local import disk_size
from test_hub import REPO, hub, isolated, mimo, one_error_line  # noqa: F401  (fixtures)


def test_aliases_repo_ids_demo_and_directories(isolated, tmp_path):
    models = Path(isolated / "home" / "models")
    assert parse_name("mimo-7b-rl-0530").repo_id == "XiaomiMiMo/MiMo-7B-RL-0530"
    assert parse_name("MiMo-V2-Flash-Base").repo_id == "XiaomiMiMo/MiMo-V2-Flash-Base"
    ref = parse_name("XiaomiMiMo/MiMo-7B-SFT")
    assert (ref.kind, ref.name, ref.revision, ref.path) == ("hub", "mimo-7b-sft", None, models / "XiaomiMiMo--MiMo-7B-SFT")
    ref = parse_name("acme/model@refs/pr/3")
    assert (ref.name, ref.revision, ref.path.name) == ("acme/model@refs/pr/3", "refs/pr/3", "acme--model@refs--pr--3")
    assert parse_name("acme/model@main").path.name == "acme--model"
    assert parse_name("mimo-nano").path == DEMO_DIR / "mimo-nano" and parse_name("mimo-nano-moe").kind == "demo"
    assert parse_name(str(tmp_path)).kind == "local"
    with pytest.raises(MimoError, match="model directory not found: /no/such/dir"):
        parse_name("/no/such/dir")
    with pytest.raises(MimoError, match="unknown model 'not a model'"):
        parse_name("not a model")


def test_store_location_follows_xdg_and_mimo_home(isolated, monkeypatch, tmp_path):
    assert home() == isolated / "home"
    monkeypatch.delenv("MIMO_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert parse_name("mimo-7b-base").path == tmp_path / "xdg" / "mimo-local" / "models" / "XiaomiMiMo--MiMo-7B-Base"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert home() == tmp_path / "user" / ".local" / "share" / "mimo-local"


def test_missing_hub_model_without_terminal_names_the_pull_command(hub):
    with pytest.raises(MimoError, match=r"^mimo-7b-rl is not downloaded: run `mimo pull mimo-7b-rl` first \(or pass --yes\)$"):
        resolve_model("mimo-7b-rl")
    assert not hub.requests
    assert resolve_model("mimo-7b-rl", assume_yes=True) == parse_name("mimo-7b-rl").path
    assert resolve_model("mimo-7b-rl") == parse_name("mimo-7b-rl").path  # now in the store


def test_a_full_screen_app_never_asks_before_pulling(hub, monkeypatch):
    import mimo_local.store.resolve as hub_module

    monkeypatch.setattr(hub_module, "_interactive", lambda: True)
    monkeypatch.setattr(hub_module, "_confirm", lambda question: pytest.fail("asked: " + question))
    with pytest.raises(MimoError, match="is not downloaded: run `mimo pull mimo-7b-rl` first"):
        resolve_model("mimo-7b-rl", ask=False)  # chat's /model, inside the Textual app
    assert not hub.requests


def test_default_model_setting(isolated, checkpoints):
    assert mimo("config", "default-model").stdout == "mimo-nano\n"
    local = checkpoints("mimo")
    assert mimo("config", "default-model", local).stdout == f"{local}\n"
    assert resolve_model(None) == local
    assert mimo("config", "default-model", "mimo-7b-rl").stdout == "mimo-7b-rl\n"
    assert mimo("config", "default-model", "--reset").stdout == "mimo-nano\n"
    assert "unknown model" in one_error_line(mimo("config", "default-model", "no way"))


def test_list_show_rm(hub, checkpoints, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert mimo("pull", "mimo-7b-rl").exit_code == 0
    assert mimo("pull", "acme/tiny-moe").exit_code == 0
    listing = mimo("list")
    assert listing.exit_code == 0, listing.output
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 3}
    assert {"mimo-7b-rl", "acme/tiny-moe"} <= set(rows)
    size = format_bytes(disk_size(parse_name("mimo-7b-rl").path))
    assert [c.strip() for c in rows["mimo-7b-rl"].split("│")[2:7]] == ["MiMo-7B", size, "bf16", "1", str(parse_name(REPO).path)]
    assert [c.strip() for c in rows["acme/tiny-moe"].split("│")[2:6]][::2] == ["MiMo-V2-Flash", "fp8"]
    assert rows["acme/tiny-moe"].split("│")[5].strip() == "3"

    shown = mimo("show", "acme/tiny-moe")
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    for fact in ("MiMo-V2-Flash (mimo_v2_flash)", "6 (", "sliding window 8", "8 routed, 2 per token", "MTP layers │ 3",
                 "context │ 262144 tokens", "KV cache (bf16) │", "KiB/token +", "quantization │ fp8", "repository │ acme/tiny-moe"):
        assert fact in text, fact
    dense = " ".join(mimo("show", checkpoints("mimo")).stdout.split())
    assert "none (dense)" in dense and "MTP layers │ 1" in dense and "4 query / 2 KV, head dim 16" in dense

    assert "pass --yes" in one_error_line(mimo("rm", "mimo-7b-rl"))
    assert "packaged demo model" in one_error_line(mimo("rm", "mimo-nano"))
    assert "not in the store" in one_error_line(mimo("rm", checkpoints("mimo")))
    assert "not in the store" in one_error_line(mimo("rm", "mimo-v2-flash"))
    removed = mimo("rm", "mimo-7b-rl", "--yes")
    assert removed.exit_code == 0 and "removed mimo-7b-rl" in removed.stderr
    assert not parse_name("mimo-7b-rl").path.exists()
    assert "mimo-7b-rl" not in mimo("list").stdout
    assert "mimo-7b-rl is not downloaded: run `mimo pull mimo-7b-rl`" in one_error_line(mimo("show", "mimo-7b-rl"))


def test_incomplete_pull_is_listed_and_removable(hub, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    hub.cut["model-00002-of-00002.safetensors"] = 1000
    assert mimo("pull", "mimo-7b-rl", "--retries", "0").exit_code == 1
    listing = mimo("list").stdout
    assert "mimo-7b-rl (incomplete)" in listing
    assert mimo("rm", "mimo-7b-rl", "-y").exit_code == 0
    assert "mimo-7b-rl" not in mimo("list").stdout


@pytest.mark.parametrize(
    "config,label",
    [
        ({"torch_dtype": "bfloat16"}, "bf16"),
        ({"dtype": "float32"}, "fp32"),
        ({"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "fp8"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}, "gptq 4-bit g128"),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
         "bitsandbytes nf4"),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "bitsandbytes int8"),
    ],
)
def test_quantization_label(tmp_path, config, label):
    import json

    from mimo_local.store.local import quantization

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert quantization(tmp_path) == label
