"""tests/kernel_harness.c, the kernels against naive references in plain C, for every build: the
host's runnable levels natively, the AVX-512 one compiled (not run) where this CPU lacks it, and
the aarch64 builds (NEON and generic) cross-compiled and run under qemu-user. CI installs the
cross compiler and qemu (gcc-aarch64-linux-gnu, qemu-user: .ci/run)."""

import shutil
import subprocess
from pathlib import Path

import kernel_builds
import pytest

from mimo_local.kernels import build

HARNESS = Path(__file__).with_name("kernel_harness.c")
CHECKS = 9
CROSS_COMPILER, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


def compile_harness(compiler: str, flags, output: Path) -> None:
    result = subprocess.run([compiler, "-O3", "-fopenmp", *flags, str(HARNESS), "-o", str(output), "-lm"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def assert_passes(command, level: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1] == "ALL OK", result.stdout + result.stderr
    assert lines[0] == f"isa {level}"
    assert sum(line.startswith("ok ") for line in lines) == CHECKS


@pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("level", kernel_builds.LEVELS)
def test_the_harness_passes_on_every_build_this_cpu_runs(tmp_path, level):
    program = tmp_path / f"harness-{level}"
    compile_harness(build.compiler(), build.level(level).compiler_flags(build.cpu_flags()), program)
    assert_passes([str(program)], level)


@pytest.mark.skipif(build.compiler() is None or build._machine() != "x86_64", reason="needs gcc on x86-64")
def test_the_avx512_harness_compiles_where_it_cannot_run(tmp_path):
    everything = frozenset(feature for feature, _ in build.level("avx512").extras)
    compile_harness(build.compiler(), build.level("avx512").compiler_flags(everything), tmp_path / "harness-avx512")
    assert b"avx512\0" in (tmp_path / "harness-avx512").read_bytes()


@pytest.mark.skipif(not (CROSS_COMPILER and QEMU and Path(AARCH64_SYSROOT).is_dir()),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (installed by .ci/run)")
@pytest.mark.parametrize("level", ["neon", "generic"])
def test_the_aarch64_builds_pass_under_qemu(tmp_path, level):
    program = tmp_path / f"harness-aarch64-{level}"
    compile_harness(CROSS_COMPILER, build.level(level).flags, program)
    assert_passes([QEMU, "-L", AARCH64_SYSROOT, str(program)], level)


@pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")
def test_the_harness_passes_without_openmp(tmp_path):
    """Built by a compiler without OpenMP (Apple's clang), the kernels run serially and agree."""
    level = build.runnable_levels()[0]
    program = tmp_path / "harness-serial"
    result = subprocess.run([build.compiler(), "-O3", *level.compiler_flags(build.cpu_flags()), str(HARNESS), "-o",
                             str(program), "-lm"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_passes([str(program)], level.name)


def test_a_compiler_without_openmp_builds_serial_kernels(tmp_path, monkeypatch, capsys):
    """A compiler that rejects -fopenmp still builds the kernels (one line says they are serial)."""
    real = build.compiler()
    if real is None:
        pytest.skip("no C compiler on this machine")
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "unsupported option" >&2; exit 1; }}; done\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(build, "_warned", False)
    library = build.build(Path(build.__file__).with_name("cpu_linear.c"), build.runnable_levels()[0], directory=tmp_path)
    assert "has no OpenMP" in capsys.readouterr().err
    assert b"GOMP_" not in library.read_bytes()  # not linked against libgomp
