"""How far a quantized model is from its unquantized reference, on the eval text shipped with the
package: mean and p99 KL(reference || quantized) per token, top-1 agreement, perplexity of both.

The reference runs first and its log-probabilities are kept (tokens x vocab float32), then it is freed
and the quantized model runs: never two models in memory at once.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from .. import limits
from ..errors import MimoError
from . import manifest
from .calibration import shipped_text, text_ids


@dataclass
class QualityReport:
    model: str
    reference: str
    tokens: int
    mean_kld: float
    p99_kld: float
    top1_agreement: float
    perplexity_reference: float
    perplexity_model: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def log_probs(model, ids: list[int], window: int) -> torch.Tensor:
    """log p(next token) rows [N - windows, vocab] in float32, over consecutive windows of `window` ids."""
    rows = []
    for begin in range(0, len(ids) - 1, window):
        chunk = ids[begin : begin + window + 1]  # overlapping by one: each window predicts its own last
        if len(chunk) < 2:
            break
        out = model(torch.tensor([chunk[:-1]], device=model.device), model.new_cache(len(chunk)), all_logits=True)
        rows.append(torch.log_softmax(out.logits[0].float(), dim=-1).cpu())
    return torch.cat(rows)


def compare(reference: torch.Tensor, quantized: torch.Tensor, targets: torch.Tensor) -> dict:
    kld = (reference.exp() * (reference - quantized)).sum(-1).clamp(min=0)
    return {
        "tokens": int(targets.numel()),
        "mean_kld": float(kld.mean()),
        "p99_kld": float(torch.quantile(kld, 0.99)),
        "top1_agreement": float((reference.argmax(-1) == quantized.argmax(-1)).float().mean()),
        "perplexity_reference": math.exp(float(-reference.gather(1, targets[:, None]).mean())),
        "perplexity_model": math.exp(float(-quantized.gather(1, targets[:, None]).mean())),
    }


def read_model_config(model_dir: Path) -> dict:
    """config.json of `model_dir`; one-line errors for a directory that is no model, a half-finished
    `mimo quantize` output, or a config that is not valid JSON (naming the file)."""
    config_path = Path(model_dir) / "config.json"
    if not os.path.lexists(config_path):
        manifest.check_complete(model_dir, {})  # a quantize run interrupted before it wrote config.json
        raise MimoError(f"{model_dir}: not a model directory (no config.json)")
    config = limits.read_json_object(config_path, limits.MAX_CONFIG_BYTES)
    manifest.check_complete(model_dir, config)
    return config


def default_reference(model_dir: Path, config: dict) -> Path | None:
    """The source recorded in a `mimo quantize` output, when it is still there."""
    recorded = config.get(manifest.MARKER)
    source = recorded.get("source") if isinstance(recorded, dict) else None
    return Path(source) if isinstance(source, str) and Path(source).is_dir() else None


def evaluate(
    model_dir: str | Path,
    reference_dir: str | Path | None = None,
    quant: str | None = None,
    tokens: int = 1024,
    window: int = 512,
    text: str | None = None,
) -> QualityReport:
    """Compare `model_dir` (quantized on disk, or quantized now by recipe `quant`) with its reference
    (`reference_dir`; default: the recorded source of a quantize output, or `model_dir` itself with `quant`)."""
    from ..loader import load_model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MimoError(f"model directory not found: {model_dir}")
    config = read_model_config(model_dir)
    if reference_dir is None:
        reference_dir = model_dir if quant else default_reference(model_dir, config)
        if reference_dir is None:
            raise MimoError(f"{model_dir}: no reference recorded or found: pass --ref (or --quant)")
    reference_dir = Path(reference_dir)
    if tokens < 2 or window < 1:
        raise MimoError("--tokens must be >= 2 and --window >= 1")
    ids = text_ids(model_dir, text if text is not None else shipped_text("eval_text.txt"), tokens, "eval")
    reference_model = load_model(reference_dir)
    reference = log_probs(reference_model, ids, window)
    del reference_model
    gc.collect()
    quantized_model = load_model(model_dir, quant=quant)
    quantized = log_probs(quantized_model, ids, window)
    if quantized.shape != reference.shape:
        raise MimoError(f"{model_dir} and {reference_dir} have different vocabularies")
    targets = torch.tensor(ids[1:])[: reference.shape[0]]
    label = f"{model_dir.name} ({quant})" if quant else model_dir.name
    return QualityReport(label, reference_dir.name, **compare(reference, quantized, targets))


def table(reports: list[QualityReport]) -> Table:
    result = Table(title="quantization quality (eval text shipped with mimo-local)")
    for column in ("model", "reference", "tokens", "mean KLD", "p99 KLD", "top-1 agree", "PPL ref", "PPL model"):
        result.add_column(column, justify="left" if column in ("model", "reference") else "right")
    for r in reports:
        result.add_row(r.model, r.reference, str(r.tokens), f"{r.mean_kld:.5f}", f"{r.p99_kld:.5f}",
                       f"{100 * r.top1_agreement:.1f}%", f"{r.perplexity_reference:.3f}", f"{r.perplexity_model:.3f}")
    return result
