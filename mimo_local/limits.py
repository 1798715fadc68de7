"""Caps on what an untrusted checkpoint may ask of us, and safe reads of its small files.

Every cap is checked before the memory or time it guards is spent, and each one is several times
what the largest real MiMo checkpoint needs (MiMo-V2.5-Pro / V2.6-Pro: hidden 6144, 70 layers,
128 heads, 384 experts = 26,496 routed experts in all, 1M positions; MiMo-V2-Flash: 5 GB shards,
headers of tens of thousands of entries, a ~10 KB chat template with tools).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path, PurePosixPath

from .errors import MimoError

MiB = 1 << 20

# Files read whole into memory.
MAX_CONFIG_BYTES = 4 * MiB  # config.json, generation_config.json (MiMo's: ~2 KB)
MAX_TOKENIZER_CONFIG_BYTES = 16 * MiB  # tokenizer_config.json (chat template, added tokens)
MAX_TOKENIZER_BYTES = 128 * MiB  # tokenizer.json (MiMo's: ~7 MB)
MAX_INDEX_BYTES = 64 * MiB  # model.safetensors.index.json (V2-Flash: a few MB)
MAX_SHARDS = 10_000  # distinct files an index may name

# safetensors headers: at most 1 MiB plus 1/64 of the data they describe, and never over 16 MiB.
MAX_HEADER_BYTES = 16 * MiB
HEADER_BASE_BYTES = 1 * MiB
HEADER_BYTES_PER_DATA_BYTE = 1 / 64
MAX_HEADER_ENTRIES = 200_000
MAX_TENSOR_DIMS = 8
MAX_TENSOR_NAME = 1024  # characters

# config.json
MAX_LAYERS = 512
MAX_MTP_LAYERS = 16
MAX_HIDDEN_SIZE = 1 << 17
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_VOCAB_SIZE = 1 << 22
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_EXPERTS = 4096
MAX_EXPERT_MODULES = 1 << 17  # routed experts over all MoE layers, each a module to build (V2.5-Pro: 26,496)
MAX_CONTEXT = 1 << 24
MAX_FP8_BLOCK = 1 << 16

# Chat templates (rendering runs in jinja2's sandbox with these bounds).
MAX_TEMPLATE_CHARS = 1 * MiB  # the template source
MAX_RENDERED_CHARS = 2 * MiB  # the rendered prompt (2x the longest MiMo context), and any one value a template builds
MAX_TEMPLATE_WORK_CHARS = 32 * MiB  # all strings a template builds during one render, together
MAX_RENDER_SECONDS = 5.0
MAX_TEMPLATE_INT_ARGUMENT = 100_000  # an integer passed to a call or filter (widths, counts, ranges)
MAX_TEMPLATE_INT_BITS = 8192  # integers a template computes


def check_regular_file(path: Path, what: str | None = None) -> os.stat_result:
    """A file we are about to open must be a regular file: a FIFO or device would block or never end."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MimoError(f"{what or path}: not found") from None
    except OSError as error:
        raise MimoError(f"{what or path}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise MimoError(f"{what or path}: not a regular file")
    return info


def open_regular(path: Path, what: str | None = None):
    """Open a regular file for reading. Checked before opening, and again on the open handle
    (O_NONBLOCK, so a file swapped for a FIFO in between cannot block the open)."""
    check_regular_file(path, what)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise MimoError(f"{what or path}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise MimoError(f"{what or path}: not a regular file")
    return os.fdopen(descriptor, "rb")


def read_capped(path: Path, limit: int, what: str | None = None) -> bytes:
    info = check_regular_file(path, what)
    if info.st_size > limit:
        raise MimoError(f"{what or path}: {info.st_size} bytes is over the limit of {limit} bytes for this file")
    with open_regular(path, what) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise MimoError(f"{what or path}: over the limit of {limit} bytes for this file")
    return data


def parse_json(data: bytes | str, what: str):
    """json.loads whose every failure (syntax, encoding, nesting depth, huge numbers) is a MimoError."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise MimoError(f"{what}: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise MimoError(f"{what}: not valid JSON ({str(error).splitlines()[0]})") from None


def _no_duplicate_keys(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def read_json_object(path: Path, limit: int, what: str | None = None) -> dict:
    """A small JSON file whose top level must be an object."""
    what = what or str(path)
    value = parse_json(read_capped(path, limit, what), what)
    if not isinstance(value, dict):
        raise MimoError(f"{what}: expected a JSON object, found {json_type(value)}")
    return value


def json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def confined_file(directory: Path, name, what: str) -> Path:
    """`directory / name` for a file name read from a checkpoint: a relative path that stays inside
    `directory` (no absolute path, no `..`, no backslash or control character), checked before
    anything is opened."""
    if not isinstance(name, str) or not name:
        raise MimoError(f"{what}: file name {name!r} is not a non-empty string")
    if any(ord(c) < 32 or c in "\\\x7f" for c in name) or ":" in name[:2]:
        raise MimoError(f"{what}: file name {name!r} has a backslash, drive letter or control character")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or any(part in ("", ".") for part in name.split("/")):
        raise MimoError(f"{what}: file name {name!r} is not a plain relative path inside the model directory")
    return Path(directory, *parts)


def positive_int(value, what: str, limit: int, minimum: int = 1) -> int:
    """An integer in [minimum, limit]: bools, floats and strings are refused, not converted."""
    if type(value) is not int:
        raise MimoError(f"{what} must be an integer, not {json_type(value)} ({_short(value)})")
    if value < minimum:
        raise MimoError(f"{what} must be at least {minimum} (got {value})")
    if value > limit:
        raise MimoError(f"{what} = {value} is over the limit of {limit}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@contextlib.contextmanager
def reading(what):
    """Around code that interprets untrusted files: whatever goes wrong inside becomes one MimoError
    naming `what`, so a bad model is a one-line error wherever it is read."""
    try:
        yield
    except MimoError:
        raise
    except RecursionError:
        raise MimoError(f"{what}: cannot be read (nested too deeply)") from None
    except MemoryError:
        raise MimoError(f"{what}: cannot be read (out of memory)") from None
    except OSError as error:
        raise MimoError(f"{what}: cannot be read ({error.strerror or error})") from None
    except (ValueError, TypeError, LookupError, ArithmeticError, AttributeError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        raise MimoError(f"{what}: cannot be read ({type(error).__name__}{': ' + detail if detail else ''})") from None
