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


def _assert_grads_within_bfloat16_roundoff(grads, reference) -> None:
    """The two gradient trees, flattened, differ by at most 2^-5 of the reference's norm: a few bfloat16 ulps
    (2^-8 relative each) accumulated through the backward pass, far below any real difference."""
    flat, flat_ref = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(t)]) for t in (grads, reference))
    assert np.linalg.norm(flat - flat_ref) <= 2.0**-5 * np.linalg.norm(flat_ref)


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
    _assert_grads_within_bfloat16_roundoff(grads_on, grads_off)
    assert jax.tree_util.tree_structure(grads_on) == jax.tree_util.tree_structure(grads_off)


# (batch axes, M, K, N): even sizes (copied row-major), odd ones (left to XLA's float32 conversion), one row
BATCHED_SHAPES = [((2, 3), 16, 8, 12), ((2,), 7, 5, 9), ((2, 2), 1, 8, 6)]


@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("lead,m,k,n", BATCHED_SHAPES)
def test_batched_matmul_and_its_gradients_match_float64(lead, m, k, n, b_transposed):
    ka, kb, kc = jax.random.split(jax.random.PRNGKey(m * 100 + k), 3)
    a, b = _bf16(ka, lead + (m, k)), _bf16(kb, lead + ((n, k) if b_transposed else (k, n)))
    cot = jax.random.normal(kc, lead + (m, n), jnp.float32)
    y, vjp = jax.vjp(lambda p, q: narrow_dots.batched_matmul(p, q, b_transposed=b_transposed), a, b)
    grad_a, grad_b = vjp(cot)
    assert y.dtype == jnp.float32 and y.shape == lead + (m, n)
    assert grad_a.dtype == grad_b.dtype == jnp.bfloat16 and grad_b.shape == b.shape

    a64, c64 = np.asarray(a, np.float64), np.asarray(cot, np.float64)
    b64 = np.asarray(b, np.float64)
    b64 = np.swapaxes(b64, -1, -2) if b_transposed else b64  # [..., K, N]
    # the bounds of the two-dimensional test above, per batch index
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - a64 @ b64),
                                 k * 2.0**-23 * (np.abs(a64) @ np.abs(b64)) + 1e-30)
    ref_a, bound_a = c64 @ np.swapaxes(b64, -1, -2), np.abs(c64) @ np.abs(np.swapaxes(b64, -1, -2))
    ref_b, bound_b = np.swapaxes(a64, -1, -2) @ c64, np.abs(np.swapaxes(a64, -1, -2)) @ np.abs(c64)
    got_b = np.asarray(grad_b, np.float64)
    got_b = np.swapaxes(got_b, -1, -2) if b_transposed else got_b
    np.testing.assert_array_less(np.abs(np.asarray(grad_a, np.float64) - ref_a), 2.0**-7 * bound_a + 1e-30)
    np.testing.assert_array_less(np.abs(got_b - ref_b), 2.0**-7 * bound_b + 1e-30)


def test_batched_matmul_rejects_other_leading_axes():
    with pytest.raises(ValueError, match="same leading axes"):
        narrow_dots.batched_matmul(jnp.ones((2, 4, 8), jnp.bfloat16), jnp.ones((3, 8, 5), jnp.bfloat16))


@pytest.mark.parametrize("shape,perm", [((2, 6, 3, 4), (0, 2, 1, 3)), ((4, 6), (1, 0)), ((3, 5, 7), (2, 0, 1)),
                                        ((2, 3), (0, 1))])
def test_transpose_is_exactly_the_transpose(shape, perm):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    got = jax.jit(lambda a: narrow_dots.transpose(a, perm))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x).transpose(perm))
    # and its gradient is the inverse transpose
    cot = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(got.shape) + 0.5
    grad = jax.vjp(lambda a: narrow_dots.transpose(a, perm), x)[1](cot)[0]
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(cot).transpose(np.argsort(perm)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the row-major form is what XLA CPU needs")
def test_attention_shaped_products_read_bfloat16_on_cpu():
    """Heads moved by a transpose (a view XLA folds into the dot, which its bfloat16 kernel then refuses) and then
    multiplied as attention does: with narrow_dots.transpose and batched_matmul all six products stay bfloat16."""
    q, k, v = (jnp.ones((2, 32, 4, 16), jnp.bfloat16) for _ in range(3))  # [batch, T, n_head, head_dim]

    def attention(q, k, v):
        heads = lambda t: narrow_dots.transpose(t, (0, 2, 1, 3))  # -> [batch, n_head, T, head_dim]
        scores = narrow_dots.batched_matmul(heads(q), heads(k), b_transposed=True)  # [batch, n_head, T, T]
        probs = jax.nn.softmax(scores, axis=-1).astype(jnp.bfloat16)
        out = narrow_dots.batched_matmul(probs, heads(v)).astype(jnp.bfloat16)  # [batch, n_head, T, head_dim]
        return jnp.sum(narrow_dots.transpose(out, (0, 2, 1, 3)).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.value_and_grad(attention, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    dots = _dot_operand_dtypes(hlo)
    assert len(dots) == 6 and all(dtypes == ("bf16", "bf16") for dtypes in dots), dots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's lowering of a bfloat16 reduction")
def test_bfloat16_model_gradient_reads_bfloat16_everywhere_on_cpu():
    """The whole tiny model's training gradient under the tuning: every product (the layers', attention's, the LM
    head's) reads bfloat16 operands."""
    params = init_params(jax.random.PRNGKey(0), TINY)
    ids = jnp.zeros((2, 16), jnp.int32)
    tuning = backend.tuning_for(params).replace(row_major_bf16_dots=True, low_precision_compute=True)
    model = GPT2LMHeadModel(TINY, dtype=jnp.bfloat16, tuning=tuning)
    loss = lambda p: jnp.mean(model.apply({"params": p}, ids).logits.astype(jnp.float32) ** 2)
    hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    dots = _dot_operand_dtypes(hlo)
    assert dots and all(dtypes == ("bf16", "bf16") for dtypes in dots), dots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's lowering of a bfloat16 reduction")
def test_bias_gradient_of_a_bfloat16_layer_is_a_float32_reduction():
    """The bias is added to the float32 product, so its gradient (a sum over all rows) is a float32 reduction:
    XLA CPU lowers a bfloat16 one as a reduce-window loop, ~30x slower."""
    from gpt2_jax.layers import Dense

    tuning = backend.tuning_for().replace(row_major_bf16_dots=True, low_precision_compute=True)
    layer = Dense(features=96, std=0.02, dtype=jnp.bfloat16, tuning=tuning)
    x = jnp.ones((4, 256, 64), jnp.bfloat16)  # enough rows for XLA to split a bfloat16 sum into a reduce-window
    params = layer.init(jax.random.PRNGKey(0), x)
    weights = jax.random.normal(jax.random.PRNGKey(1), (4 * 256 * 96,), jnp.float32)
    loss = lambda p, a, w: jnp.vdot(layer.apply(p, a).astype(jnp.float32).ravel(), w)  # a dot: no reduction
    hlo = jax.jit(jax.grad(loss)).lower(params, x, weights).compile().as_text()  # arguments: nothing folds
    assert "reduce-window(" not in hlo
    # and the test can see one: the same sum in bfloat16 is lowered that way
    plain = jax.jit(lambda g: jax.lax.reduce_sum(g, (0, 1))).lower(jnp.ones((4, 256, 96), jnp.bfloat16))
    assert "reduce-window(" in plain.compile().as_text()


@pytest.mark.parametrize("row_major", [True, False])
def test_float32_logits_are_the_product_before_its_bfloat16_rounding(row_major):
    """``float32_logits``: a bfloat16 model's LM head returns float32 logits. Under the tuning they are the very
    float32 product whose bfloat16 rounding the default returns (exactly); with plain dots, the same logits to
    bfloat16 round-off. The rest of the model (and its params) is unchanged."""
    params = init_params(jax.random.PRNGKey(0), TINY)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, TINY.vocab_size)
    tuning = backend.tuning_for(params).replace(row_major_bf16_dots=row_major, low_precision_compute=True)
    logits = {wide: jax.jit(GPT2LMHeadModel(TINY, dtype=jnp.bfloat16, tuning=tuning, float32_logits=wide).apply)(
        {"params": params}, ids).logits for wide in (False, True)}
    assert logits[False].dtype == jnp.bfloat16 and logits[True].dtype == jnp.float32
    if row_major:
        np.testing.assert_array_equal(np.asarray(logits[True].astype(jnp.bfloat16)), np.asarray(logits[False]))
    else:  # one bfloat16 rounding apart (2^-8 relative), where XLA may also reorder the accumulation
        np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False], np.float32), rtol=2.0**-7,
                                   atol=2.0**-7 * float(jnp.max(jnp.abs(logits[True]))))


def test_bfloat16_train_loss_reads_the_float32_logits():
    """The train step's loss under the tuning is the cross-entropy of the LM head's float32 logits (not of their
    bfloat16 rounding), and its gradient matches the plain-dot step's to bfloat16 round-off."""
    from gpt2_jax.losses import cross_entropy
    from gpt2_jax.training.step import make_loss_fn

    params = init_params(jax.random.PRNGKey(0), TINY)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 17), 0, TINY.vocab_size)
    tuning = backend.tuning_for(params).replace(row_major_bf16_dots=True, low_precision_compute=True)
    loss_fn = make_loss_fn(TINY, jnp.bfloat16, dropout=False, tuning=tuning)
    model = GPT2LMHeadModel(TINY, dtype=jnp.bfloat16, tuning=tuning, float32_logits=True)
    wide = jax.jit(lambda p, t: cross_entropy(model.apply({"params": p}, t[:, :-1]).logits, t[:, 1:]))
    rounded = jax.jit(lambda p, t: cross_entropy(model.apply({"params": p}, t[:, :-1]).logits.astype(jnp.bfloat16),
                                                 t[:, 1:]))
    loss, wide_loss, rounded_loss = (float(x) for x in (jax.jit(loss_fn)(params, tokens, None),
                                                        wide(params, tokens), rounded(params, tokens)))
    # the same program up to fusion order (float32 round-off, ~1e-7 relative); the rounded logits' loss moves by
    # their bfloat16 round-off averaged over the tokens (here ~1e-5 relative)
    np.testing.assert_allclose(loss, wide_loss, rtol=1e-6, atol=0)
    assert abs(loss - wide_loss) < 0.1 * abs(rounded_loss - wide_loss)
    plain = make_loss_fn(TINY, jnp.bfloat16, dropout=False, tuning=tuning.replace(row_major_bf16_dots=False))
    grads, plain_grads = (jax.jit(jax.grad(f))(params, tokens, None) for f in (loss_fn, plain))
    _assert_grads_within_bfloat16_roundoff(grads, plain_grads)
