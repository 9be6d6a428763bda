"""The model's KV-cache path: prefill + decode steps equal one full forward pass, with and without padding,
and in bfloat16 the cache path stays close to float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.kv_cache import KVCache
from gpt2_jax.model import GPT2LMHeadModel
from test_model_parity import TINY, random_params

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, seed=11)


def test_prefill_then_decode_equals_full_forward(params):
    model = GPT2LMHeadModel(TINY)
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12)).astype(np.int32)
    full = np.asarray(model.apply({"params": params}, ids).logits)
    cache = KVCache.init(TINY, batch_size=2, max_length=20)
    out = model.apply({"params": params}, ids[:, :5], cache=cache)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, :5], **TOL)
    cache = out.cache
    for t in range(5, 12):
        out = model.apply({"params": params}, ids[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[:, t], **TOL, err_msg=f"step {t}")
        cache = out.cache
    assert int(cache.index) == 12 and cache.next_position.tolist() == [12, 12]
    assert bool(cache.valid[:, :12].all()) and not bool(cache.valid[:, 12:].any())


def test_left_padded_rows_decode_like_rows_alone(params):
    model = GPT2LMHeadModel(TINY)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, TINY.vocab_size, n).astype(np.int32) for n in (7, 3)]
    continuation = rng.integers(0, TINY.vocab_size, (2, 4)).astype(np.int32)
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    out = model.apply({"params": params}, ids, attention_mask=mask, cache=KVCache.init(TINY, 2, 16))
    cache, batched = out.cache, [np.asarray(out.logits)[:, -1]]
    for t in range(4):
        out = model.apply({"params": params}, continuation[:, t:t + 1], cache=cache)
        cache = out.cache
        batched.append(np.asarray(out.logits)[:, 0])
    assert cache.next_position.tolist() == [11, 7]
    for i, r in enumerate(rows):
        alone = np.concatenate([r, continuation[i]])[None]
        logits = np.asarray(model.apply({"params": params}, alone).logits)[0, len(r) - 1:]
        np.testing.assert_allclose(np.stack([b[i] for b in batched]), logits, **TOL, err_msg=f"row {i}")


def test_jitted_decode_with_donated_cache(params):
    model = GPT2LMHeadModel(TINY)
    step = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, cache=c, logits_to_keep=1), donate_argnums=2)
    cache = KVCache.init(TINY, 1, 8)
    tokens = jnp.array([[1]])
    for _ in range(3):
        out = step(params, tokens, cache)
        cache, tokens = out.cache, out.logits.argmax(-1).astype(jnp.int32)
    assert int(cache.index) == 3 and step._cache_size() == 1


def test_cache_limits_and_reorder(params):
    with pytest.raises(ValueError, match="max_length must be in"):
        KVCache.init(TINY, 1, TINY.n_positions + 1)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        KVCache.init(TINY, 0, 8)
    with pytest.raises(ValueError, match="slots must be positive"):
        KVCache.zeros(TINY, 1, 0)
    padded = KVCache.zeros(TINY, 2, TINY.n_positions + 16)  # generation's buckets count padding as slots
    assert padded.max_length == TINY.n_positions + 16
    assert padded.keys[0].shape == (2, TINY.n_head, TINY.n_positions + 16, TINY.head_dim)
    model = GPT2LMHeadModel(TINY)
    with pytest.raises(ValueError, match="exceeds the cache's max_length"):
        model.apply({"params": params}, np.ones((1, 9), np.int32), cache=KVCache.init(TINY, 1, 8))
    cache = model.apply({"params": params}, np.array([[1, 2], [3, 4]]), cache=KVCache.init(TINY, 2, 8)).cache
    swapped = cache.reorder(jnp.array([1, 0, 0]))
    assert swapped.batch_size == 3
    np.testing.assert_array_equal(swapped.keys[0][0], cache.keys[0][1])
    np.testing.assert_array_equal(swapped.values[1][2], cache.values[1][0])


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_compute_stays_close_to_float32(params, param_dtype):
    ids = np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 10)).astype(np.int32)
    reference = np.asarray(GPT2LMHeadModel(TINY).apply({"params": params}, ids).logits)
    cast = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
    model = GPT2LMHeadModel(TINY, dtype=jnp.bfloat16, param_dtype=param_dtype)
    out = model.apply({"params": cast}, ids, output_attentions=True)
    assert out.logits.dtype == jnp.bfloat16
    logits = np.asarray(out.logits.astype(jnp.float32))
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 0.05 * scale
    np.testing.assert_allclose(np.asarray(out.attentions[0].astype(jnp.float32)).sum(-1), 1.0, atol=2e-2)
    cache = KVCache.init(TINY, 2, 12, dtype=jnp.bfloat16)
    step = model.apply({"params": cast}, ids, cache=cache).logits
    np.testing.assert_allclose(np.asarray(step.astype(jnp.float32)), logits, rtol=0, atol=1e-6 + 0.02 * scale)
