"""gpt2_jax.head_loss: the tied LM head and its cross-entropy as one function with its own gradient."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import backend, narrow_dots
from gpt2_jax.config import GPT2Config
from gpt2_jax.head_loss import tied_head_cross_entropy
from gpt2_jax.losses import IGNORE_INDEX, cross_entropy
from gpt2_jax.model import init_params

N, D, V = 24, 32, 250  # tokens, width, vocabulary (even sizes: the row-major path)


def _inputs(seed: int = 0, ignored: int = 3):
    kh, kw, kl = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(kh, (2, N // 2, D), jnp.float32).astype(jnp.bfloat16)
    wte = jax.random.normal(kw, (V, D), jnp.float32) * 0.5
    labels = jax.random.randint(kl, (2, N // 2), 0, V).at[0, :ignored].set(IGNORE_INDEX)
    return hidden, wte, labels


def test_loss_is_the_cross_entropy_of_the_float32_product():
    hidden, wte, labels = _inputs()
    loss = jax.jit(tied_head_cross_entropy)(hidden, wte, labels)
    separate = jax.jit(lambda h, w, y: cross_entropy(
        narrow_dots.matmul(h, w.astype(jnp.bfloat16), w_transposed=True), y))(hidden, wte, labels)
    assert loss.dtype == jnp.float32
    # the same float32 logits; the two reductions may sum in another order (float32 round-off)
    np.testing.assert_allclose(float(loss), float(separate), rtol=1e-6, atol=0)


def test_gradients_match_float64():
    """d hidden and d wte against float64 from the same bfloat16 operands. The logits' gradient is rounded to
    bfloat16 once (2^-8 relative per term); d hidden is rounded to bfloat16 again, d wte is float32 (not
    rounded): 2^-7 and 1.1 x 2^-8 of each sum of absolute terms."""
    hidden, wte, labels = _inputs()
    grad_hidden, grad_wte = jax.jit(jax.grad(tied_head_cross_entropy, argnums=(0, 1)))(hidden, wte, labels)
    assert grad_hidden.dtype == jnp.bfloat16 and grad_wte.dtype == jnp.float32 and grad_wte.shape == wte.shape

    x = np.asarray(hidden, np.float64).reshape(N, D)
    w = np.asarray(wte.astype(jnp.bfloat16), np.float64)  # the product reads the weights in bfloat16
    y = np.asarray(labels).reshape(N)
    keep = y != IGNORE_INDEX
    logits = x @ w.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    d_logits = probs
    d_logits[np.arange(N)[keep], y[keep]] -= 1.0
    d_logits *= keep[:, None] / keep.sum()
    ref_x, ref_w = d_logits @ w, d_logits.T @ x
    bound_x, bound_w = np.abs(d_logits) @ np.abs(w), np.abs(d_logits).T @ np.abs(x)
    got_x = np.asarray(grad_hidden, np.float64).reshape(N, D)
    np.testing.assert_array_less(np.abs(got_x - ref_x), 2.0**-7 * bound_x + 1e-30)
    np.testing.assert_array_less(np.abs(np.asarray(grad_wte, np.float64) - ref_w), 1.1 * 2.0**-8 * bound_w + 1e-30)


def test_every_label_ignored_gives_zero_loss_and_gradients():
    hidden, wte, labels = _inputs()
    labels = jnp.full_like(labels, IGNORE_INDEX)
    loss, (grad_hidden, grad_wte) = jax.value_and_grad(tied_head_cross_entropy, argnums=(0, 1))(hidden, wte, labels)
    assert float(loss) == 0.0
    assert not np.any(np.asarray(grad_hidden, np.float32)) and not np.any(np.asarray(grad_wte))


def test_bad_shapes_are_named():
    hidden, wte, labels = _inputs()
    with pytest.raises(ValueError, match="labels has shape"):
        tied_head_cross_entropy(hidden, wte, labels[:, 1:])
    with pytest.raises(ValueError, match="wte must be"):
        tied_head_cross_entropy(hidden, wte[:, 1:], labels)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's mixed-precision train step")
def test_bfloat16_train_step_writes_no_transposed_logits_gradient():
    """The train step's gradient under narrow_dots uses the fused head: no bfloat16 ``[vocab, tokens]`` array, the
    transposed copy of the logits' gradient that a separate head and loss need (shown on the separate pair)."""
    from gpt2_jax.training.step import make_loss_fn

    config = GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2, vocab_size=250)
    params = init_params(jax.random.PRNGKey(0), config)
    tokens = jnp.zeros((2, 21), jnp.int32)  # 2 x 20 = 40 tokens
    tuning = backend.tuning_for(params).replace(row_major_bf16_dots=True, low_precision_compute=True)
    step_loss = make_loss_fn(config, jnp.bfloat16, dropout=False, tuning=tuning)
    step_hlo = jax.jit(jax.grad(step_loss)).lower(params, tokens, None).compile().as_text()

    hidden = jnp.ones((2, 20, 32), jnp.bfloat16)
    separate = lambda w: cross_entropy(narrow_dots.matmul(hidden, w.astype(jnp.bfloat16), w_transposed=True),
                                       tokens[:, 1:])
    separate_hlo = jax.jit(jax.grad(separate)).lower(params["wte"]["embedding"]).compile().as_text()
    transposed_grad = re.compile(r"= bf16\[250,40\]")  # [vocab, tokens]
    assert transposed_grad.search(separate_hlo) and not transposed_grad.search(step_hlo)
