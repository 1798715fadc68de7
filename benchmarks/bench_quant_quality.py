"""Quantization quality on the trained demo models: mean / p99 KLD vs the bf16 model, top-1
agreement and perplexity, for int8, int4 round-to-nearest, GPTQ int4 and nf4 side by side.

Every row goes through the real pipeline (`mimo quantize` into a temporary directory, then the
quality report of `mimo eval` on the eval text shipped with the package). Prints markdown rows for
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_quant_quality.py
    .venv/bin/python benchmarks/bench_quant_quality.py --model mimo_local/demo_models/mimo-nano --recipes int8,nf4
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

from mimo_local.errors import MimoError
from mimo_local.quant.convert import quantize_checkpoint
from mimo_local.quant.quality import evaluate

DEMO = Path(__file__).resolve().parents[1] / "mimo_local" / "demo_models"
TARGETS = {"int8": 0.002, "gptq-int4-g128": 0.03, "nf4": 0.04}


def regrouped(recipe: str, group_size: int, folder: Path) -> str:
    """The shipped int4 recipe with another group size (a YAML file), or the recipe name unchanged."""
    if group_size == 128 or "g128" not in recipe:
        return recipe
    from mimo_local.quant.recipes import shipped_recipes

    text = shipped_recipes()[recipe].read_text().replace("group_size: 128", f"group_size: {group_size}")
    path = folder / f"{recipe.replace('g128', f'g{group_size}')}.yaml"
    path.write_text(text.replace(f"name: {recipe}", f"name: {path.stem}"))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model directory (repeatable; default: both demo models)")
    parser.add_argument("--recipes", default="int8,int4-g128,gptq-int4-g128,nf4")
    parser.add_argument("--tokens", type=int, default=1024, help="eval tokens")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128,
                        help="int4 group for int4-g128 / gptq-int4-g128 (the demo models' 192 inputs need 64)")
    parser.add_argument("--text", type=Path, help="eval text (default: the one shipped with the package)")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8") if args.text else None
    scratch_recipes = Path(tempfile.mkdtemp())
    models = [Path(m) for m in args.model] if args.model else [DEMO / "mimo-nano", DEMO / "mimo-nano-moe"]
    command = "python benchmarks/bench_quant_quality.py " + " ".join(sys.argv[1:])
    print(f"date {datetime.date.today()} | {platform.machine()} {platform.processor() or ''} | `{command.strip()}`")
    print("| model | recipe | mean KLD | p99 KLD | top-1 agree | PPL bf16 | PPL quant | target | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in models:
        if not (model / "config.json").exists():
            print(f"| {model.name} | (missing: {model}) | | | | | | | |")
            continue
        for recipe in args.recipes.split(","):
            recipe_arg = regrouped(recipe, args.group_size, scratch_recipes)
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch) / "out"
                try:
                    began = time.perf_counter()
                    quantize_checkpoint(model, recipe_arg, out, calibration_tokens=args.calibration_tokens)
                    seconds = time.perf_counter() - began
                    r = evaluate(out, model, tokens=args.tokens, text=text)
                except MimoError as error:
                    print(f"| {model.name} | {recipe} | error: {error} | | | | | | |")
                    continue
            if recipe_arg != recipe:
                recipe = recipe.replace("g128", f"g{args.group_size}")
            target = TARGETS.get(recipe.replace(f"g{args.group_size}", "g128"))
            verdict = "" if target is None else f"<= {target} {'ok' if r.mean_kld <= target else 'MISSED'}"
            print(f"| {model.name} | {recipe} | {r.mean_kld:.5f} | {r.p99_kld:.5f} | {100 * r.top1_agreement:.1f}% | "
                  f"{r.perplexity_reference:.2f} | {r.perplexity_model:.2f} | {verdict} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
