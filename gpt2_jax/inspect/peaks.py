"""Measure a device's own peaks (read bandwidth, matmul FLOP/s), for devices the table does not know.

A roofline needs two numbers: how fast the device reads memory and how fast it multiplies matrices. Vendors
publish them for accelerators (:mod:`gpt2_jax.inspect.devices`); for a CPU (or an unlisted accelerator) they
depend on the chip, its memory channels and how many cores this process may use, so the bench measures them in
the same run, with the same XLA that runs the model:

* **bandwidth**: a jitted ``sum`` over an array far larger than any cache (256 MiB on the CPU, 2 GiB on an
  accelerator): bytes read / median time. A reduction is what a decode step does with its weights (a
  matrix-vector product reads each weight once), so this is the bandwidth such a step can reach.
* **matmul FLOP/s** per dtype (float32 and bfloat16): a jitted square ``a @ b``, ``2 n^3`` FLOPs, the best of a
  few runs; ``n`` doubles from 512 until one product takes ~20 ms (or ``n`` reaches 8192), so fixed per-call
  costs do not count.

The figures are what XLA reaches here, not the silicon's datasheet peaks: utilisations against them say how far a
program is from what this software stack can do on this machine (a loaded machine measures lower peaks, and its
utilisations stay comparable within the run).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

GEMM_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MeasuredPeaks:
    """What one device reached: ``bandwidth_gbs`` (GB/s = 1e9 bytes/s) and ``tflops`` per dtype (1e12 FLOP/s),
    with the sizes used and the seconds the measurement took."""

    bandwidth_gbs: float
    tflops: dict[str, float]
    bandwidth_bytes: int
    gemm_n: dict[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the bench report's ``device.measured_peaks``)."""
        return dataclasses.asdict(self)


def _timed(fn: Callable[[], Any], runs: int) -> list[float]:
    """Wall seconds of ``runs`` calls of ``fn`` (which must block until its result is ready)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_bandwidth(device: Any = None, n_bytes: int | None = None, runs: int = 5) -> tuple[float, int]:
    """Read bandwidth in GB/s of a jitted float32 sum over ``n_bytes`` (default 256 MiB on the CPU, 2 GiB on an
    accelerator) placed on ``device``: ``(GB/s of the median run, bytes read)``."""
    device = device or jax.devices()[0]
    if n_bytes is None:
        n_bytes = (256 if device.platform == "cpu" else 2048) * 2**20
    n = n_bytes // 4
    x = jax.device_put(jnp.ones((n,), jnp.float32), device)  # [n]
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))  # compile
    seconds = statistics.median(_timed(lambda: jax.block_until_ready(total(x)), runs))
    del x
    return n * 4 / seconds / 1e9, n * 4


def measure_matmul_tflops(dtype: Any = "float32", device: Any = None, target_s: float = 0.02,
                          max_n: int = 8192, runs: int = 3) -> tuple[float, int]:
    """Matmul rate in TFLOP/s of a jitted square ``[n, n] @ [n, n]`` product of ``dtype`` operands accumulated into
    float32 (how mixed precision computes, and the only bfloat16 form XLA CPU runs on its native kernel: a bfloat16
    result runs at the float32 rate there) on ``device``: ``(best TFLOP/s, n)``; ``n`` doubles from 512 until one
    product takes ``target_s`` or reaches ``max_n``."""
    device = device or jax.devices()[0]
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    n = 512
    while True:
        key_a, key_b = jax.random.split(jax.random.PRNGKey(n))
        a = jax.device_put(jax.random.normal(key_a, (n, n), dtype), device)  # [n, n]
        b = jax.device_put(jax.random.normal(key_b, (n, n), dtype), device)  # [n, n]
        jax.block_until_ready(matmul(a, b))  # compile
        best = min(_timed(lambda: jax.block_until_ready(matmul(a, b)), runs))
        if best >= target_s or n >= max_n:
            return 2.0 * n**3 / best / 1e12, n
        n *= 2


def measure_peaks(device: Any = None, dtypes: tuple[str, ...] = GEMM_DTYPES,
                  bandwidth_bytes: int | None = None) -> MeasuredPeaks:
    """Measure ``device``'s read bandwidth and its matmul rate for each of ``dtypes`` (a few seconds).

    Args:
        device: a JAX device (default: the first).
        dtypes: matmul dtypes to measure (default float32 and bfloat16).
        bandwidth_bytes: size of the array the bandwidth sum reads (default: see :func:`measure_bandwidth`).
    """
    device = device or jax.devices()[0]
    start = time.perf_counter()
    bandwidth, n_bytes = measure_bandwidth(device, bandwidth_bytes)
    tflops, sizes = {}, {}
    for dtype in dtypes:
        tflops[dtype], sizes[dtype] = measure_matmul_tflops(np.dtype(jnp.dtype(dtype)).name, device)
    return MeasuredPeaks(bandwidth_gbs=bandwidth, tflops=tflops, bandwidth_bytes=n_bytes, gemm_n=sizes,
                         seconds=time.perf_counter() - start)
