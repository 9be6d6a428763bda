"""gpt2_jax.narrow_dots: bfloat16 matmuls with float32 accumulation whose backward dots XLA CPU runs natively."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import backend, narrow_dots
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import GPT2LMHeadModel, init_params

# (rows, K, N): even sizes (the permuted path), odd ones (left to XLA's float32 conversion), one row (decode)
SHAPES = [(16, 64, 96), (7, 33, 5), (1, 64, 96), (12, 40, 250)]


def _bf16(key, shape):
    return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_matmul_and_its_gradients_match_float64(rows, k, n, w_transposed):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(rows * 1000 + k), 3)
    x, w = _bf16(kx, (2, rows, k)), _bf16(kw, (k, n))
    stored = w.T if w_transposed else w
    cot = jax.random.normal(kc, (2, rows, n), jnp.float32)
    y, vjp = jax.vjp(lambda a, b: narrow_dots.matmul(a, b, w_transposed=w_transposed), x, stored)
    grad_x, grad_stored = vjp(cot)
    assert y.dtype == jnp.float32 and y.shape == (2, rows, n)
    assert grad_x.dtype == jnp.bfloat16 and grad_stored.dtype == jnp.bfloat16 and grad_stored.shape == stored.shape

    x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, cot))
    # Forward: bf16 x bf16 products are exact in float32; only the K-term float32 accumulation rounds.
    bound = np.abs(x64) @ np.abs(w64)
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - x64 @ w64), k * 2.0**-23 * bound + 1e-30)
    # Gradients: the cotangent is rounded to bfloat16 (2^-8 relative per term) and the result is rounded to
    # bfloat16 (2^-8 of a value no larger than the sum of absolute terms): 2^-7 of that sum covers both.
    ref_x, ref_w = c64 @ w64.T, np.einsum("brk,brn->kn", x64, c64)
    bound_x, bound_w = np.abs(c64) @ np.abs(w64).T, np.einsum("brk,brn->kn", np.abs(x64), np.abs(c64))
    got_w = np.asarray(grad_stored, np.float64)
    got_w = got_w.T if w_transposed else got_w
    np.testing.assert_array_less(np.abs(np.asarray(grad_x, np.float64) - ref_x), 2.0**-7 * bound_x + 1e-30)
    np.testing.assert_array_less(np.abs(got_w - ref_w), 2.0**-7 * bound_w + 1e-30)


def test_matmul_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        narrow_dots.matmul(jnp.ones((2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.float32))


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot in optimised HLO text (instruction names are unique in the module)."""
    dtype_of = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    found = []
    for operands in re.findall(r"= \w+\[[^\]]*\][^ ]* dot\(([^)]*)\)", hlo):
        names = re.findall(r"%([\w.\-]+)", operands)
        found.append(tuple(dtype_of[name] for name in names))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the row-major form is what XLA CPU needs")
@pytest.mark.parametrize("w_transposed", [False, True])
def test_every_dot_of_the_gradient_reads_bfloat16_on_cpu(w_transposed):
    """The point of the module: XLA CPU keeps all three products (forward, input and weight gradient) in bfloat16
    instead of converting them to float32, which it does for the plain formulation's backward pass."""
    x, w = jnp.ones((64, 128), jnp.bfloat16), jnp.ones((96, 128) if w_transposed else (128, 96), jnp.bfloat16)

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b) ** 2)

    ours = loss(lambda a, b: narrow_dots.matmul(a, b, w_transposed=w_transposed))
    plain = loss(lambda a, b: jnp.dot(a, b.T if w_transposed else b, preferred_element_type=jnp.float32))
    compiled = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
    ours_dots, plain_dots = _dot_operand_dtypes(compiled(ours)), _dot_operand_dtypes(compiled(plain))
    assert len(ours_dots) == 3 and all(dtypes == ("bf16", "bf16") for dtypes in ours_dots), ours_dots
    assert any("f32" in dtypes for dtypes in plain_dots), plain_dots  # what the module works around


TINY = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)


def test_bfloat16_model_loss_and_gradients_match_the_plain_dots():
    """Same math, different float32 accumulation order: the tuning moves results by bfloat16 round-off only."""
    params = init_params(jax.random.PRNGKey(0), TINY)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, TINY.vocab_size)

    def loss_and_grads(row_major: bool):
        tuning = backend.tuning_for(params).replace(row_major_bf16_dots=row_major, low_precision_compute=True)
        model = GPT2LMHeadModel(TINY, dtype=jnp.bfloat16, tuning=tuning)

        def loss(p):
            logits = model.apply({"params": p}, ids).logits.astype(jnp.float32)  # [2, 16, vocab]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_on, grads_on), (loss_off, grads_off) = loss_and_grads(True), loss_and_grads(False)
    # a few bfloat16 ulps (2^-8 relative each) of a loss near log(96)
    np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=2.0**-6, atol=0)
    flat_on, flat_off = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(t)]) for t in (grads_on,
                                                                                                      grads_off))
    assert np.linalg.norm(flat_on - flat_off) <= 2.0**-5 * np.linalg.norm(flat_off)
    assert jax.tree_util.tree_structure(grads_on) == jax.tree_util.tree_structure(grads_off)
