"""``weights_first.matmul_out_in``: ``x @ W[out, in]^T`` computed as ``(W @ x^T)^T``, 5-16 rows padded.

Every element is a float32 dot product of ``in`` terms, so against float64 it is off by at most the accumulation
bound ``in * u * sum|x_i w_i|`` (``u = 2**-24``, any summation order or blocking); padding rows with zeros changes
which kernel runs, not the maths, so the bound is the same with and without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.weights_first import matmul_out_in, padded_rows
from roundoff import U


def assert_product_close(got, x, w):
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    magnitude = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)).T
    bound = x.shape[-1] * U * magnitude
    assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= bound)


def test_padded_rows_rule():
    assert [padded_rows(r) for r in range(1, 21)] == [1, 2, 3, 4, 8, 8, 8, 8] + [16] * 8 + [17, 18, 19, 20]


@pytest.mark.parametrize("rows", [1, 3, 5, 6, 8, 9, 16, 17])
def test_product_and_gradients_match_float64(rows):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(rows), 3)
    x = jax.random.normal(kx, (rows, 40), jnp.float32)
    w = jax.random.normal(kw, (24, 40), jnp.float32)  # [out, in]
    got = jax.jit(matmul_out_in)(x, w)
    assert got.shape == (rows, 24)
    assert_product_close(got, x, w)
    # Gradients through the pad and the slice: g @ W for x, g^T @ x for W (exact products of the same kind).
    g = jax.random.normal(kg, (rows, 24), jnp.float32)
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul_out_in(x, w) * g), argnums=(0, 1)))(x, w)
    assert_product_close(gx, g, w.T)
    assert_product_close(gw, g.T, x.T)


def test_leading_axes_are_kept():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 40), jnp.float32)  # 6 rows in all: padded to 8
    w = jax.random.normal(jax.random.PRNGKey(1), (24, 40), jnp.float32)
    got = jax.jit(matmul_out_in)(x, w)
    assert got.shape == (2, 3, 24)
    assert_product_close(got.reshape(6, 24), x.reshape(6, 40), w)


@pytest.mark.parametrize("rows, computed", [(3, 3), (6, 8), (12, 16), (20, 20)])
def test_compiled_product_has_the_padded_rows(rows, computed):
    """The dot XLA runs has ``padded_rows`` columns (the padding is not simplified away)."""
    x = jnp.ones((rows, 40), jnp.float32)
    w = jnp.ones((24, 40), jnp.float32)
    hlo = jax.jit(matmul_out_in).lower(x, w).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots
    assert any(f"f32[24,{computed}]" in line for line in dots), dots
