"""Which Dense-kernel layout and which dot implementation XLA runs faster for a decode step of a few rows, here.

A jitted chain of gpt2's 12 MLPs (``x + tanh(x W1) W2``, 226 MB of float32 weights, random values) is timed with the
kernels as the params store them, ``[in, out]``, and transposed, ``[out, in]`` (what generation uses on the CPU for
one-row decode, :attr:`gpt2_jax.backend.Tuning.transposed_kernels`), for each row count. Both layouts run in the same
process, one after the other for each row count, so the ratio is a same-run comparison. Also printed: the weight bytes read per second and the
fraction of the bound ``max(bytes / bandwidth, flops / peak)`` with the peaks measured in this run (as ``gpt2-jax
bench`` does).

The answer depends on the machine kind: on a 2-core AMD EPYC Zen 4 VM ``[in, out]`` was the faster at 8 rows (a gpt2
decode step, 44 vs 54 ms); on a Zen 1 VM (2026-12-06, three runs) ``[out, in]`` was 1.00-1.22x as fast at 8 rows and
1.25x at 32 rows, and 1.7x at one row (100% of the bandwidth bound).

On the CPU each layout is also compiled a second time with XLA's own dot emitters instead of YNNPACK's (jax 0.10.2
routes every dot and reduction to a YNNPACK fusion by default), through the per-program compiler option
``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`` (YNNPACK keeps the reductions only); no process-
wide ``XLA_FLAGS`` needed. On the Zen 1 VM (2026-12-06, two runs) XLA's own dots ran the ``[in, out]`` chain 1.6-2.1x
as fast as YNNPACK at 8 rows (23-24 vs 37-52 ms; 55% of the bound instead of 34%), 1.35x at 32 rows, 0.8-1.1x at 64
rows; with ``[out, in]`` kernels they were 3-5x slower. Stop 22 measured the opposite on Zen 4 (XLA's dots at 8 rows
2x slower than YNNPACK, single-threaded), so neither lowering is right on both machine kinds.

``[out,in] weights-first`` computes ``(W @ x^T)^T`` (:mod:`gpt2_jax.weights_first`, ``Tuning.kernels_as_lhs``): the
weights become the GEMM's left operand, which YNNPACK reads in place instead of repacking them every call. On the
Zen 4 VM (2026-12-07) it ran 7.8 / 8.9 / 10.5 / 22.7 / 38.4 ms at 1 / 2 / 8 / 32 / 64 rows against ``[in,out]``'s
10.0 / 14.5 / 14.1 / 27.8 / 56.2 and ``[out,in]``'s 12.1 / 21.0 / 21.9 / 35.8 / 58.7 (one session's microbenchmark).

    python benchmarks/bench_kernel_layout.py [--rows 1 2 8 32] [--runs 15] [--no-xla-dots]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_seconds  # noqa: E402

D_MODEL, D_INNER, LAYERS = 768, 3072, 12
#: Per-program XLA CPU option: YNNPACK fuses reductions only, dots go to XLA's own emitters.
XLA_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def chain_in_out(x, up, down):
    """``x [rows, d]`` through the MLPs with kernels ``[in, out]``."""
    for w1, w2 in zip(up, down):
        x = x + jnp.tanh(x @ w1) @ w2  # [rows, d] -> [rows, inner] -> [rows, d]
    return x


def chain_out_in(x, up, down):
    """The same with kernels ``[out, in]``."""
    for w1, w2 in zip(up, down):
        x = x + jnp.einsum("ro,io->ri", jnp.tanh(jnp.einsum("ri,oi->ro", x, w1)), w2)
    return x


def chain_weights_first(x, up, down):
    """The same with kernels ``[out, in]`` multiplied as the GEMM's left operand, ``(W @ x^T)^T``
    (:func:`gpt2_jax.weights_first.matmul_out_in`, what generation computes under ``kernels_as_lhs``)."""
    from gpt2_jax.weights_first import matmul_out_in

    for w1, w2 in zip(up, down):
        x = x + matmul_out_in(jnp.tanh(matmul_out_in(x, w1)), w2)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-xla-dots", action="store_true", help="time YNNPACK's dots only (the default lowering)")
    args = parser.parse_args()

    from gpt2_jax.inspect.bench import roofline_fraction
    from gpt2_jax.inspect.peaks import measure_peaks

    rng = np.random.default_rng(0)
    up = [jnp.asarray(rng.standard_normal((D_MODEL, D_INNER), np.float32) * 0.02) for _ in range(LAYERS)]
    down = [jnp.asarray(rng.standard_normal((D_INNER, D_MODEL), np.float32) * 0.02) for _ in range(LAYERS)]
    up_t, down_t = [w.T.copy() for w in up], [w.T.copy() for w in down]
    layouts = {
        "[in,out]": (jax.jit(chain_in_out), up, down),
        "[out,in]": (jax.jit(chain_out_in), up_t, down_t),
        "[out,in] weights-first": (jax.jit(chain_weights_first), up_t, down_t),
    }
    if jax.devices()[0].platform == "cpu" and not args.no_xla_dots:
        layouts["[in,out] xla-dots"] = (jax.jit(chain_in_out, compiler_options=XLA_DOTS), up, down)
        layouts["[out,in] xla-dots"] = (jax.jit(chain_out_in, compiler_options=XLA_DOTS), up_t, down_t)
    weight_bytes = 2 * LAYERS * D_MODEL * D_INNER * 4
    measured = measure_peaks(dtypes=("float32",))
    peaks = {"bandwidth_gbs": measured.bandwidth_gbs, "tflops": measured.tflops["float32"]}
    print(f"{LAYERS} gpt2 MLPs, {weight_bytes / 1e6:.0f} MB float32; {jax.devices()[0].platform}, {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}; measured peaks {peaks['bandwidth_gbs']:.0f} GB/s, "
          f"{peaks['tflops'] * 1e3:.0f} GFLOP/s")
    for rows in args.rows:
        x = jnp.ones((rows, D_MODEL), jnp.float32)
        flops = 2 * rows * weight_bytes / 4
        seconds = {}
        for name, (fn, w1, w2) in layouts.items():
            fn(x, w1, w2).block_until_ready()
        for name, (fn, w1, w2) in layouts.items():
            seconds[name] = median_seconds(lambda: fn(x, w1, w2).block_until_ready(), args.runs)
        parts = [f"{name} {s * 1e3:.1f} ms ({weight_bytes / s / 1e9:.1f} GB/s, "
                 f"{roofline_fraction(s, weight_bytes, flops, peaks):.0%} of bound)"
                 for name, s in seconds.items()]
        ratios = ", ".join(f"{name} {seconds['[in,out]'] / s:.2f}x" for name, s in seconds.items()
                           if name != "[in,out]")
        print(f"rows {rows:3d}: {'; '.join(parts)}; speed vs [in,out]: {ratios}")


if __name__ == "__main__":
    main()
