"""Building the C kernels for the CPU at hand: one build per ISA level, the best level the CPU runs
chosen at run time (from its feature flags, not from how the build machine happened to be).

Levels, best first: `avx512` (x86-64-v4, plus AVX512-VNNI / AVX512-BF16 where the CPU has them),
`avx2` (x86-64-v3: AVX2, FMA, F16C, plus AVX-VNNI where present), `neon_i8mm` (aarch64 with the dot-product
and int8 matrix-multiply extensions), `neon_dotprod` (aarch64 with the dot-product extension), `neon` (baseline
aarch64) and `generic` (the compiler's default target, plain C without intrinsics).
MIMO_CPU_ISA=<level> forces one (an error where this CPU cannot run it);
MIMO_CPU_KERNELS=0 turns the kernels off (torch's ops run). Builds are cached under
~/.cache/mimo-local/kernels, keyed by the sources, the compiler (path and version) and the flags.
A build that fails prints one line to stderr, once per process, and the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mimo_local.errors import MimoError

_X86_64_V3 = frozenset("avx avx2 bmi1 bmi2 f16c fma abm movbe xsave".split())
# What -march=armv8.2-a lets the compiler use beyond Armv8.0 (LSE atomics, rounding doubling multiply-add)
_ARMV8_2 = frozenset({"asimd", "atomics", "asimdrdm"})


@dataclass(frozen=True)
class IsaLevel:
    name: str
    flags: tuple[str, ...]  # compiler flags of this level
    needs: frozenset[str]  # CPU feature flags (as /proc/cpuinfo names them) it needs
    extras: tuple[tuple[str, str], ...] = ()  # (CPU flag, compiler flag) added where the CPU has the feature
    machine: str | None = None  # the architecture it is for (None: any)

    def compiler_flags(self, cpu_flags: frozenset[str]) -> list[str]:
        return [*self.flags, *(flag for feature, flag in self.extras if feature in cpu_flags)]

    def runs_on(self, cpu_flags: frozenset[str]) -> bool:
        return self.needs <= cpu_flags and self.machine in (None, _machine())


LEVELS = (
    IsaLevel("avx512", ("-march=x86-64-v4",), _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
             (("avx512_vnni", "-mavx512vnni"), ("avx512_bf16", "-mavx512bf16")), machine="x86_64"),
    IsaLevel("avx2", ("-march=x86-64-v3",), _X86_64_V3, (("avx_vnni", "-mavxvnni"),), machine="x86_64"),
    IsaLevel("neon_i8mm", ("-march=armv8.2-a+dotprod+i8mm",), _ARMV8_2 | {"asimddp", "i8mm"}, machine="aarch64"),
    IsaLevel("neon_dotprod", ("-march=armv8.2-a+dotprod",), _ARMV8_2 | {"asimddp"}, machine="aarch64"),
    IsaLevel("neon", (), frozenset({"asimd"}), machine="aarch64"),
    IsaLevel("generic", ("-DMIMO_PLAIN_C",), frozenset()),
)
LEVEL_NAMES = tuple(level.name for level in LEVELS)
COMMON_FLAGS = ("-O3", "-shared", "-fPIC")
OPENMP_FLAG = "-fopenmp"


class BuildError(Exception):
    """A kernel build that failed, with a one-line reason."""


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mimo-local" / "kernels"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them ("flags" on x86, "Features" on ARM; empty where
    /proc/cpuinfo has none: generic)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return flags_from_cpuinfo(handle)
    except OSError:
        return frozenset()


def flags_from_cpuinfo(lines) -> frozenset[str]:
    """The feature flags of the first "flags" (x86) or "Features" (ARM) line of /proc/cpuinfo's text."""
    line = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def level(name: str) -> IsaLevel:
    for candidate in LEVELS:
        if candidate.name == name:
            return candidate
    raise MimoError(f"MIMO_CPU_ISA must be one of {', '.join(LEVEL_NAMES)} (got {name!r})")


def runnable_levels(flags: frozenset[str] | None = None) -> list[IsaLevel]:
    """The levels this CPU runs, best first."""
    flags = cpu_flags() if flags is None else flags
    return [candidate for candidate in LEVELS if candidate.runs_on(flags)]


def chosen_level() -> tuple[IsaLevel, bool]:
    """(the level to load, whether MIMO_CPU_ISA forced it)."""
    forced = os.environ.get("MIMO_CPU_ISA", "").strip()
    if not forced:
        return runnable_levels()[0], False
    wanted = level(forced)
    if not wanted.runs_on(cpu_flags()):
        missing = sorted(wanted.needs - cpu_flags()) if wanted.machine in (None, _machine()) else [
            f"{wanted.machine} CPU: this is {platform.machine()}"]
        raise MimoError(f"MIMO_CPU_ISA={forced}: this CPU cannot run that build (no {', '.join(missing)})")
    return wanted, True


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


@functools.lru_cache(maxsize=8)
def _compiler_identity(path: str) -> str:
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    return f"{os.path.realpath(path)}\n{version.splitlines()[0] if version else ''}"


@functools.lru_cache(maxsize=8)
def openmp_flags(cc: str) -> tuple[str, ...]:
    """("-fopenmp",) where `cc` builds OpenMP code; () for a compiler without it (Apple's clang):
    the kernels then build without threads, and one line says so."""

    def builds(source: str, *flags: str) -> bool:
        with tempfile.TemporaryDirectory() as folder:
            probe = Path(folder, "probe.c")
            probe.write_text(source)
            try:
                return subprocess.run([cc, *flags, "-shared", "-fPIC", str(probe), "-o", str(probe.with_suffix(".so"))],
                                      capture_output=True, timeout=120).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False

    if builds("#include <omp.h>\nint threads(void) { return omp_get_max_threads(); }\n", OPENMP_FLAG):
        return (OPENMP_FLAG,)
    if builds("int threads(void) { return 1; }\n"):  # a working compiler, only without OpenMP
        warn_once(f"mimo: {Path(cc).name} has no OpenMP; the CPU kernels run on one thread (gcc, or clang with "
                  "libomp, runs them on all cores)")
    return ()


def sources(source_path: Path) -> list[Path]:
    """A kernel source and the sources it includes with `#include "file"`, and theirs (cpu_quant.c
    includes cpu_linear.c, which includes prefill_attention.c)."""
    included = re.findall(r'^#include "([^"]+)"', source_path.read_text(), flags=re.MULTILINE)
    found = [source_path]
    for name in included:
        found += [path for path in sources(source_path.with_name(name)) if path not in found]
    return found


def build(source_path: Path, isa: IsaLevel, flags: frozenset[str] | None = None, directory: Path | None = None,
          openmp: bool = True) -> Path:
    """The shared library of `source_path` for `isa`, compiled on first use (atomically: temp file
    and rename) and cached. Raises BuildError with a one-line reason. `openmp`: threaded where the
    compiler has OpenMP (whether it does is a property of the compiler, part of the key already)."""
    cc = compiler()
    if cc is None:
        raise BuildError(f"no C compiler found ({os.environ.get('CC', 'gcc')}; set CC to use another)")
    isa_flags = isa.compiler_flags(cpu_flags() if flags is None else flags)
    key = hashlib.sha256()
    for path in sources(source_path):
        key.update(path.read_bytes())
    key.update(_compiler_identity(cc).encode())
    key.update(" ".join([*COMMON_FLAGS, *([OPENMP_FLAG] if openmp else []), *isa_flags]).encode())
    directory = cache_dir() if directory is None else directory
    target = directory / f"{source_path.stem}-{isa.name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    command_flags = [*COMMON_FLAGS, *(openmp_flags(cc) if openmp else ()), *isa_flags]
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".so.tmp", delete=False) as handle:
        temporary = handle.name
    try:
        result = subprocess.run([cc, *command_flags, str(source_path), "-o", temporary, "-lm"], capture_output=True,
                                text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise BuildError(f"{Path(cc).name} failed on {source_path.name}: {(lines or ['no output'])[0].strip()}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


_warned = False


def warn_once(message: str) -> None:
    """One line to stderr, for the first problem of the process only."""
    global _warned
    if not _warned:
        _warned = True
        print(message, file=sys.stderr)


def kernels_enabled() -> bool:
    """False where MIMO_CPU_KERNELS=0 asks for torch's own ops throughout."""
    return os.environ.get("MIMO_CPU_KERNELS", "1") != "0"


def load(source_path: Path) -> tuple[ctypes.CDLL, IsaLevel] | None:
    """Build (or reuse) and load `source_path` for the best level this CPU runs (MIMO_CPU_ISA: the
    one named), falling back to lower levels if that build fails. None where the kernels are off
    (MIMO_CPU_KERNELS=0) or nothing could be built (one line to stderr says why)."""
    if not kernels_enabled():
        return None
    wanted, forced = chosen_level()
    candidates = [wanted] if forced else [c for c in runnable_levels() if LEVELS.index(c) >= LEVELS.index(wanted)]
    failures = []
    for candidate in candidates:
        try:
            path = build(source_path, candidate)
        except BuildError as error:
            failures.append(str(error))
            continue
        if failures:
            warn_once(f"mimo: the {wanted.name} CPU kernels failed to build ({failures[0]}); using the "
                      f"{candidate.name} build")
        import torch

        torch.get_num_threads()  # torch's libgomp is loaded first, so the kernels share its threads
        library = ctypes.CDLL(str(path))
        library.kernel_isa.restype = ctypes.c_char_p
        return library, candidate
    warn_once(f"mimo: fast CPU kernels are off ({failures[0]}); decode runs on torch's ops")
    return None
