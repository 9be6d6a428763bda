"""gpt2_jax.layers.gelu_tanh: GPT-2's GELU with a closed-form derivative."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.layers import ACTIVATION_FNS, gelu_tanh

X = jax.random.normal(jax.random.PRNGKey(0), (4096,), jnp.float32) * 4.0


def _float64_gelu_and_slope(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = math.sqrt(2.0 / math.pi)
    tanh = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * x * (1.0 + tanh), 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh**2) * c * (1.0 + 3 * 0.044715 * x**2)


def test_float32_values_are_jax_nn_gelu():
    assert ACTIVATION_FNS["gelu_new"] is gelu_tanh and ACTIVATION_FNS["gelu_pytorch_tanh"] is gelu_tanh
    np.testing.assert_array_equal(np.asarray(jax.jit(gelu_tanh)(X)),
                                  np.asarray(jax.jit(lambda x: jax.nn.gelu(x, approximate=True))(X)))


def test_reverse_and_forward_mode_derivatives_match_float64():
    """Reverse and forward mode give the closed-form slope. Against autodiff of ``jax.nn.gelu`` (the same float32
    tanh, other operation order): float32 round-off of terms below ~2 (atol 1e-6). Against float64: XLA's float32
    tanh is accurate to a few units of 2^-24 near +-1 (4.4 measured), and the slope amplifies its error ``d`` by
    ``|d slope / d tanh| <= 0.5 + |x| c (1 + 3 * 0.044715 x^2)`` (``c = sqrt(2 / pi)``); ``d = 2^-20`` bounds it."""
    _, slope64 = _float64_gelu_and_slope(np.asarray(X, np.float64))
    grad = jax.jit(jax.grad(lambda x: gelu_tanh(x).sum()))(X)
    _, tangent = jax.jit(lambda x: jax.jvp(gelu_tanh, (x,), (jnp.ones_like(x),)))(X)
    autodiff = jax.jit(jax.grad(lambda x: jax.nn.gelu(x, approximate=True).sum()))(X)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(autodiff), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(tangent), np.asarray(grad))
    x64 = np.abs(np.asarray(X, np.float64))
    amplification = 0.5 + x64 * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x64**2)
    np.testing.assert_array_less(np.abs(np.asarray(grad, np.float64) - slope64), 2.0**-20 * amplification + 1e-6)


def test_bfloat16_is_computed_in_float32_and_rounded_once():
    """A bfloat16 input is upcast, so the value and the gradient are the float32 ones rounded to bfloat16 once:
    within bfloat16's unit round-off (2^-8 relative) of float64, plus the float32 tanh's error (as above)."""
    x = X.astype(jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    value64, slope64 = _float64_gelu_and_slope(x64)
    value = jax.jit(gelu_tanh)(x)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float32).astype(jnp.bfloat16)
    _, vjp = jax.vjp(gelu_tanh, x)
    (grad,) = vjp(cotangent)
    assert value.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    cot64 = np.asarray(cotangent, np.float64)
    grad64 = cot64 * slope64
    amplification = 0.5 + np.abs(x64) * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x64**2)
    tanh_error = 2.0**-20 * (1.0 + np.abs(x64))  # of the value: 0.5 |x| times tanh's error, plus round-off
    np.testing.assert_array_less(np.abs(np.asarray(value, np.float64) - value64),
                                 2.0**-8 * np.abs(value64) + tanh_error)
    np.testing.assert_array_less(np.abs(np.asarray(grad, np.float64) - grad64),
                                 2.0**-8 * np.abs(grad64) + 2.0**-20 * np.abs(cot64) * amplification + 1e-30)
