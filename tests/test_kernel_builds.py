"""Building the C kernels per ISA level (mimo_local/kernels/build.py): the choice at run time, the AVX-512
build compiled even where it cannot run, the cache key, a failed build, and the torch fallback."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kernel_builds
import pytest
import torch
import torch.nn.functional as F

from mimo_local.errors import MimoError
from mimo_local.kernels import build, cpu, quant
from mimo_local.loader import load_model

SOURCES = [cpu.SOURCE, quant.SOURCE]
ALL_X86_FEATURES = frozenset().union(*(level.needs for level in build.LEVELS), *(
    {feature for feature, _ in level.extras} for level in build.LEVELS))

needs_compiler = pytest.mark.skipif(build.compiler() is None, reason="no C compiler on this machine")


@needs_compiler
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_every_level_builds_and_the_ones_this_cpu_runs_report_themselves(tmp_path, source):
    """Every level of this architecture compiles here (on x86 AVX-512 with VNNI and BF16 too, where
    this CPU cannot run it: its build is checked by the level name it carries); the runnable ones
    load and say which they are. (aarch64: tests/test_kernel_harness.py, under qemu.)"""
    import ctypes

    for level in [level for level in build.LEVELS if level.machine in (None, build._machine())]:
        path = build.build(source, level, ALL_X86_FEATURES, directory=tmp_path)
        names = {name for name in build.LEVEL_NAMES if name.encode() + b"\0" in path.read_bytes()}
        assert level.name in names
        if level.name in kernel_builds.LEVELS:
            library = ctypes.CDLL(str(path))
            library.kernel_isa.restype = ctypes.c_char_p
            assert library.kernel_isa().decode() == level.name


def test_the_best_level_the_cpu_runs_is_chosen(monkeypatch):
    monkeypatch.delenv("MIMO_CPU_ISA", raising=False)
    avx2_only = frozenset(build.LEVELS[1].needs)
    monkeypatch.setattr(build, "cpu_flags", lambda: avx2_only)
    if build._machine() == "x86_64":
        assert build.chosen_level()[0].name == "avx2"
        monkeypatch.setattr(build, "cpu_flags", lambda: avx2_only | {"avx512f", "avx512bw", "avx512cd", "avx512dq",
                                                                      "avx512vl", "avx512_vnni"})
        chosen = build.chosen_level()[0]
        assert chosen.name == "avx512"
        assert chosen.compiler_flags(build.cpu_flags()) == ["-march=x86-64-v4", "-mavx512vnni"]  # no BF16 here
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2"}))
    assert build.chosen_level() == (build.LEVELS[-1], False)


def arm_cpuinfo(features: str) -> list[str]:
    """/proc/cpuinfo of an aarch64 Linux machine, one core, with this Features line."""
    return [line + "\n" for line in ("processor\t: 0", "BogoMIPS\t: 243.75", f"Features\t: {features}",
                                       "CPU implementer\t: 0x41", "CPU architecture: 8", "CPU variant\t: 0x1",
                                       "CPU part\t: 0xd40", "CPU revision\t: 1", "")]


# The Features lines of three aarch64 machines: Graviton3 (Neoverse V1), Graviton2 (Neoverse N1),
# Raspberry Pi 4 (Cortex-A72).
NEOVERSE_V1 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
               "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 "
               "i8mm bf16 dgh rng")
NEOVERSE_N1 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
CORTEX_A72 = "fp asimd evtstrm crc32 cpuid"


@pytest.mark.parametrize(("features", "expected"), [(NEOVERSE_V1, "neon_i8mm"), (NEOVERSE_N1, "neon_dotprod"),
                                                    (CORTEX_A72, "neon")])
def test_an_arm_cpu_gets_the_best_neon_level_its_features_line_allows(monkeypatch, features, expected):
    monkeypatch.delenv("MIMO_CPU_ISA", raising=False)
    monkeypatch.setattr(build, "_machine", lambda: "aarch64")
    flags = build.flags_from_cpuinfo(arm_cpuinfo(features))
    monkeypatch.setattr(build, "cpu_flags", lambda: flags)
    assert build.chosen_level() == (build.level(expected), False)
    assert [level.name for level in build.runnable_levels()][-1] == "generic"
    assert "avx2" not in [level.name for level in build.runnable_levels()]
    if expected != "neon_i8mm":
        monkeypatch.setenv("MIMO_CPU_ISA", "neon_i8mm")
        with pytest.raises(MimoError, match=r"MIMO_CPU_ISA=neon_i8mm: this CPU cannot run that build \(no .*i8mm\)"):
            build.chosen_level()


def test_a_forced_level_the_cpu_cannot_run_or_does_not_know_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    monkeypatch.setenv("MIMO_CPU_ISA", "avx2")
    with pytest.raises(MimoError, match="MIMO_CPU_ISA=avx2: this CPU cannot run that build") as error:
        build.chosen_level()
    assert "\n" not in str(error.value)
    monkeypatch.setenv("MIMO_CPU_ISA", "sse9")
    with pytest.raises(MimoError, match="must be one of avx512, avx2, neon_i8mm, neon_dotprod, neon, generic"):
        build.chosen_level()
    monkeypatch.setenv("MIMO_CPU_ISA", "generic")
    assert build.chosen_level() == (build.LEVELS[-1], True)


@needs_compiler
def test_the_cache_key_covers_source_compiler_and_flags(tmp_path, monkeypatch):
    level = build.LEVELS[-1]
    first = build.build(cpu.SOURCE, level, directory=tmp_path)
    built_at = first.stat().st_mtime_ns
    assert build.build(cpu.SOURCE, level, directory=tmp_path) == first and first.stat().st_mtime_ns == built_at
    wrapper = tmp_path / "cc-wrapper"  # another compiler (path and identity) that builds the same
    wrapper.write_text(f'#!/bin/sh\nexec {build.compiler()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    other_compiler = build.build(cpu.SOURCE, level, directory=tmp_path)
    monkeypatch.delenv("CC")
    other_flags = build.build(cpu.SOURCE, build.IsaLevel("generic", ("-fno-tree-vectorize",), frozenset()),
                              directory=tmp_path)
    edited = tmp_path / "src"
    edited.mkdir()
    for source in build.sources(cpu.SOURCE):  # the source edited, the files it includes beside it unchanged
        (edited / source.name).write_text(source.read_text() + ("\n/* edited */\n" if source == cpu.SOURCE else ""))
    other_source = build.build(edited / cpu.SOURCE.name, level, directory=tmp_path)
    assert len({first, other_compiler, other_flags, other_source}) == 4
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


FAILING_BUILD = textwrap.dedent("""
    import torch
    from mimo_local.kernels import cpu, quant
    x, weight = torch.randn(2, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert torch.equal(cpu.linear(x, weight), torch.nn.functional.linear(x, weight))
    qweight, scales = torch.randint(-127, 128, (32, 64), dtype=torch.int8), torch.rand(32)
    assert torch.equal(quant.int8_linear(x, qweight, scales), quant.reference_int8_linear(x, qweight, scales))
    logits = torch.randn(2, 1000)
    assert cpu.argmax_rows(logits) == logits.argmax(-1).tolist()
    print(cpu.active_isa())
""")


def test_a_failed_build_says_so_in_one_line_once_and_torch_runs(tmp_path):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cc1: error: no space left for kernels' >&2\nexit 1\n")
    compiler.chmod(0o755)
    environment = {**os.environ, "CC": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    environment.pop("MIMO_CPU_ISA", None)
    environment.pop("MIMO_CPU_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", FAILING_BUILD], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    assert result.stderr.splitlines() == [
        "mimo: fast CPU kernels are off (broken-cc failed on cpu_linear.c: cc1: error: no space left for kernels); "
        "decode runs on torch's ops"
    ]
    missing = {**environment, "CC": "no-such-compiler-here"}
    result = subprocess.run([sys.executable, "-c", FAILING_BUILD], capture_output=True, text=True, env=missing,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "mimo: fast CPU kernels are off (no C compiler found (no-such-compiler-here; set CC to use another)); "
        "decode runs on torch's ops"
    ]


@needs_compiler
def test_a_level_that_fails_to_build_falls_back_to_the_next_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MIMO_CPU_ISA", raising=False)
    monkeypatch.delenv("MIMO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(build, "_warned", False)
    monkeypatch.setattr(build, "cache_dir", lambda: tmp_path)
    best = build.runnable_levels()[0]
    real_build = build.build

    def failing_best(source, level, *args, **kwargs):
        if level == best:
            raise build.BuildError("gcc failed on cpu_linear.c: unknown flag")
        return real_build(source, level, *args, **kwargs)

    monkeypatch.setattr(build, "build", failing_best)
    if len(build.runnable_levels()) == 1:
        assert build.load(cpu.SOURCE) is None
        return
    library, level = build.load(cpu.SOURCE)
    assert level == build.runnable_levels()[1] and library.kernel_isa().decode() == level.name
    build.load(quant.SOURCE)
    assert capsys.readouterr().err.splitlines() == [
        f"mimo: the {best.name} CPU kernels failed to build (gcc failed on cpu_linear.c: unknown flag); using the "
        f"{level.name} build"
    ]


def test_with_the_kernels_off_every_op_gives_torchs_result():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=generator).bfloat16()
    weight = torch.randn(96, 256, generator=generator).bfloat16()
    qweight, scales = torch.randint(-127, 128, (96, 256), dtype=torch.int8, generator=generator), torch.rand(96)
    packed = quant.pack_int4(torch.randint(0, 16, (96, 256), generator=generator))
    group_scales, zeros = torch.rand(96, 2, generator=generator), torch.rand(96, 2, generator=generator) * 15
    logits = torch.randn(2, 5000, generator=generator)
    with kernel_builds.kernels(enabled=False):
        assert cpu.library() is None and quant.library() is None and cpu.active_isa() == "torch"
        assert not cpu.supports(x, weight)
        assert torch.equal(cpu.linear(x, weight), F.linear(x, weight))
        assert torch.equal(cpu.linear(x, weight, float32_out=True), F.linear(x, weight).float())
        assert torch.equal(quant.int8_linear(x, qweight, scales), quant.reference_int8_linear(x, qweight, scales))
        assert torch.equal(quant.int4_linear(x, packed, group_scales, zeros, 128),
                           quant.reference_int4_linear(x, packed, group_scales, zeros, 128))
        gate_up = torch.randn(3, 64, generator=generator)
        assert torch.equal(cpu.swiglu(gate_up), F.silu(gate_up[:, :32]) * gate_up[:, 32:])
        assert cpu.argmax_rows(logits) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("family", ["mimo", "mimo_v2_flash"])
def test_a_model_decodes_the_same_with_the_kernels_off(checkpoints, family, decode_logits):
    model = load_model(checkpoints(family))
    with kernel_builds.kernels(enabled=False):
        assert cpu.library() is None
        without = decode_logits(model, seed=4)
    with kernel_builds.kernels():
        with_kernels = decode_logits(model, seed=4)
    assert (without - with_kernels).abs().max().item() < 1e-4
