"""The local model store: what is installed, what each model is, and removing pulled models."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import limits
from ..config import MiMoConfig, load_config
from ..errors import MimoError
from .names import DEMO_MODELS, MANIFEST, SOURCE, STATE_DIR, ModelRef, is_complete, models_dir, parse_name
from .pull import format_bytes

DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8"}


@dataclass(frozen=True)
class StoredModel:
    name: str
    kind: str  # "demo" | "hub"
    path: Path
    complete: bool


def stored_models() -> list[StoredModel]:
    """The packaged demo models, then every pulled (or partly pulled) model in the store."""
    found = []
    for name in DEMO_MODELS:
        ref = parse_name(name)
        if (ref.path / "config.json").is_file():
            found.append(StoredModel(name, "demo", ref.path, True))
    root = models_dir()
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if directory.name.startswith("."):
            continue  # being removed
        source = _read_json(directory / MANIFEST) or _read_json(directory / SOURCE)
        if isinstance(source.get("name"), str) and source["name"]:
            found.append(StoredModel(source["name"], "hub", directory, is_complete(directory)))
    return found


def _read_json(path: Path) -> dict:
    """A small JSON object from the store, or {} when it is missing or unreadable (a FIFO, too large,
    not an object): listing never blocks or fails on one bad file."""
    try:
        return limits.read_json_object(path, limits.MAX_CONFIG_BYTES) if os.path.lexists(path) else {}
    except MimoError:
        return {}


def disk_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def quantization(path: Path) -> str:
    """How the weights are stored: the config's quantization_config, else its dtype ("?" when the
    config does not say in a form we understand)."""
    raw = _read_json(path / "config.json")
    quant = raw.get("quantization_config") or {}
    if not isinstance(quant, dict):
        return "?"
    if quant:
        label = _label(quant.get("quant_method") or quant.get("method")) or "quantized"
        bits, group_size = quant.get("bits"), quant.get("group_size", -1)
        if type(bits) is int and bits > 0:
            label += f" {bits}-bit" + (f" g{group_size}" if type(group_size) is int and group_size > 0 else "")
        elif label == "bitsandbytes":
            label += f" {_label(quant.get('bnb_4bit_quant_type')) or 'nf4'}" if quant.get("load_in_4bit") is True else " int8"
        return label
    dtype = _label(raw.get("torch_dtype") or raw.get("dtype")) or "?"
    return DTYPE_LABELS.get(dtype, dtype)


def _label(value) -> str | None:
    """A short config string fit for a table cell."""
    return value[:40] if isinstance(value, str) and value.isprintable() else None


@dataclass(frozen=True)
class ModelFacts:
    config: MiMoConfig  # num_mtp_layers counted from the checkpoint's tensors
    parameters: int


def model_facts(path: Path) -> ModelFacts:
    """The config plus what only the checkpoint knows (MTP layers present, parameter count)."""
    import dataclasses

    from ..checkpoint import Checkpoint
    from ..loader import count_mtp_layers
    from ..models.weights import is_encoder_tensor

    with limits.reading(path):
        config = load_config(path)
        checkpoint = Checkpoint(path, config.fp8_block_size)
        mtp = count_mtp_layers(config, checkpoint)
        entries = checkpoint.entries
        parameters = sum(  # the text model's: FP8/MXFP4 scales and V2.5's encoders are not parameters we run
            _numel(entry.shape) * (2 if name + "_scale" in entries else 1)  # MXFP4: two weights a byte
            for name, entry in entries.items()
            if not name.endswith(("_scale_inv", "_scale")) and not is_encoder_tensor(name)
        )
    return ModelFacts(dataclasses.replace(config, num_mtp_layers=mtp), parameters)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def format_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


# --- tables ---------------------------------------------------------------------------------


def list_table():
    from rich.table import Table

    table = Table(title=f"models (store: {models_dir()})", title_justify="left")
    for column in ("name", "family", "size", "quantization", "MTP", "path"):
        table.add_column(column, justify="right" if column in ("size", "MTP") else "left", overflow="fold")
    for model in stored_models():
        table.add_row(*list_row(model))
    return table


def list_row(model: StoredModel) -> tuple[str, ...]:
    """One row of `mimo list`. A model whose files cannot be read shows as broken, with the reason
    where its family would be; the other rows are unaffected."""
    family, mtp, status = "?", "?", "" if model.complete else " (incomplete)"
    if model.complete:
        try:
            facts = model_facts(model.path)
            family, mtp = facts.config.display_family, str(facts.config.num_mtp_layers)
        except MimoError as error:
            if _has_model_files(model.path):
                status, family = " (broken)", f"broken: {error}"
            # else: a pull restricted by --include may lack config or weights; the row still shows it
    name = model.name + status + (" (demo)" if model.kind == "demo" else "")
    try:
        size = format_bytes(disk_size(model.path))
    except OSError:
        size = "?"
    return name, family, size, quantization(model.path), mtp, str(model.path)


def _has_model_files(path: Path) -> bool:
    """Whether a directory holds a config and weights (so failing to read them means it is broken)."""
    from ..checkpoint import INDEX_FILE, SINGLE_FILE

    return os.path.lexists(path / "config.json") and any(
        os.path.lexists(path / name) for name in (INDEX_FILE, SINGLE_FILE)
    )


def show_table(name: str):
    from rich.table import Table

    ref, path = _installed(name)
    facts = model_facts(path)
    config = facts.config
    with limits.reading(path):
        plan = _plan_summary(path, config)
    table = Table(title=f"{ref.name}", title_justify="left", show_header=False)
    table.add_column("property")
    table.add_column("value", overflow="fold")
    rows = [
        ("family", f"{config.display_family} ({config.family})"),
        ("parameters", format_count(facts.parameters)),
        ("layers", _layers(config)),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", _heads(config)),
        ("experts", _experts(config)),
        ("vocabulary", str(config.vocab_size)),
        ("context", f"{config.max_position_embeddings} tokens"),
        ("MTP layers", str(config.num_mtp_layers)),
        ("quantization", quantization(path)),
        ("KV cache (bf16)", _kv(config)),
        ("memory plan", plan),
        ("size on disk", format_bytes(disk_size(path))),
        ("path", str(path)),
    ]
    if ref.repo_id:
        rows.insert(0, ("repository", ref.repo_id + (f"@{ref.revision}" if ref.revision else "")))
    for row in rows:
        table.add_row(*row)
    return table


def _plan_summary(path: Path, config: MiMoConfig) -> str:
    """`mimo plan`'s verdict for this machine at the model's context (up to 32k tokens), bf16."""
    from ..offload.options import with_budgets
    from ..offload.plan import PlanRequest, make_plan

    ctx = min(32768, config.max_position_embeddings)
    plan = make_plan(path, with_budgets(PlanRequest(gpu_mem=None, cpu_mem=None, ctx=ctx)))
    return f"ctx {ctx}, bf16: {plan.verdict()} (details: mimo plan)"


def _layers(config: MiMoConfig) -> str:
    sliding = sum(config.layer_is_sliding)
    if not sliding:
        return str(config.num_layers)
    return f"{config.num_layers} ({config.num_layers - sliding} global, {sliding} sliding window {config.sliding_attention.sliding_window})"


def _heads(config: MiMoConfig) -> str:
    spec = config.global_attention
    text = f"{spec.num_heads} query / {spec.num_kv_heads} KV, head dim {spec.head_dim}"
    if spec.v_head_dim != spec.head_dim:
        text += f" (V {spec.v_head_dim})"
    if config.sliding_attention is not None:
        swa = config.sliding_attention
        text += f"; sliding {swa.num_heads} query / {swa.num_kv_heads} KV"
    return text


def _experts(config: MiMoConfig) -> str:
    if config.moe is None:
        return "none (dense)"
    moe = config.moe
    return f"{moe.num_experts} routed, {moe.experts_per_token} per token, {sum(config.layer_is_moe)} MoE layers"


def _kv(config: MiMoConfig) -> str:
    text = f"{config.kv_bytes_per_token(2) / 1024:.1f} KiB/token"
    if config.kv_fixed_bytes(2):
        text += f" + {format_bytes(config.kv_fixed_bytes(2))} sliding windows"
    return text


def _installed(name: str) -> tuple[ModelRef, Path]:
    ref = parse_name(name)
    if ref.kind == "hub" and not is_complete(ref.path):
        raise MimoError(f"{ref.name} is not downloaded: run `{ref.pull_command}`")
    if ref.kind == "demo" and not (ref.path / "config.json").is_file():
        raise MimoError(f"demo model {ref.name} is missing from this installation (expected {ref.path})")
    return ref, ref.path


# --- removing -------------------------------------------------------------------------------


def removable(name: str) -> ModelRef:
    """The pulled model `name` refers to (complete or not), or a one-line reason it cannot be removed."""
    ref = parse_name(name)
    if ref.kind == "demo":
        raise MimoError(f"{ref.name} is a packaged demo model: it cannot be removed")
    if ref.kind == "local":
        if ref.path.parent != models_dir().resolve() or not (ref.path / STATE_DIR).is_dir():
            raise MimoError(f"{name} is not in the store ({models_dir()}): mimo rm only removes pulled models")
        return ref
    if not ref.path.is_dir():
        raise MimoError(f"{ref.name} is not in the store ({models_dir()})")
    return ref


def remove(ref: ModelRef) -> None:
    """Move the directory aside in one rename, then delete it: no half-removed model is ever listed.

    A running `mimo pull` of the model holds its lock: then nothing is removed."""
    from .pull import PullLock

    busy = f"{ref.name} is being pulled right now: let `mimo pull` finish (or stop it), then remove it"
    with PullLock(ref.path, busy):
        trash = ref.path.with_name(f".removing-{ref.path.name}-{os.getpid()}")
        os.replace(ref.path, trash)
        shutil.rmtree(trash)
