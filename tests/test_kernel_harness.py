"""tests/kernel_harness.c, the kernels against naive references in plain C, for every build: the
host's runnable levels natively, the AVX-512 one compiled (not run) where this CPU lacks it, and
the aarch64 builds (NEON with i8mm, NEON with dot products, NEON, generic) cross-compiled and run
under qemu-user, each on a CPU model with just what its level needs. CI installs the cross compiler
and qemu (gcc-aarch64-linux-gnu, qemu-user: .ci/run)."""

import shutil
import subprocess
from pathlib import Path

import kernel_builds
import pytest

from mimo_local.kernels import build

HARNESS = Path(__file__).with_name("kernel_harness.c")
CHECKS = 10
CROSS_COMPILER, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
CROSS_OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
AARCH64_LEVELS = [level.name for level in build.LEVELS if level.machine == "aarch64"] + ["generic"]
# The qemu CPU model each aarch64 build runs on: one with the features of its level and no more
# (Neoverse N1: dot products, no i8mm; Cortex-A53: Armv8.0).
QEMU_CPUS = {"neon_i8mm": "max", "neon_dotprod": "neoverse-n1", "neon": "cortex-a53", "generic": "cortex-a53"}
# The instructions of its extension each build must use (and the others must not).
EXTENSION_INSTRUCTIONS = {"neon_i8mm": {"sdot", "usdot"}, "neon_dotprod": {"sdot"}, "neon": set(), "generic": set()}


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


@pytest.mark.skipif("avx2" not in kernel_builds.LEVELS or build.compiler() is None, reason="needs an AVX2 CPU")
def test_the_avx2_harness_passes_without_avx_vnni_too(tmp_path):
    """The AVX2 build of a CPU without AVX-VNNI (vpmaddubsw + vpmaddwd in place of vpdpbusd), run here."""
    program = tmp_path / "harness-avx2-no-vnni"
    compile_harness(build.compiler(), build.level("avx2").compiler_flags(frozenset()), program)
    assert_passes([str(program)], "avx2")
    listing = subprocess.run(["objdump", "-d", str(program)], capture_output=True, check=True).stdout
    assert b"vpmaddubsw" in listing and b"vpdpbusd" not in listing


@pytest.mark.skipif(build.compiler() is None or build._machine() != "x86_64", reason="needs gcc on x86-64")
def test_the_avx512_harness_compiles_where_it_cannot_run(tmp_path):
    everything = frozenset(feature for feature, _ in build.level("avx512").extras)
    compile_harness(build.compiler(), build.level("avx512").compiler_flags(everything), tmp_path / "harness-avx512")
    assert b"avx512\0" in (tmp_path / "harness-avx512").read_bytes()


@pytest.mark.skipif(not (CROSS_COMPILER and CROSS_OBJDUMP and QEMU and Path(AARCH64_SYSROOT).is_dir()),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (installed by .ci/run)")
@pytest.mark.parametrize("level", AARCH64_LEVELS)
def test_the_aarch64_builds_pass_under_qemu_and_use_their_extensions(tmp_path, level):
    program = tmp_path / f"harness-aarch64-{level}"
    compile_harness(CROSS_COMPILER, build.level(level).flags, program)
    assert_passes([QEMU, "-cpu", QEMU_CPUS[level], "-L", AARCH64_SYSROOT, str(program)], level)
    listing = subprocess.run([CROSS_OBJDUMP, "-d", str(program)], capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in listing.splitlines()]  # "  addr:", "bytes ", "mnemonic", "operands"
    mnemonics = {fields[2].split()[0] for fields in rows if len(fields) > 2 and fields[2].strip()}
    assert mnemonics & {"sdot", "udot", "usdot", "sudot", "smmla", "ummla", "usmmla"} == EXTENSION_INSTRUCTIONS[level]


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
