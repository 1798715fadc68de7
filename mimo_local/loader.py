"""Build a model for a checkpoint directory and stream its weights in, tensor by tensor."""

from __future__ import annotations

import dataclasses
import functools
import contextlib
import os
import sys
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from . import limits, mapped_weights
from .checkpoint import Checkpoint
from .config import MiMoConfig, load_config, read_raw_config
from .errors import MimoError
from .kernels import guard
from .mapped_weights import MappedFiles, RuntimeLayout, StaleLayout
from .models import build_meta_model, family_module, meta_device
from .models.layers import RotaryEmbedding
from .models.model import MiMoForCausalLM
from .offload.placement import Placement, torch_device

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MimoError("--device cuda: no CUDA device is available (use --device cpu)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MimoError(f"unknown device '{name}' (auto, cpu, cuda)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise MimoError(f"unknown dtype '{name}' (auto, float32, bfloat16, float16)") from None


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
    quant: str | None = None,
    placement: Placement | None = None,
    mmap: bool = True,
    mlock: bool = False,
) -> MiMoForCausalLM:
    """`quant`: a recipe (name or YAML file) that quantizes the float weights while loading.
    `placement` (from an offload plan): each module is allocated on the device the plan gives it
    (experts split into per-device groups), `device` becomes the plan's main device, and a
    placement without MTP skips the MTP layers.
    `mmap`: where everything runs on the CPU, the weights are mapped from the checkpoint and from a
    runtime-layout file written at the first load (mapped_weights.py) instead of copied; `mlock`
    keeps the weights in RAM (never paged out)."""
    from .quant import loading, manifest
    from .quant.recipes import load_recipe

    release_large_allocations()
    with limits.reading(model_dir):  # any failure interpreting the files is a one-line error
        raw_config = read_raw_config(model_dir) if os.path.lexists(Path(model_dir, "config.json")) else {}
        manifest.verify(Path(model_dir), raw_config)  # an interrupted `mimo quantize` output says so first
        config = load_config(model_dir)
        checkpoint = Checkpoint(model_dir, config.fp8_block_size, config)
        family = family_module(config)
        num_mtp = count_mtp_layers(config, checkpoint) if placement is None or placement.mtp else 0
        config = dataclasses.replace(config, num_mtp_layers=num_mtp)
        device = torch.device(device) if placement is None else torch_device(placement.main)
        recipe = load_recipe(quant) if isinstance(quant, str) else quant

        model = build_meta_model(config, num_mtp, dtype)
        if placement is not None:
            with meta_device():
                placement.split_experts(model)
        targets = family.weight_map(model).targets
        quantized = loading.prepare(model, targets, checkpoint, recipe)  # drops float weights it replaces
        check_coverage(model, quantized.plain_targets, checkpoint)  # before any memory is allocated

        on_cpu_only = device.type == "cpu" and (placement is None or placement.devices() == {"cpu"})
        if mmap and on_cpu_only:
            layout = RuntimeLayout(Path(model_dir), checkpoint, dtype, recipe.sha256 if recipe else None, num_mtp)
            try:
                return _load_mapped(model, quantized, checkpoint, layout, show_progress, mlock)
            except StaleLayout:
                layout.path.unlink(missing_ok=True)
                return load_model(model_dir, dtype, device, show_progress, quant, placement, mmap, mlock)

    if placement is None:
        model.to_empty(device=device)
        _tie_embeddings(model)  # to_empty gives each module its own copy of a shared parameter
    else:
        placement.materialize(model)
    _prepare_buffers(model, device)
    with limits.reading(model_dir):
        _stream_weights(model, quantized.plain_targets, checkpoint, show_progress)
        quantized.load(device)
    if placement is not None:
        placement.attach_hooks(model)
    if mlock:
        _lock_process_memory()
    return model.eval()


def _load_mapped(model: MiMoForCausalLM, quantized, checkpoint: Checkpoint, layout: RuntimeLayout, show_progress: bool,
                 mlock: bool) -> MiMoForCausalLM:
    """Map what the checkpoint holds in runtime form; map the rest from the runtime-layout file,
    converting and writing it first where it does not exist yet."""
    cpu = torch.device("cpu")
    files = MappedFiles()
    direct = mapped_weights.direct_entries(model, quantized.plain_targets, checkpoint)
    for name, entry in direct.items():
        mapped_weights.assign(model, name, files.tensor(entry.file, entry.offset, entry.dtype, entry.shape))
    _tie_embeddings(model)
    in_place = {name for name, tensor in model.state_dict(keep_vars=True).items() if not tensor.is_meta}
    if not layout.exists():
        converted = {hub: target for hub, target in quantized.plain_targets.items() if target.param not in direct}
        mapped_weights.materialize_meta(model, cpu)
        _prepare_buffers(model, cpu)
        _stream_weights(model, converted, checkpoint, show_progress)
        quantized.load(cpu)
        state = mapped_weights.runtime_state(model, in_place)
        with _progress("caching runtime layout", sum(t.nbytes for t in state.values()), show_progress) as advance:
            written = layout.write(state, mapped_weights.quantized_shells(model), advance)
        if not written:
            return model.eval()  # converted in memory, as with --no-mmap
    mapped_weights.map_layout(model, layout, files, in_place)
    mapped_weights.materialize_meta(model, cpu)  # buffers no file holds (RoPE tables)
    _prepare_buffers(model, cpu)
    _tie_embeddings(model)
    if files.resident_fraction() < COLD_FRACTION:
        with _progress("reading weights", files.used_bytes(), show_progress) as advance:
            files.read_ahead(advance)
    guard.exit_on_sigbus(f"mimo: a memory-mapped weights file of {checkpoint.dir} was truncated or "
                         "rewritten while in use; restart (or load with --no-mmap)")
    if mlock:
        for failure in files.lock():
            print(f"mimo: --mlock could not lock {failure}", file=sys.stderr)
    model.mapped_files = files  # the mappings live as long as the model
    return model.eval()


def _prepare_buffers(model: MiMoForCausalLM, device: torch.device) -> None:
    """Huge-page advice for freshly allocated CPU weights, and the RoPE tables (no file holds them)."""
    model.requires_grad_(False)
    for param in model.parameters():
        if param.device.type == "cpu":
            advise_huge_pages(param)
    for rope in (m for m in model.modules() if isinstance(m, RotaryEmbedding)):
        rope.inv_freq = rope.compute_inv_freq(device)


def _tie_embeddings(model: MiMoForCausalLM) -> None:
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _lock_process_memory() -> None:
    libc = mapped_weights.libc()
    if libc is None or libc.mlockall(1) != 0:  # MCL_CURRENT: the weights just loaded
        print("mimo: --mlock could not lock the weights in RAM (raise `ulimit -l`)", file=sys.stderr)


HUGE_PAGE = 2 << 20
COLD_FRACTION = 0.9  # mapped weights less resident than this are read ahead, with a progress bar



MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.lru_cache(maxsize=1)
def release_large_allocations() -> None:
    """Allocate tensors of 1 MiB and more with mmap, so their memory goes back to the system when
    freed. glibc otherwise raises its mmap threshold after each large free and serves later large
    tensors from the heap, which keeps a load's conversion transients resident (measured: 10-25% of
    a quantized model's weights beyond the plan)."""
    libc = mapped_weights.libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back a large, not yet touched CPU tensor with 2 MiB pages: decode streams every
    weight once per token, and fewer TLB misses let the prefetchers run ahead (a few % measured)."""
    libc = mapped_weights.libc()
    if libc is None or tensor.nbytes < 4 * HUGE_PAGE:
        return
    begin = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
    libc.madvise(begin, end - begin, 14)  # MADV_HUGEPAGE; a refusal only costs speed


def count_mtp_layers(config: MiMoConfig, checkpoint: Checkpoint) -> int:
    """MTP layers present in the checkpoint (at most limits.MAX_MTP_LAYERS)."""
    try:
        count = family_module(config).count_mtp_layers(config, checkpoint.names())
    except (ValueError, IndexError):
        raise MimoError(f"{checkpoint.dir}: an MTP tensor name has no layer number") from None
    if count > limits.MAX_MTP_LAYERS:
        raise MimoError(f"{checkpoint.dir}: {count} MTP layers is over the limit of {limits.MAX_MTP_LAYERS}")
    return count


def check_coverage(model: MiMoForCausalLM, targets: dict, checkpoint: Checkpoint) -> None:
    """On the meta model: every parameter is filled exactly by checkpoint tensors of the right shape,
    so a config that disagrees with the tensors present is refused before its memory is allocated."""
    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}
    for hub_name, target in targets.items():
        entry = checkpoint.entries.get(hub_name)
        if entry is None:
            raise MimoError(f"{checkpoint.dir}: missing tensor '{hub_name}'")
        destination = params[target.param][target.index] if target.index else params[target.param]
        if entry.shape != tuple(destination.shape):
            raise MimoError(
                f"{entry.file.name}: tensor '{hub_name}' has shape {list(entry.shape)}, the config gives {list(destination.shape)}"
            )
        filled[target.param] += destination.numel()
    for name, param in params.items():
        if filled[name] != param.numel():
            raise MimoError(f"{checkpoint.dir}: checkpoint does not provide all of '{name}'")


@contextlib.contextmanager
def _progress(label: str, total: int, show: bool):
    """A transient byte progress bar; yields the function that advances it."""
    progress = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True,
                        disable=not show)
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.advance(task, done)


def _stream_weights(model: MiMoForCausalLM, targets: dict, checkpoint: Checkpoint, show_progress: bool) -> None:
    """Read every target tensor into its (allocated) parameter; each targeted parameter must be filled."""
    params = dict(model.named_parameters())
    filled = {target.param: 0 for target in targets.values()}
    total = sum(checkpoint.entries[name].nbytes for name in targets)
    with _progress("loading", total, show_progress) as advance, torch.no_grad():
        for hub_name, target in targets.items():
            destination = params[target.param][target.index] if target.index else params[target.param]
            checkpoint.read_into(hub_name, destination)
            filled[target.param] += destination.numel()
            advance(checkpoint.entries[hub_name].nbytes)
    for name, count in filled.items():
        if count != params[name].numel():
            raise MimoError(f"{checkpoint.dir}: checkpoint does not provide all of '{name}'")
