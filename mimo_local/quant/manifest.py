"""Integrity of a quantized output: the manifest (sha256 of every shard, index and config), written
LAST, so an output without it is known to be incomplete. Config key MARKER says an output is ours."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import limits
from ..errors import MimoError
from ..jsonfile import write_json_atomic  # noqa: F401 - the converter writes through it

MANIFEST = "quant-manifest.json"
PROGRESS = ".quant-progress.json"
MARKER = "mimo_quantization"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_ours(model_dir: Path, config: dict) -> bool:
    return MARKER in config or (model_dir / PROGRESS).exists()


def check_complete(model_dir: Path, config: dict) -> None:
    """The cheap half of `verify`: an output of ours without its manifest (written last) is unfinished."""
    if is_ours(model_dir, config) and not os.path.lexists(Path(model_dir) / MANIFEST):
        raise MimoError(f"{model_dir}: incomplete quantized output (no {MANIFEST}); rerun `mimo quantize` to finish it")


def verify(model_dir: Path, config: dict) -> None:
    """For an output of `mimo quantize`: one-line errors unless the manifest is there and every file
    it lists has its recorded sha256. Other checkpoints pass untouched."""
    model_dir = Path(model_dir)
    if not is_ours(model_dir, config):
        return
    check_complete(model_dir, config)
    path = model_dir / MANIFEST
    files = limits.read_json_object(path, limits.MAX_INDEX_BYTES).get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str) for e in files.values()
    ):
        raise MimoError(f"{path}: corrupt manifest")
    for name, expected in files.items():
        file = limits.confined_file(model_dir, name, f"{MANIFEST} entry")
        if not os.path.lexists(file):
            raise MimoError(f"{model_dir}: '{name}' listed in {MANIFEST} is missing")
        if limits.check_regular_file(file).st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
            raise MimoError(f"{model_dir}: '{name}' is corrupt (sha256 does not match {MANIFEST})")
