"""bitsandbytes, imported once and quietly: on AVX512-BF16 CPUs its import logs a warning that the
optional `kernels` package is missing for its CPU 4-bit GEMM, which mimo never calls (the CPU path
dequantizes NF4 itself; bitsandbytes' fused matmul runs on CUDA only)."""

from __future__ import annotations

import functools
import logging


@functools.lru_cache(maxsize=1)
def functional():
    """bitsandbytes.functional (and bitsandbytes itself imported)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional
    finally:
        logger.setLevel(level)
    return bitsandbytes.functional


def matmul_4bit(*args, **kwargs):
    functional()
    import bitsandbytes

    return bitsandbytes.matmul_4bit(*args, **kwargs)
