"""A layer's product with its kernel laid out ``[out, in]``, computed with the kernel as the GEMM's left operand.

Generation on the CPU keeps each Dense kernel transposed to ``[out, in]`` (:mod:`gpt2_jax.generation.weight_layout`).
``x [R, in] @ W[out, in]^T`` read as written makes the weights the right operand of the dot, which YNNPACK (XLA CPU's
dot library in jax 0.10) packs into its own layout on every call: a whole extra pass over the weights for a step
that is bound by reading them. Written as ``(W[out, in] @ x^T)^T`` the weights are the left operand, read in place,
and only the few activation rows are packed. Both transposes are of ``R`` rows (small) and go through
:func:`gpt2_jax.narrow_dots.transpose`, a row-major copy that XLA does not fold back into the dot (a plain ``.T``
is folded, which turns the product back into the slow form).

Chain of gpt2's 12 MLPs (226 MB float32, AMD EPYC Zen 4, 2 cores; ``benchmarks/bench_kernel_layout.py`` times
the same three forms), median ms at R rows, ``x @ W[in, out]`` / ``x @ W[out, in]^T`` / this: 1 row 10.0 / 12.1 / 7.8;
2 rows 14.5 / 21.0 / 8.9; 8 rows 14.1 / 21.9 / 10.5; 32 rows 27.8 / 35.8 / 22.7; 64 rows 56.2 / 58.7 / 38.4;
128 rows 150 / 100 / 77; 1024 rows 593 / 594 / 591.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .narrow_dots import transpose


def matmul_out_in(x: jax.Array, kernel_t: jax.Array) -> jax.Array:
    """``x [..., in] @ kernel_t.T`` for ``kernel_t [out, in]`` -> ``[..., out]``, as ``(kernel_t @ x^T)^T``."""
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    out_t = jnp.dot(kernel_t, transpose(rows, (1, 0)))  # [out, in] @ [in, R] -> [out, R]
    return transpose(out_t, (1, 0)).reshape(*x.shape[:-1], kernel_t.shape[0])  # -> [R, out] -> [..., out]
