"""What the host CPU can do, where it decides which formulation of a computation is the fast one.

One question today: does the CPU have native bfloat16 dot products? With them (x86's AVX512-BF16, whose
``VDPBF16PS`` multiplies pairs of bfloat16 and accumulates float32; AMD Zen 4 and later, Intel Cooper Lake, Sapphire
Rapids and later) XLA CPU's bfloat16 kernel runs at twice its float32 rate, and :mod:`gpt2_jax.narrow_dots` arranges
a mixed-precision step's products to reach it. Without them the same arrangement only adds copies: gpt2's
mixed-precision train step (4 x 256, 2-core AMD EPYC Zen 3, AVX2 only) took 9.85 s with it and 6.90 s without
(float32: 6.83 s). :attr:`gpt2_jax.backend.Tuning.row_major_bf16_dots` defaults to :func:`has_native_bf16_dots`.

Read from Linux's ``/proc/cpuinfo``; elsewhere (macOS, Windows) and on Arm the answer is ``False``: Arm's BF16
extension exists, but whether XLA CPU's kernel uses it has not been measured here. ``GPT2_JAX_TUNING=
row_major_bf16_dots=1`` turns the formulation on regardless.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

#: ``/proc/cpuinfo`` flags that mean native bfloat16 dot products on x86 (AMX-BF16 CPUs have AVX512-BF16 too).
NATIVE_BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_flags(text: str) -> frozenset[str]:
    """The feature flags of a ``/proc/cpuinfo`` text: the words of its ``flags`` lines (x86) or ``Features`` lines
    (Arm), over all processors."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16_dots_in(flags: frozenset[str]) -> bool:
    """Whether CPU feature ``flags`` (:func:`cpuinfo_flags`) include native bfloat16 dot products."""
    return bool(flags & NATIVE_BF16_DOT_FLAGS)


@functools.cache
def has_native_bf16_dots() -> bool:
    """Whether this machine's CPU has native bfloat16 dot products (read once per process; ``False`` where
    ``/proc/cpuinfo`` cannot be read)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return native_bf16_dots_in(cpuinfo_flags(text))
