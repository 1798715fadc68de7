"""Recipes on shapes that are not a multiple of their group: smaller groups per tensor (recorded in
the output config as GPTQ `dynamic` overrides), one group per row, or kept unquantized; and every
shipped recipe on every shipped demo model and small make-tiny preset, then `mimo run` on it."""

import json

import pytest
from typer.testing import CliRunner

from mimo_local.cli import app
from mimo_local.store.resolve import resolve_model
from mimo_local.quant.recipes import KEEP, Scheme, largest_group, shipped_recipes

runner = CliRunner()
INT4 = Scheme("int4", bits=4, group_size=128)
NF4 = Scheme("nf4", bits=4)


@pytest.mark.parametrize("scheme, shape, expected", [
    (INT4, (64, 4096), INT4),                                   # a multiple: unchanged
    (INT4, (64, 192), Scheme("int4", bits=4, group_size=64)),   # mimo-nano's hidden size
    (INT4, (64, 160), Scheme("int4", bits=4, group_size=32)),   # make-tiny's FFN
    (INT4, (64, 48), Scheme("int4", bits=4, group_size=-1)),    # no group >= 32 divides it: one per row
    (INT4, (64, 36), KEEP),                                     # GPTQ cannot pack 36 inputs
    (Scheme("int8", bits=8), (64, 36), KEEP),
    (Scheme("int8", bits=8), (64, 200), Scheme("int8", bits=8)),
    (NF4, (64, 160), Scheme("nf4", bits=4, blocksize=32)),
    (NF4, (64, 48), KEEP),
    (Scheme("bnb-int8", bits=8), (64, 36), Scheme("bnb-int8", bits=8)),
])
def test_schemes_fit_the_shape(scheme, shape, expected):
    assert scheme.fit("w", shape) == expected


def test_largest_group():
    assert [largest_group(n, 128) for n in (4096, 192, 160, 96, 48, 2048 + 64)] == [128, 64, 32, 32, None, 64]


@pytest.fixture(scope="module")
def models(checkpoints):
    return {"mimo-nano": resolve_model("mimo-nano"), "mimo-nano-moe": resolve_model("mimo-nano-moe"),
            "tiny-mimo": checkpoints("mimo"), "tiny-mimo_v2_flash": checkpoints("mimo_v2_flash"),
            "tiny-mimo_v2.5": checkpoints("mimo_v2.5"), "tiny-mimo_v2.6": checkpoints("mimo_v2.6")}


@pytest.mark.parametrize("model", ["mimo-nano", "mimo-nano-moe", "tiny-mimo", "tiny-mimo_v2_flash", "tiny-mimo_v2.5",
                                   "tiny-mimo_v2.6"])
def test_every_shipped_recipe_quantizes_and_runs(models, model, tmp_path):
    for recipe in sorted(shipped_recipes()):
        out = tmp_path / recipe
        result = runner.invoke(app, ["quantize", str(models[model]), "--recipe", recipe, "--out", str(out),
                                     "--no-eval", "--calibration-tokens", "64", "--sequence-length", "32"])
        assert result.exit_code == 0, f"{recipe}: {result.output}"
        run = runner.invoke(app, ["run", "-m", str(out), "--temperature", "0", "-n", "4", "--json", "Once upon"])
        assert run.exit_code == 0, f"{recipe}: {run.output}"
        assert json.loads(run.stdout)["completion_tokens"] >= 1, recipe
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        if model == "mimo-nano" and recipe == "int4-g128":
            # 192 hidden inputs take groups of 64, the 512-input down_proj keeps 128: one of them is
            # the config's group_size, the other a GPTQModel `dynamic` override, as vLLM reads them
            groups = {config["group_size"]} | {o["group_size"] for o in config["dynamic"].values() if o.get("bits") == 4}
            assert groups == {64, 128}


def test_run_quant_at_load_time_on_odd_shapes(models):
    for recipe in ("int4-g128", "nf4"):
        run = runner.invoke(app, ["run", "-m", str(models["tiny-mimo"]), "--quant", recipe, "--temperature", "0",
                                  "-n", "4", "--json", "Once upon"])
        assert run.exit_code == 0, f"{recipe}: {run.output}"
        assert json.loads(run.stdout)["completion_tokens"] >= 1
