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

YNNPACK's kernels run the few-row product fastest at 1-4, 8 and 16 rows; in between it is slower than the next of
those (a chain of 24 gpt2 MLPs, 453 MB, same machine, ms: 4 rows 20.7, 5 rows 27.2, 6 rows 30.3, 7 rows 32.8, 8 rows
24.1, 9 rows 37.0, 12 rows 37.5, 16 rows 30.3). So 5-16 rows are padded with zero rows up to 8 or 16
(:func:`padded_rows`; padded: 5 rows 22.1, 6 rows 23.3, 7 rows 25.8, 9 rows 30.6, 12 rows 31.2). A speculative
verification pass of ``K + 1 = 6`` tokens is one such product per kernel. Above 16 rows padding to the next
multiple of 16 did not pay (40 rows: 67.7 unpadded, 78.0 padded to 48), so those stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .narrow_dots import transpose


def padded_rows(rows: int) -> int:
    """The rows the product is computed with: 1-4 and more than 16 as they are, 5-8 -> 8, 9-16 -> 16."""
    if rows <= 4 or rows > 16:
        return rows
    return 8 if rows <= 8 else 16


def matmul_out_in(x: jax.Array, kernel_t: jax.Array) -> jax.Array:
    """``x [..., in] @ kernel_t.T`` for ``kernel_t [out, in]`` -> ``[..., out]``, as ``(kernel_t @ x^T)^T`` (with
    zero rows added up to :func:`padded_rows` and dropped from the result)."""
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    count, padded = rows.shape[0], padded_rows(rows.shape[0])
    if padded != count:
        rows = jnp.pad(rows, ((0, padded - count), (0, 0)))  # -> [P, in]
    out_t = jnp.dot(kernel_t, transpose(rows, (1, 0)))  # [out, in] @ [in, P] -> [out, P]
    out = transpose(out_t, (1, 0))[:count]  # -> [P, out] -> [R, out]
    return out.reshape(*x.shape[:-1], kernel_t.shape[0])  # -> [..., out]
