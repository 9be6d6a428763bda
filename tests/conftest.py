"""Shared test setup: tests/ on sys.path for the reference helpers, float32 everywhere, shared-data paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VECTORS = SHARED / "testdata" / "gpt2_vectors.json"


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch):
    """No test may switch JAX's persistent compilation cache on for the rest of the process (an in-process
    ``gpt2-jax generate`` would, into the user's ~/.cache; jaxlib has crashed reading and writing that shared cache
    under pytest). Tests that want the cache run a subprocess with their own directory."""
    monkeypatch.setenv("GPT2_JAX_COMPILATION_CACHE", "off")
    yield
    import jax

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every compiled XLA CPU program keeps ~3 memory maps
    (its JIT-compiled code) while cached, and the default suite compiles tens of thousands of programs: one process
    reached Linux's ``vm.max_map_count`` (65530), the next compile failed, and throwing that error crashed the
    process (SIGSEGV in the C++ unwinder under ``backend_compile_and_load``)."""
    yield
    import jax

    before = _memory_maps()
    jax.clear_caches()
    if os.environ.get("GPT2_JAX_TEST_MAPS"):  # a diagnostic: how many maps a module leaves
        print(f"\n[memory maps: {before} after the module, {_memory_maps()} after clearing JAX's caches]")
