"""Running the kernel tests once per ISA build this CPU can run (MIMO_CPU_ISA=<level>, build.LEVEL_NAMES):
every CI run checks the AVX2 and generic builds on an AVX2 machine, all three on an AVX-512 one."""

from __future__ import annotations

import contextlib
import os

from mimo_local.kernels import build, cpu, quant

LEVELS = [level.name for level in build.runnable_levels()]
_VARIABLES = ("MIMO_CPU_ISA", "MIMO_CPU_KERNELS")


def _reload() -> None:
    cpu.library.cache_clear()
    quant.library.cache_clear()


@contextlib.contextmanager
def kernels(level: str | None = None, enabled: bool = True):
    """The kernels built for `level` (None: the default choice), or off, for the duration."""
    saved = {name: os.environ.get(name) for name in _VARIABLES}
    os.environ.pop("MIMO_CPU_ISA", None)
    if level is not None:
        os.environ["MIMO_CPU_ISA"] = level
    os.environ["MIMO_CPU_KERNELS"] = "1" if enabled else "0"
    _reload()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload()
