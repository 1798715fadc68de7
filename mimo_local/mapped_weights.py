"""Weights used in place instead of copied into process memory.

A checkpoint tensor that already is a runtime parameter (same dtype and shape, not fused) is
memory-mapped from the checkpoint's own file. Everything else (fused q|k|v and gate|up, other
dtypes, FP8 dequantized, quantized at load or stored in another quantized layout) is converted
once and written to a runtime-layout file next to the model, mapped on every later start. A warm
start then reads nothing, and processes running the same model share one copy in the page cache.

The runtime-layout file is named by its variant (dtype, load-time recipe, MTP layers, this module's
layout version) and the source files (name, size, mtime, inode): a changed source gets a new file,
and the variant's stale file is removed. Mappings are read-only (a write to a weight would fault, not corrupt the file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DTYPE_NAMES, DTYPES, Checkpoint, read_header
from .early_read import runtime_folder
from .errors import MimoError

LAYOUT_VERSION = 1
ALIGNMENT = 64  # every tensor starts on a cache line
PAGE = 4096
RESIDENCY_STRIDE = 1 << 20
FREE_SPACE_MARGIN = 1 << 30


class StaleLayout(Exception):
    """The runtime-layout file does not describe this model (written by another version): rebuild it."""


class MappedFiles:
    """Read-only, shared mappings of whole files, handing out tensors that view them. Only the byte
    ranges the tensors view count (a checkpoint's q/k/v and gate/up are mapped but never read:
    their fused copies are in the runtime layout)."""

    def __init__(self):
        self.maps: dict[Path, mmap.mmap] = {}
        self.ranges: dict[Path, list[tuple[int, int]]] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self.maps:
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                mapped.madvise(mmap.MADV_HUGEPAGE)  # fewer TLB misses where the kernel can
            except (AttributeError, OSError):
                pass
            self.maps[path], self.ranges[path] = mapped, []
        return self.maps[path]

    def tensor(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for dim in shape:
            count *= dim
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        nbytes = count * dtype.itemsize
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the given buffer is not writable": weights are never written
            flat = torch.frombuffer(self._map(path), dtype=torch.uint8, count=nbytes, offset=offset)
        self.ranges[path].append((offset, offset + nbytes))
        return flat.view(dtype).view(shape)

    def spans(self, path: Path) -> list[tuple[int, int]]:
        """The used byte ranges of one file, page-aligned and merged, in file order."""
        merged: list[tuple[int, int]] = []
        for begin, end in sorted(self.ranges[path]):
            begin, end = begin // PAGE * PAGE, min(-(-end // PAGE) * PAGE, len(self.maps[path]))
            if merged and begin <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((begin, end))
        return merged

    def used_spans(self) -> dict[Path, list[tuple[int, int]]]:
        return {path: self.spans(path) for path in self.maps}

    def _each_span(self):
        for path, mapped in self.maps.items():
            base = _address(mapped)
            for begin, end in self.spans(path):
                yield path, base + begin, begin, end

    def lock(self) -> list[str]:
        """mlock the used ranges (kept in RAM, never paged out); the files that could not be locked."""
        if libc() is None:
            return ["the weights (no C library)"]
        failed = []
        for path, address, begin, end in self._each_span():
            if libc().mlock(ctypes.c_void_p(address), ctypes.c_size_t(end - begin)) != 0:
                failed.append(f"{path.name} ({os.strerror(ctypes.get_errno())})")
        return sorted(set(failed))

    def resident_fraction(self) -> float:
        """The fraction of the used pages that are in the page cache (mincore), estimated from one
        page per RESIDENCY_STRIDE: asking for every page of a 15 GB model took 0.3 s of each start."""
        if libc() is None:
            return 1.0  # cannot tell: assume warm
        resident = total = 0
        vector = (ctypes.c_ubyte * 1)()
        for _, address, begin, end in self._each_span():
            for offset in range(0, end - begin, RESIDENCY_STRIDE):
                if libc().mincore(ctypes.c_void_p(address + offset), ctypes.c_size_t(PAGE), vector) != 0:
                    return 1.0  # cannot tell: assume warm
                resident += vector[0] & 1
                total += 1
        return resident / total if total else 1.0

    def read_ahead(self, advance=None) -> None:
        """Read the used ranges sequentially, at the disk's rate, so that the first forward step finds
        every page in memory (a cold start shows its progress instead of stalling in page faults)."""
        buffer = memoryview(bytearray(16 << 20))
        for path in self.maps:
            with open(path, "rb", buffering=0) as handle:
                for begin, end in self.spans(path):
                    handle.seek(begin)
                    while begin < end:
                        count = handle.readinto(buffer[: min(len(buffer), end - begin)])
                        if not count:
                            break
                        begin += count
                        if advance is not None:
                            advance(count)

    def used_bytes(self) -> int:
        return sum(end - begin for path in self.maps for begin, end in self.spans(path))

    def paths(self) -> list[Path]:
        return list(self.maps)


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library (mincore, mlock, madvise, mallopt), or None where it cannot be loaded."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        library.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return library
    except (OSError, AttributeError):
        return None


def _address(mapped: mmap.mmap) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()


def direct_entries(model: nn.Module, targets: dict, checkpoint: Checkpoint) -> dict[str, object]:
    """Parameter name -> the checkpoint entry that already is that whole parameter (same dtype and
    shape, element-aligned in its file, rows in our order): these are mapped, not copied."""
    params = dict(model.named_parameters())
    found = {}
    for hub_name, target in targets.items():
        param = params.get(target.param)
        entry = checkpoint.entries[hub_name]
        if (param is not None and not target.index and hub_name not in checkpoint.row_layouts and entry.dtype == param.dtype
                and entry.shape == tuple(param.shape) and entry.offset % entry.dtype.itemsize == 0):
            found[target.param] = entry
    return found


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter or buffer `name` of `model` (replacing, not copying into, it)."""
    owner_path, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if attribute in owner._parameters:
        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attribute] = tensor


def materialize_meta(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) every parameter and buffer still on the meta device; the others
    (already mapped) stay as they are. Parameters shared by two modules stay shared."""
    allocated: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in allocated:
                    empty = torch.empty_like(tensor, device=device)
                    allocated[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
                store[name] = allocated[id(tensor)]


@dataclass(frozen=True)
class QuantizedShell:
    """How to rebuild a QuantLinear module (empty) before its cached tensors are mapped into it."""

    kind: str
    in_features: int
    out_features: int
    experts: int | None
    group_size: int
    blocksize: int
    permuted: bool
    bias_dtype: str | None

    @classmethod
    def of(cls, module) -> "QuantizedShell":
        bias = None if module.bias is None else DTYPE_NAMES[module.bias.dtype]
        return cls(module.kind, module.in_features, module.out_features, module.experts, module.group_size,
                   module.blocksize, getattr(module, "perm", None) is not None, bias)

    def build(self):
        from .quant.linear import QuantLinear

        return QuantLinear(self.kind, self.in_features, self.out_features, experts=self.experts,
                           group_size=self.group_size, blocksize=self.blocksize, permuted=self.permuted,
                           bias_dtype=DTYPES[self.bias_dtype] if self.bias_dtype else None, device="meta")


class RuntimeLayout:
    """The runtime-layout file of one model load (source files, dtype, recipe)."""

    def __init__(self, model_dir: Path, checkpoint: Checkpoint, dtype: torch.dtype, recipe_sha: str | None,
                 mtp_layers: int):
        model_dir = Path(model_dir)
        sources = sorted({entry.file for entry in checkpoint.entries.values()} | {model_dir / "config.json"})
        variant = {"version": LAYOUT_VERSION, "dtype": str(dtype), "recipe": recipe_sha, "mtp_layers": mtp_layers}
        files = [_file_identity(path) for path in sources if path.exists()]
        self.variant = _digest(variant)
        self.key = f"{self.variant}-{_digest(files)}"
        self.folder = runtime_folder(model_dir)
        self.path = self.folder / f"{self.key}.safetensors"

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> tuple[dict, dict]:
        """(entries by name, metadata) of the file, every header field validated."""
        try:
            entries = {entry.name: entry for entry in read_header(self.path)}
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                metadata = json.loads(handle.read(length)).get("__metadata__", {})
        except MimoError:  # cut short or overwritten: written again
            raise StaleLayout() from None
        if metadata.get("key") != self.key:
            raise StaleLayout()
        return entries, metadata

    def write(self, tensors: dict[str, torch.Tensor], shells: dict[str, QuantizedShell], progress=None) -> bool:
        """Write `tensors` (name -> tensor; the same tensor under two names is written once) atomically;
        False (with a one-line note) where the disk has no room for it."""
        unique: dict[int, str] = {}
        aliases = {}
        for name, tensor in tensors.items():
            if id(tensor) in unique:
                aliases[name] = unique[id(tensor)]
            else:
                unique[id(tensor)] = name
        order = [name for name in tensors if name not in aliases]
        header, offset = {}, 0
        for name in order:
            tensor = tensors[name]
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
            nbytes = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free < offset + FREE_SPACE_MARGIN:
            print(f"mimo: not caching the runtime layout ({_gib(offset)} GiB; {_gib(free)} GiB free in {self.folder}): "
                  "the next start converts again", file=sys.stderr)
            return False
        metadata = {"format": "mimo-runtime", "key": self.key, "aliases": json.dumps(aliases),
                    "quantized": json.dumps({path: shell.__dict__ for path, shell in shells.items()})}
        encoded = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
        encoded += b" " * (-(8 + len(encoded)) % PAGE)  # tensor data starts on a page
        temporary = self.folder / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as handle:
                handle.write(struct.pack("<Q", len(encoded)) + encoded)
                start = handle.tell()
                for name in order:
                    tensor = tensors[name]
                    handle.seek(start + header[name]["data_offsets"][0])
                    if tensor.numel():
                        handle.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
                    if progress is not None:
                        progress(tensor.numel() * tensor.element_size())
                handle.truncate(start + offset)
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a full disk or Ctrl-C leaves no half-written file
            raise
        for stale in self.folder.glob(f"{self.variant}-*.safetensors"):  # this variant of an older source
            if stale != self.path:
                stale.unlink(missing_ok=True)
        return True


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def _file_identity(path: Path) -> list:
    status = path.stat()
    return [path.name, status.st_size, status.st_mtime_ns, status.st_ino]


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f}"


def runtime_state(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's persistent tensors (name -> tensor; shared ones under each name) except `skip`."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
            if name not in skip and tensor is not None}


def quantized_shells(model: nn.Module) -> dict[str, QuantizedShell]:
    from .quant.linear import QuantLinear

    return {path: QuantizedShell.of(module) for path, module in model.named_modules() if isinstance(module, QuantLinear)}


def map_layout(model: nn.Module, layout: RuntimeLayout, files: MappedFiles, skip: set[str]) -> None:
    """Map every tensor of `model` except `skip` from the runtime-layout file, after rebuilding the
    quantized modules it describes. StaleLayout where the file does not match the model."""
    from .quant.loading import set_module

    entries, metadata = layout.read()
    try:
        shells = {path: QuantizedShell(**fields) for path, fields in json.loads(metadata.get("quantized", "{}")).items()}
        aliases = json.loads(metadata.get("aliases", "{}"))
    except (TypeError, ValueError):
        raise StaleLayout() from None
    for path, shell in shells.items():
        set_module(model, path, shell.build())
    expected = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items() if name not in skip}
    if set(expected) != set(entries) | set(aliases):
        raise StaleLayout()
    mapped = {}
    for name, tensor in expected.items():
        entry = entries.get(aliases.get(name, name))
        if entry is None or entry.dtype != tensor.dtype or entry.shape != tuple(tensor.shape):
            raise StaleLayout()
        if entry.name not in mapped:
            mapped[entry.name] = files.tensor(layout.path, entry.offset, entry.dtype, entry.shape)
        assign(model, name, mapped[entry.name])
