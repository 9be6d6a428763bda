"""Matmuls of bfloat16 operands that XLA's CPU compiler runs on its native bfloat16 kernel, backward pass included.

XLA CPU (jax 0.10) gives a dot to YNNPACK's bfloat16 kernel only when it reads bfloat16, *writes float32*, and both
operands are row-major in the canonical ``[..., M, K] x [..., K, N]`` form (``IsDotSupportedByYnn`` in XLA's
``backends/cpu/ynn_support.cc``). Every other bfloat16 dot is converted to float32 and runs at the float32 rate,
half of the bfloat16 one on CPUs with AVX512-BF16. A mixed-precision step misses that kernel three ways: a dot
that writes bfloat16 (what ``dtype=bfloat16`` layers compute); the backward pass, whose input and weight gradients
read an operand transposed (``g @ W^T``, ``x^T @ g``); and attention, whose heads are moved by a transpose
(``[batch, T, n_head, head_dim] -> [batch, n_head, T, head_dim]``). XLA folds such transposes into the dot's
dimension numbers rather than copying them (an ``optimization_barrier`` does not stop it on CPU).

:func:`matmul` (a layer's ``x @ W``) and :func:`batched_matmul` (attention's per-head products) write float32 and
have their own gradient; where a product reads an operand transposed, that operand is copied row-major first by a
transpose through a split axis (``[..., R, C] -> [..., R, 2, C / 2] -> [..., 2, C / 2, R]``), which XLA's transpose
folding does not see through. :func:`transpose` moves axes the same way for callers (attention's heads).

Measured on an AMD EPYC Zen 4 (2 cores, AVX512-BF16), one 1024 x 768 x 3072 product: bfloat16 writing float32
~370 GFLOP/s, writing bfloat16 ~180, transposed operand ~190, float32 ~185. gpt2's mixed-precision train step
(4 x 256, no dropout, one process, kept heap): 3.24 s with only the layers' products here (an earlier permutation of
the contracted axis instead of the split transpose), **2.62 s** with the split transpose and attention's products
too (``benchmarks/bench_train.py --dtype bfloat16``; 7.2 s with none of it).

It is a CPU formulation (:attr:`gpt2_jax.backend.Tuning.row_major_bf16_dots`): GPUs and TPUs take any operand
layout, so they keep the plain dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def transposed_copy(a: jax.Array) -> jax.Array:
    """``a [..., R, C]`` -> ``[..., C, R]`` that XLA materialises row-major instead of folding into the dot
    (:func:`transpose`; its plain transpose loop takes ~0.5 ms for 768 x 3072 bfloat16, where the permutation of the
    contracted axis used before measured ~3.8 ms). With both axes odd it is the plain view: the product is then
    still right, only computed in float32 by XLA."""
    return transpose(a, tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2))


def transpose(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """``x.transpose(perm)`` made as a copy XLA lays out row-major, rather than a view it folds into the next dot.

    XLA folds a transpose that feeds a dot into the dot's dimension numbers, which XLA CPU's bfloat16 kernel then
    refuses (attention's ``[batch, T, n_head, head_dim] -> [batch, n_head, T, head_dim]`` for instance). One moved
    axis of even length is split in two (``n -> [2, n / 2]``) and the transpose taken over the split shape, which
    XLA does not see through. With no such axis it is the plain transpose."""
    perm = tuple(perm)
    movable = [ax for ax in range(x.ndim) if perm.index(ax) != ax and x.shape[ax] % 2 == 0]
    if not movable:
        return x.transpose(perm)
    split_ax = movable[0]
    n = x.shape[split_ax]
    split = x.reshape(x.shape[:split_ax] + (2, n // 2) + x.shape[split_ax + 1:])  # axis split_ax -> [2, n / 2]
    split_perm = []
    for ax in perm:  # the same permutation over the split shape
        split_perm += [split_ax, split_ax + 1] if ax == split_ax else [ax if ax < split_ax else ax + 1]
    return split.transpose(split_perm).reshape(tuple(x.shape[ax] for ax in perm))


def float32_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [..., M, K] @ b [..., K, N]`` -> float32 ``[..., M, N]`` (shared leading axes are batch axes)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _dot_transposed(a: jax.Array, b: jax.Array, transposed: str) -> jax.Array:
    """``a @ b`` in float32 where ``transposed`` (``"a"`` or ``"b"``) names the operand given as ``[..., K, M]`` /
    ``[..., N, K]``: it is copied row-major first. A product with one row or one column never reaches XLA's
    bfloat16 kernel, so it gets the plain dot (no copy made for nothing)."""
    a_full = jnp.swapaxes(a, -1, -2) if transposed == "a" else a  # [..., M, K]
    b_full = jnp.swapaxes(b, -1, -2) if transposed == "b" else b  # [..., K, N]
    if a_full.shape[-2] == 1 or b_full.shape[-1] == 1:
        return float32_product(a_full, b_full)
    if transposed == "a":
        return float32_product(transposed_copy(a), b)
    return float32_product(a, transposed_copy(b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a: jax.Array, b: jax.Array, b_transposed: bool) -> jax.Array:
    """``a [..., M, K] @ b [..., K, N]`` (or ``@ b^T`` for ``b [..., N, K]`` when ``b_transposed``) -> float32
    ``[..., M, N]``; ``a`` and ``b`` have the same leading (batch) axes."""
    if b_transposed:
        return _dot_transposed(a, b, "b")
    return float32_product(a, b)


def _matmul_fwd(a, b, b_transposed):
    return _matmul(a, b, b_transposed), (a, b)


def _matmul_bwd(b_transposed, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)  # [..., M, N]: the cotangent in the operands' dtype, as a bfloat16 backward pass has it
    if b_transposed:  # b [..., N, K]
        grad_a = float32_product(g, b)  # [..., M, N] @ [..., N, K]: already row-major
        grad_b = _dot_transposed(g, a, "a")  # [..., N, M] @ [..., M, K]
    else:  # b [..., K, N]
        grad_a = _dot_transposed(g, b, "b")  # [..., M, N] @ [..., N, K]
        grad_b = _dot_transposed(a, g, "a")  # [..., K, M] @ [..., M, N]
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check_dtypes(x: jax.Array, w: jax.Array) -> None:
    if x.dtype != w.dtype:
        raise ValueError(f"matmul needs operands of one dtype, got {x.dtype} and {w.dtype}")


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool = False) -> jax.Array:
    """``x [..., K] @ w [K, N]`` (or ``@ w.T`` for ``w [N, K]`` when ``w_transposed``) -> float32 ``[..., N]``.

    ``x`` and ``w`` share a dtype (bfloat16 is the case this exists for); the product accumulates and is returned
    in float32, and every dot of its forward and backward pass reads row-major ``[M, K] x [K, N]`` operands.
    """
    _check_dtypes(x, w)
    rows = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    out = _matmul(rows, w, w_transposed)  # [M, N]
    return out.reshape(*x.shape[:-1], out.shape[-1])  # [M, N] -> [..., N]


def batched_matmul(a: jax.Array, b: jax.Array, *, b_transposed: bool = False) -> jax.Array:
    """``a [..., M, K] @ b [..., K, N]`` (or ``@ b^T`` for ``b [..., N, K]`` when ``b_transposed``) -> float32
    ``[..., M, N]``, one product per index of the shared leading axes (attention's per-head products).

    Same dtype and float32 accumulation as :func:`matmul`; every dot of the forward and backward pass reads
    row-major operands.
    """
    _check_dtypes(a, b)
    if a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"batched_matmul needs the same leading axes, got {a.shape} and {b.shape}")
    return _matmul(a, b, b_transposed)


def applies(dtype, tuning) -> bool:
    """Whether a matmul computing in ``dtype`` under ``tuning`` goes through :func:`matmul`."""
    return tuning is not None and tuning.row_major_bf16_dots and jnp.dtype(dtype) == jnp.bfloat16
