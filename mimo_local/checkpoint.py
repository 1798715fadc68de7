"""Reading hub safetensors checkpoints tensor by tensor, with validation and FP8 block dequant.

The header is parsed here instead of mmap-ing whole shards, so that each tensor is read with one
`readinto` straight into memory we own: peak RSS stays at the loaded weights plus one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fused_qkv, limits
from .errors import MimoError
from .limits import check_regular_file, confined_file, json_type, open_regular
from .quant import mxfp4

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def header_limit(file_size: int) -> int:
    """Most header bytes a safetensors file of `file_size` bytes may have (see limits.py)."""
    proportional = limits.HEADER_BASE_BYTES + int(file_size * limits.HEADER_BYTES_PER_DATA_BYTE)
    return min(limits.MAX_HEADER_BYTES, proportional)


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, every field checked before any tensor is read: the header
    size is capped (see header_limit), each entry has a known dtype, a shape of non-negative integers
    whose size is exactly its byte span, and spans lie inside the file without overlapping."""
    with open_regular(path, f"checkpoint shard {path.name}") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MimoError(f"{path.name}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise MimoError(f"{path.name}: truncated (header needs {header_len + 8} bytes, file has {size})")
        if header_len > header_limit(size):
            raise MimoError(f"{path.name}: safetensors header of {header_len} bytes is over the limit of "
                            f"{header_limit(size)} bytes for a {size}-byte file")
        raw = handle.read(header_len)
    try:
        header = limits.parse_json(raw, f"{path.name}: corrupt safetensors header")
    except MimoError:
        raise MimoError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MimoError(f"{path.name}: corrupt safetensors header (a JSON {json_type(header).split()[-1]}, not an object)")
    if len(header) > limits.MAX_HEADER_ENTRIES + 1:
        raise MimoError(f"{path.name}: {len(header)} header entries is over the limit of {limits.MAX_HEADER_ENTRIES}")
    data_start = 8 + header_len
    data_size = size - data_start
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_name(name, path.name)
        begin, end, dtype, shape = _entry_fields(path, name, info)
        expected = dtype.itemsize * _numel(shape)
        if end - begin != expected:
            raise MimoError(
                f"{path.name}: tensor '{name}' has {end - begin} bytes, shape {list(shape)} needs {expected}"
            )
        if end > data_size:
            raise MimoError(
                f"{path.name}: truncated (tensor '{name}' ends at byte {data_start + end}, file has {size})"
            )
        entries.append(TensorEntry(name, path, dtype, shape, data_start + begin, end - begin))
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries if e.nbytes)
    for (_, previous_end, previous), (begin, _, name) in zip(spans, spans[1:]):
        if begin < previous_end:
            raise MimoError(f"{path.name}: tensors '{previous}' and '{name}' overlap in the file")
    return entries


def _check_tensor_name(name: str, where: str) -> None:
    """Tensor names end up in messages and tables: printable text of reasonable length only."""
    if not name.isprintable() or len(name) > limits.MAX_TENSOR_NAME:
        raise MimoError(f"{where}: tensor name {name[:40]!r} is not printable text of at most {limits.MAX_TENSOR_NAME} characters")


def _entry_fields(path: Path, name: str, info) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
    def corrupt(why: str) -> MimoError:
        return MimoError(f"{path.name}: corrupt header entry for tensor '{name[:80]}' ({why})")

    if not isinstance(info, dict):
        raise corrupt("not an object")
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise corrupt(f"unknown dtype {info.get('dtype')!r:.20}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > limits.MAX_TENSOR_DIMS or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise corrupt(f"shape must be a list of at most {limits.MAX_TENSOR_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets):
        raise corrupt("data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise corrupt(f"data_offsets {offsets} are not 0 <= begin <= end")
    return begin, end, dtype, tuple(shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _read_index(directory: Path) -> tuple[dict[str, str], dict]:
    """The index's weight_map (tensor -> shard file), each file confined to the model directory, and
    its metadata (V2.6 says its tp_size there)."""
    path = directory / INDEX_FILE
    index = limits.read_json_object(path, limits.MAX_INDEX_BYTES, f"{path}")
    metadata = index.get("metadata")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise MimoError(f"{path}: corrupt index (no weight_map object)")
    for name, file in weight_map.items():
        _check_tensor_name(name, path.name)
        if not isinstance(file, str):
            raise MimoError(f"{path}: corrupt index (tensor '{name[:80]}' maps to {json_type(file)})")
    files = set(weight_map.values())
    if len(files) > limits.MAX_SHARDS:
        raise MimoError(f"{path}: {len(files)} shard files is over the limit of {limits.MAX_SHARDS}")
    for file in files:
        confined_file(directory, file, f"{path.name}: weight_map entry")
    return weight_map, metadata if isinstance(metadata, dict) else {}


class Checkpoint:
    """All tensors of a checkpoint directory (sharded through the index, or a single file).

    Only the tensors asked for are ever read: the others (MiMo-V2.5's vision and audio encoders)
    cost their header entries. With `config`, tensors whose rows the hub stores in another order
    than our parameters (fused_qkv.py) are regrouped as they are read."""

    def __init__(self, model_dir: str | Path, fp8_block: tuple[int, int] | None = None, config=None):
        self.dir = Path(model_dir)
        self.fp8_block = fp8_block or (128, 128)
        self.metadata: dict = {}
        if os.path.lexists(self.dir / INDEX_FILE):
            weight_map, self.metadata = _read_index(self.dir)
            files = sorted(set(weight_map.values()))
        elif os.path.lexists(self.dir / SINGLE_FILE):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise MimoError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE}")
        for file in files:  # every file is checked before any is opened
            check_regular_file(confined_file(self.dir, file, "weight_map entry"), f"checkpoint shard {file}")
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            for entry in read_header(confined_file(self.dir, file, "weight_map entry")):
                if entry.name in self.entries:
                    raise MimoError(f"tensor '{entry.name}' is in both {self.entries[entry.name].file.name} and {file}")
                self.entries[entry.name] = entry
        if weight_map is not None:
            for name, file in weight_map.items():
                entry = self.entries.get(name)
                if entry is None or entry.file != confined_file(self.dir, file, "weight_map entry"):
                    raise MimoError(f"{file}: tensor '{name}' listed in the index is missing from the shard")
        self.row_layouts: dict[str, fused_qkv.QkvShards] = {} if config is None else fused_qkv.layouts(
            config, self.entries, self.metadata)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype and shape of the file)."""
        entry = self.entries.get(name)
        if entry is None:
            raise MimoError(f"{self.dir}: missing tensor '{name}'")
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        self._read_bytes(entry, tensor)
        return tensor

    @staticmethod
    def _read_bytes(entry: TensorEntry, out: torch.Tensor) -> None:
        if not entry.nbytes:
            return
        buffer = out.view(-1).view(torch.uint8).numpy()
        with open_regular(entry.file) as handle:
            handle.seek(entry.offset)
            if handle.readinto(buffer) != entry.nbytes:
                raise MimoError(f"{entry.file.name}: truncated while reading tensor '{entry.name}'")

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` with the tensor, converting dtype and dequantizing FP8 block weights.

        Same dtype into contiguous CPU memory reads straight from the file: no temporary copy.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise MimoError(f"{self.dir}: missing tensor '{name}'")
        packed_fp4 = entry.dtype == torch.uint8 and name + "_scale" in self.entries  # MXFP4 (quant/mxfp4.py)
        shape = (entry.shape[0], entry.shape[1] * 2) if packed_fp4 and len(entry.shape) == 2 else entry.shape
        if shape != tuple(out.shape):
            raise MimoError(f"{entry.file.name}: tensor '{name}' has shape {list(shape)}, expected {list(out.shape)}")
        layout = self.row_layouts.get(name)
        if layout is None and entry.dtype == out.dtype and out.is_contiguous() and out.device.type == "cpu":
            self._read_bytes(entry, out)
            return
        tensor = self.read(name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in self.entries:
                raise MimoError(f"{self.dir}: FP8 tensor '{name}' has no '{scale_name}'")
            shards = layout.shards if layout is not None else 1
            try:
                tensor = dequantize_fp8_blocks(tensor, self.read(scale_name), self.fp8_block, shards)
            except MimoError as error:
                raise MimoError(f"{self.dir}: tensor '{name}': {error}") from None
        elif packed_fp4:
            scales = self.read(name + "_scale")
            if shape[1] % mxfp4.BLOCK or scales.shape != (shape[0], shape[1] // mxfp4.BLOCK):
                raise MimoError(f"{self.dir}: MXFP4 tensor '{name}' {list(entry.shape)} has scales "
                                f"{list(scales.shape)}, not [{shape[0]}, {shape[1] // mxfp4.BLOCK}]")
            tensor = mxfp4.dequantize(tensor, scales)
        out.copy_(tensor if layout is None else layout.to_fused(tensor))


def fp8_scale_grid(shape: tuple[int, ...], block: tuple[int, int], shards: int = 1) -> tuple[int, int]:
    """Scale rows and columns of an FP8 weight stored as `shards` row shards, each with its own blocks
    (fused_qkv.py); edge tiles may be partial."""
    out_features, in_features = shape
    return shards * -(-(out_features // shards) // block[0]), -(-in_features // block[1])


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), shards: int = 1
) -> torch.Tensor:
    """w = fp8 * scale_inv, one scale per (block_out x block_in) tile; `shards`: the rows are that many
    equal row shards whose block rows each start at the shard's first row."""
    out_features, in_features = weight.shape
    block_out, block_in = block
    if out_features % shards or scale_inv.shape != fp8_scale_grid(weight.shape, block, shards):
        where = f" in {shards} row shards" if shards > 1 else ""
        raise MimoError(f"FP8 scales of shape {list(scale_inv.shape)} do not match {block} blocks of "
                        f"{list(weight.shape)}{where}")
    rows = out_features // shards
    scales = scale_inv.float().view(shards, -1, scale_inv.shape[1]).repeat_interleave(block_out, 1)[:, :rows]
    scales = scales.reshape(out_features, -1).repeat_interleave(block_in, 1)[:, :in_features]
    return weight.float() * scales


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)):
    """The inverse used to make FP8 checkpoints: (fp8 weight, float32 scale_inv per block)."""
    out_features, in_features = weight.shape
    rows, cols = -(-out_features // block[0]), -(-in_features // block[1])
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32)
    padded[:out_features, :in_features] = weight.float()
    tiles = padded.view(rows, block[0], cols, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    quantized = (tiles / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return quantized.view_as(padded)[:out_features, :in_features].contiguous(), scale_inv


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (temp file + rename)."""
    specs = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
    write_safetensors_streamed(path, specs, iter(tensors.values()), metadata)


def write_safetensors_streamed(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], tensors,
                               metadata: dict | None = None) -> None:
    """Write a safetensors file atomically whose tensors (name -> (dtype, shape) in `specs`) come one at
    a time from the iterator `tensors`, in the same order: memory holds one tensor, not the file."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name, (dtype, shape) in specs.items():
                tensor = next(tensors)
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise ValueError(f"tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, not {dtype} {list(shape)}")
                if tensor.numel():
                    handle.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
