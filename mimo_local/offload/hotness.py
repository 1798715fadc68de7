"""Router statistics: how often each expert of each MoE layer was selected, kept beside the model
in expert_stats.json. `mimo profile-experts` writes them; runs add their own counts at exit."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MimoError
from ..store.names import DEMO_DIR, home
from ..models.layers import MoE

STATS_FILE = "expert_stats.json"
FORMAT = 1


@dataclass
class ExpertStats:
    num_experts: int
    experts_per_token: int
    counts: dict[int, list[int]] = field(default_factory=dict)  # MoE layer index -> selections per expert

    def tokens(self, layer: int) -> int:
        return sum(self.counts.get(layer, ())) // self.experts_per_token

    def share(self, layer: int, expert: int) -> float:
        """Fraction of the layer's selections that went to `expert` (0 without statistics)."""
        row = self.counts.get(layer)
        total = sum(row) if row else 0
        return row[expert] / total if total else 0.0

    def add(self, other: "ExpertStats") -> "ExpertStats":
        if (other.num_experts, other.experts_per_token) != (self.num_experts, self.experts_per_token):
            return self  # statistics of another model shape: keep ours
        merged = {layer: list(row) for layer, row in self.counts.items()}
        for layer, row in other.counts.items():
            merged[layer] = [a + b for a, b in zip(merged.get(layer, [0] * len(row)), row)]
        return ExpertStats(self.num_experts, self.experts_per_token, merged)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "layers": {str(layer): {"tokens": self.tokens(layer), "counts": row} for layer, row in sorted(self.counts.items())},
        }


def stats_path(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir).resolve()
    if model_dir.parent == DEMO_DIR:  # shipped inside the package: its statistics live in the store
        return home() / "expert_stats" / f"{model_dir.name}.json"
    return model_dir / STATS_FILE


def load_stats(model_dir: str | Path | None) -> ExpertStats | None:
    """The statistics beside a model, or None (none yet, unreadable, or another format)."""
    if model_dir is None:
        return None
    path = stats_path(model_dir)
    try:
        data = json.loads(path.read_text())
        counts = {int(layer): [int(c) for c in entry["counts"]] for layer, entry in data["layers"].items()}
        return ExpertStats(int(data["num_experts"]), int(data["experts_per_token"]), counts)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_stats(model_dir: str | Path, stats: ExpertStats) -> Path:
    """Write atomically (temp file + rename)."""
    path = stats_path(model_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".expert_stats.", suffix=".tmp",
                                         delete=False) as handle:
            json.dump(stats.to_json(), handle)
            temporary = handle.name
        os.replace(temporary, path)
    except OSError as error:
        raise MimoError(f"{path}: cannot write expert statistics ({error.strerror or error})") from None
    return path


def _moe_layers(model) -> dict[int, MoE]:
    return {i: layer.mlp for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)}


def start_recording(model) -> None:
    """Count router selections in every MoE layer from now on (one bincount per layer and step)."""
    for moe in _moe_layers(model).values():
        if moe.selection_counts is None:
            moe.selection_counts = torch.zeros(moe.spec.num_experts, dtype=torch.long, device=moe.gate.weight.device)


def recorded(model, reset: bool = True) -> ExpertStats | None:
    """The counts recorded since start_recording (None for a dense model); `reset` zeroes them."""
    layers = _moe_layers(model)
    if not layers:
        return None
    spec = next(iter(layers.values())).spec
    counts = {}
    for index, moe in layers.items():
        if moe.selection_counts is not None:
            counts[index] = moe.selection_counts.tolist()
            if reset:
                moe.selection_counts.zero_()
    return ExpertStats(spec.num_experts, spec.experts_per_token, counts)


def save_recorded(model, model_dir: str | Path) -> Path | None:
    """Add what this process recorded to the statistics beside the model. A model directory we may
    not write to (a read-only store) keeps its old statistics: returns None then."""
    new = recorded(model)
    if new is None or not any(any(row) for row in new.counts.values()):
        return None
    old = load_stats(model_dir)
    try:
        return save_stats(model_dir, old.add(new) if old else new)
    except MimoError:
        return None


PROFILE_CHUNK = 512  # tokens per forward, as generate's prefill


def profile(model, ids: list[int], window: int, on_progress=None) -> ExpertStats:
    """Run the model over `ids` in windows of `window` tokens (each a fresh context) and return the
    router selections it made: per MoE layer, tokens x experts_per_token in all."""
    if not _moe_layers(model):
        raise MimoError("this model has no routed experts to profile (a dense MiMo-7B)")
    if not ids:
        raise MimoError("the text is empty")
    start_recording(model)
    recorded(model)  # zero whatever was counted before
    device = model.device
    for begin in range(0, len(ids), window):
        chunk = ids[begin : begin + window]
        cache = model.new_cache(len(chunk))
        for start in range(0, len(chunk), PROFILE_CHUNK):
            model(torch.tensor(chunk[start : start + PROFILE_CHUNK], device=device)[None], cache)
        if on_progress is not None:
            on_progress(len(chunk))
    return recorded(model)


def summary_rows(stats: ExpertStats, hottest: int = 4) -> list[tuple[str, ...]]:
    """Per layer: tokens, the hottest experts with their share, experts never chosen, and the share
    of selections the hottest tenth of the experts takes (how much a small GPU budget can cover)."""
    rows = []
    tenth = max(1, stats.num_experts // 10)
    for layer, counts in sorted(stats.counts.items()):
        total = sum(counts) or 1
        ranked = sorted(range(len(counts)), key=lambda e: -counts[e])
        top = ", ".join(f"{e} ({counts[e] / total:.1%})" for e in ranked[:hottest])
        rows.append((str(layer), f"{stats.tokens(layer):,}", top, str(sum(c == 0 for c in counts)),
                     f"{sum(counts[e] for e in ranked[:tenth]) / total:.0%}"))
    return rows
