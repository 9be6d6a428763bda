"""Host CPU detection (:mod:`gpt2_jax.cpu_features`) and the CPU default that follows it: the row-major bfloat16
products of :mod:`gpt2_jax.narrow_dots` only where the CPU has native bfloat16 dot products."""

from __future__ import annotations

import pytest

from gpt2_jax import backend, cpu_features

# Abbreviated /proc/cpuinfo texts of the CPUs this project has run on (two processors each, as on the 2-core VMs).
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
flags\t\t: fpu sse2 avx avx2 fma vaes vpclmulqdq
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
NEOVERSE_V1 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm bf16 i8mm
CPU implementer\t: 0x41
"""


def _twice(text: str) -> str:
    return text + "\n" + text.replace("processor\t: 0", "processor\t: 1")


@pytest.mark.parametrize("text, native", [(ZEN4, True), (SAPPHIRE_RAPIDS, True), (ZEN3, False),
                                          (NEOVERSE_V1, False), ("", False)])
def test_native_bf16_dots_are_read_from_the_flags(text, native):
    assert cpu_features.native_bf16_dots_in(cpu_features.cpuinfo_flags(_twice(text))) is native


def test_flags_are_the_words_of_flags_and_features_lines_only():
    flags = cpu_features.cpuinfo_flags(ZEN3 + NEOVERSE_V1)
    assert {"avx2", "fma", "asimd", "bf16"} <= flags
    assert not {"AuthenticAMD", "25", "0x41"} & flags  # other lines' values are not flags


def test_detection_reads_proc_cpuinfo_and_falls_back_to_false(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu_features, "CPUINFO", cpuinfo)
    monkeypatch.setattr(cpu_features.sys, "platform", "linux")
    try:
        cpu_features.has_native_bf16_dots.cache_clear()
        assert cpu_features.has_native_bf16_dots() is False  # unreadable: no such file
        cpuinfo.write_text(_twice(ZEN4))
        cpu_features.has_native_bf16_dots.cache_clear()
        assert cpu_features.has_native_bf16_dots() is True
        monkeypatch.setattr(cpu_features.sys, "platform", "darwin")
        cpu_features.has_native_bf16_dots.cache_clear()
        assert cpu_features.has_native_bf16_dots() is False  # not measured off Linux x86
    finally:
        monkeypatch.undo()
        cpu_features.has_native_bf16_dots.cache_clear()


def test_the_cpu_default_follows_the_detection(monkeypatch):
    monkeypatch.delenv(backend.TUNING_ENV, raising=False)
    native = cpu_features.has_native_bf16_dots()
    assert backend.tuning_for(platform="cpu").row_major_bf16_dots is native
    assert not backend.tuning_for(platform="gpu").row_major_bf16_dots  # GPUs and TPUs take any operand layout
    monkeypatch.setenv(backend.TUNING_ENV, f"row_major_bf16_dots={int(not native)}")  # the override still wins
    assert backend.tuning_for(platform="cpu").row_major_bf16_dots is (not native)
