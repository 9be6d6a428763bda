"""Keep freed memory in the process, so that XLA CPU's per-call temporaries are not faulted in again every step.

XLA's CPU runtime allocates each call's temporaries as one block with ``malloc`` and frees it when the call ends
(gpt2's train step, 4 x 256: 1.8 GB). glibc serves a block that large with ``mmap`` and gives it back with
``munmap``, so every step faults all of its pages in again: ~535,000 minor page faults per gpt2 step, 1.4 s of
kernel time on an idle 2-core Zen 4 VM and ~5 s right after another process freed memory (measured after a PyTorch
step), against a 3.3 s bfloat16 step. Started with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0`` and a trim threshold
above any heap, glibc keeps the block for the next step: no page faults after the first steps.

Those settings must be in the environment when the process starts. Set later (``mallopt``), they miss threads that
already own a malloc arena, and an arena other than the main one maps any block over its 64 MB heap with ``mmap``
whatever the settings: stop 24 measured 0 faults per call in some processes and 16,384 in others. So the commands
that train restart themselves once, through ``os.execve`` (same process id, same arguments), with the settings
added. The cost: ~1-2 s of interpreter start, and the process keeps its peak heap until it exits. Opt out with
``GPT2_JAX_KEEP_HEAP=0``; a ``MALLOC_*`` setting already in the environment is left alone (no restart).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

#: ``0`` disables the restart; the restarted process also carries ``0`` so it never restarts twice.
KEEP_HEAP_ENV = "GPT2_JAX_KEEP_HEAP"
#: glibc's tunables, read once at process start: one arena (the main one, which grows with ``brk`` and honours the
#: other two), no ``mmap`` for large blocks, and a trim threshold no heap reaches (64 TiB).
KEPT_HEAP_SETTINGS = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 46),
}


def kept_heap_environment(environ: Mapping[str, str], *, system: str | None = None,
                          libc: str | None = None) -> dict[str, str] | None:
    """The environment to restart with, or None when no restart applies: not Linux with glibc, opted out
    (``GPT2_JAX_KEEP_HEAP=0``), already restarted, or some ``MALLOC_*`` setting already chosen by the user."""
    system = platform.system() if system is None else system
    libc = platform.libc_ver()[0] if libc is None else libc
    if system != "Linux" or libc != "glibc":
        return None
    if environ.get(KEEP_HEAP_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    if any(name.startswith("MALLOC_") for name in environ):
        return None
    return {**environ, **KEPT_HEAP_SETTINGS, KEEP_HEAP_ENV: "0"}


def restart_with_kept_heap(python_args: Sequence[str]) -> None:
    """Replace this process with ``python <python_args>`` under :data:`KEPT_HEAP_SETTINGS`, when
    :func:`kept_heap_environment` says so; otherwise return and let the caller go on as it is."""
    environment = kept_heap_environment(os.environ)
    if environment is None:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # what was printed before the exec must not be lost
    os.execve(sys.executable, [sys.executable, *python_args], environment)
