"""The ctypes declarations of the C entry points agree with the C source, parameter for parameter
(a disagreement would pass garbage to the kernel, or crash the process, instead of failing here)."""

import ctypes
import shutil

import pytest

from mimo_local.kernels import build, cpu, quant, signatures

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")  # CI has it


def flags() -> list[str]:
    return build.level("avx2").compiler_flags(frozenset()) if build.level("avx2").runs_on(build.cpu_flags()) else []


@pytest.mark.parametrize("module", [cpu, quant])
def test_kernels_are_declared_as_defined(module):
    assert signatures.mismatches(module.DECLARATIONS, module.SOURCE, flags()) == []


def test_a_changed_parameter_list_is_reported(tmp_path):
    source = tmp_path / "kernel.c"
    source.write_text("#include <stdint.h>\nvoid scale(float *x, int64_t n, float by) { for (int64_t i = 0; i < n; i++) x[i] *= by; }\n")
    agrees = {"scale": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_float], None)}
    assert signatures.mismatches(agrees, source, []) == []
    int_instead_of_int64 = {"scale": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_float], None)}
    (problem,) = signatures.mismatches(int_instead_of_int64, source, [])
    assert problem.startswith("scale: kernel.c has (['pointer', 'int64', 'float'], 'void')")
    assert signatures.mismatches({"gone": ([], None)}, source, []) == ["gone: declared, not defined in kernel.c"]
