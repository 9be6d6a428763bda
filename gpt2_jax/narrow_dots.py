"""Matmuls of bfloat16 operands that XLA's CPU compiler runs on its native bfloat16 kernel, backward pass included.

XLA CPU (jax 0.10) gives a dot to YNNPACK's bfloat16 kernel only when it reads bfloat16, *writes float32*, and both
operands are row-major in the canonical ``[M, K] x [K, N]`` form (``IsDotSupportedByYnn`` in XLA's
``backends/cpu/ynn_support.cc``). Every other bfloat16 dot is converted to float32 and runs at the float32 rate,
half of the bfloat16 one on CPUs with AVX512-BF16. A mixed-precision step misses that kernel twice over: a dot
that writes bfloat16 (what ``dtype=bfloat16`` layers compute), and the backward pass, whose input and weight
gradients read an operand transposed (``g @ W^T``, ``x^T @ g``): XLA folds the transpose into the dot's dimension
numbers rather than copying it, and also cancels a reversal of the contracted axis applied to both operands.

:func:`matmul` writes float32 and has its own gradient. Where a product reads an operand transposed, both operands
get the same permutation of the contracted axis, its two halves swapped (the sum is unchanged); XLA does not see
through it, so it materialises the permuted operand row-major, fused into the bfloat16 conversion the gradient
needs anyway. Measured on an AMD EPYC Zen 4 (2 cores, AVX512-BF16), one 1024 x 768 x 3072 product: bfloat16
writing float32 ~370 GFLOP/s, writing bfloat16 ~180, transposed operand ~190, float32 ~185; gpt2's mixed-precision
train step (4 x 256, no dropout) 7.2 s with this off, 4.5 s with it on (one process each, the same session; 3.25 s with
the kept heap of :mod:`gpt2_jax.heap`, ``benchmarks/bench_train.py --dtype bfloat16``).

It is a CPU formulation (:attr:`gpt2_jax.backend.Tuning.row_major_bf16_dots`): GPUs and TPUs take any operand
layout, so they keep the plain dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _swap_halves(a: jax.Array, axis: int) -> jax.Array:
    """``a`` with the two halves of ``axis`` swapped (unchanged when that axis has odd length: the product is then
    still right, only computed in float32 by XLA)."""
    n = a.shape[axis]
    if n % 2:
        return a
    split = a.shape[:axis] + (2, n // 2) + a.shape[axis + 1:]  # [..., n, ...] -> [..., 2, n / 2, ...]
    return jnp.flip(a.reshape(split), axis=axis).reshape(a.shape)


def _row_major_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [M, K] @ b [K, N]`` in float32, either operand possibly a transposed view: the same permutation of K on
    both makes XLA copy each one row-major instead of folding the transpose into the dot. A product with one row
    or one column never reaches XLA's bfloat16 kernel, so it gets the plain dot (no copies made for nothing)."""
    if a.shape[0] == 1 or b.shape[1] == 1:
        return jnp.dot(a, b, preferred_element_type=jnp.float32)
    return jnp.dot(_swap_halves(a, 1), _swap_halves(b, 0), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(a: jax.Array, b: jax.Array, b_transposed: bool) -> jax.Array:
    """``a [M, K] @ b [K, N]`` (or ``@ b.T`` for ``b [N, K]`` when ``b_transposed``) -> float32 ``[M, N]``."""
    if b_transposed:
        return _row_major_dot(a, b.T)
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _matmul_2d_fwd(a, b, b_transposed):
    return _matmul_2d(a, b, b_transposed), (a, b)


def _matmul_2d_bwd(b_transposed, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)  # [M, N]: the cotangent in the operands' dtype, as a bfloat16 backward pass has it
    if b_transposed:  # b [N, K]
        grad_a = jnp.dot(g, b, preferred_element_type=jnp.float32)  # [M, N] @ [N, K]: already row-major
        grad_b = _row_major_dot(g.T, a)  # [N, M] @ [M, K]
    else:  # b [K, N]
        grad_a = _row_major_dot(g, b.T)  # [M, N] @ [N, K]
        grad_b = _row_major_dot(a.T, g)  # [K, M] @ [M, N]
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool = False) -> jax.Array:
    """``x [..., K] @ w [K, N]`` (or ``@ w.T`` for ``w [N, K]`` when ``w_transposed``) -> float32 ``[..., N]``.

    ``x`` and ``w`` share a dtype (bfloat16 is the case this exists for); the product accumulates and is returned
    in float32, and every dot of its forward and backward pass reads row-major ``[M, K] x [K, N]`` operands.
    """
    if x.dtype != w.dtype:
        raise ValueError(f"matmul needs operands of one dtype, got {x.dtype} and {w.dtype}")
    rows = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    out = _matmul_2d(rows, w, w_transposed)  # [M, N]
    return out.reshape(*x.shape[:-1], out.shape[-1])  # [M, N] -> [..., N]


def applies(dtype, tuning) -> bool:
    """Whether a matmul computing in ``dtype`` under ``tuning`` goes through :func:`matmul`."""
    return tuning is not None and tuning.row_major_bf16_dots and jnp.dtype(dtype) == jnp.bfloat16
