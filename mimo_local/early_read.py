"""Ask the disk for a model's weights before torch is imported.

A cold `mimo run` read its mapped weights only after importing torch and building the model (3-4 s
on a 2-core machine, during which the disk sat idle). The byte ranges a load mapped are recorded
next to the model's runtime layout, per load options; the next start with the same options hands
them to the kernel at once (posix_fadvise WILLNEED, from a background thread), so the disk reads
while Python imports. It is only a hint: the load maps and reads what it needs whatever happened
here, and a record whose files changed since (size, mtime) is ignored. No torch in this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from .jsonfile import write_json_atomic

FOLDER = ".mimo-runtime"
ADVICE_BYTES = 64 << 20  # ranges are handed over in pieces: a warm start's pages are skipped quickly
MEMORY_SHARE = 0.8  # more than this share of the available memory is not read ahead: it would evict itself


def runtime_folder(model_dir: Path) -> Path:
    """`.mimo-runtime` in the model directory, or under the user's cache where that is not writable
    (a shared, read-only model folder)."""
    model_dir = Path(model_dir)
    if os.access(model_dir, os.W_OK):
        return model_dir / FOLDER
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    return Path(base) / "mimo-local" / "runtime" / digest


def record_path(model_dir: Path, options: str) -> Path:
    return runtime_folder(model_dir) / f"read-spans-{hashlib.sha256(options.encode()).hexdigest()[:12]}.json"


def _identity(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def record(model_dir: Path, options: str, spans: dict[Path, list[tuple[int, int]]]) -> None:
    """Keep the byte ranges a load with `options` mapped (rewritten only when they changed)."""
    try:
        entries = {str(path): {"identity": _identity(path), "spans": [list(span) for span in ranges]}
                   for path, ranges in spans.items() if ranges}
        target = record_path(model_dir, options)
        if target.exists() and json.loads(target.read_text()) == entries:
            return
        write_json_atomic(target, entries)
    except (OSError, ValueError):
        pass  # a hint for the next start: never worth failing this one


def recorded(model_dir: Path, options: str) -> dict[Path, list[tuple[int, int]]]:
    """The recorded ranges of the files that have not changed since; empty where there is no record."""
    try:
        entries = json.loads(record_path(model_dir, options).read_text())
        return {Path(name): [(int(begin), int(end)) for begin, end in entry["spans"]]
                for name, entry in entries.items() if _identity(Path(name)) == entry["identity"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def start(model_dir: Path, options: str) -> threading.Thread | None:
    """Begin reading what the last load of this model with `options` mapped, in the background; None
    where there is nothing to read ahead (no record, or more than the memory can keep)."""
    spans = recorded(model_dir, options)
    total = sum(end - begin for ranges in spans.values() for begin, end in ranges)
    memory = available_memory()
    if not total or not hasattr(os, "posix_fadvise") or (memory is not None and total > MEMORY_SHARE * memory):
        return None
    return read_in_background(spans)


def read_in_background(spans: dict[Path, list[tuple[int, int]]]) -> threading.Thread:
    thread = threading.Thread(target=_advise, args=(spans,), name="mimo-early-read", daemon=True)
    thread.start()
    return thread


def _advise(spans: dict[Path, list[tuple[int, int]]]) -> None:
    for path, ranges in spans.items():
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            for begin, end in ranges:
                for at in range(begin, end, ADVICE_BYTES):
                    os.posix_fadvise(descriptor, at, min(ADVICE_BYTES, end - at), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(descriptor)
