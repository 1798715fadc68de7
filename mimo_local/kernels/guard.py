"""A clear exit instead of a crash when a memory-mapped weights file is truncated under a running
model (guard.c). Built once for the plain C level; without a compiler the default SIGBUS crash
remains, so mapped files are also never rewritten in place by mimo itself (writes are temp + rename)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from . import build

SOURCE = Path(__file__).with_name("guard.c")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(build.build(SOURCE, build.level("generic"), openmp=False)))
    except (build.BuildError, OSError):
        return None
    library.install_sigbus_message.argtypes = [ctypes.c_char_p]
    return library


def exit_on_sigbus(message: str) -> bool:
    """On SIGBUS, print `message` (one line) to stderr and exit with status 1. False where the
    handler could not be installed."""
    library = _library()
    return library is not None and library.install_sigbus_message((message.rstrip("\n") + "\n").encode()) == 0
