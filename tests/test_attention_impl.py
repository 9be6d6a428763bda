"""The attention switch: ``jax.nn.dot_product_attention`` (XLA, or cuDNN on GPUs) equals the explicit path.

Both compute softmax(q k^T * scale + mask) v in float32; they differ only in the order of the reductions, so the
outputs agree to float32 round-off (logits O(10): atol/rtol 1e-5, as in the Hugging Face parity suite).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gpt2_jax import GPT2Config, GPT2LMHeadModel, KVCache, init_params
from gpt2_jax.backend import Tuning
from gpt2_jax.stacking import params_for

TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    "plain": GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2),
    "inverse_layer_idx_scan": GPT2Config(vocab_size=97, n_positions=32, n_embd=30, n_layer=3, n_head=5,
                                         scale_attn_by_inverse_layer_idx=True, initializer_range=0.2,
                                         scan_layers=True),
}


def logits(config, params, impl, ids, **kwargs):
    return np.asarray(GPT2LMHeadModel(config, tuning=Tuning(attention=impl)).apply({"params": params}, ids,
                                                                                   **kwargs).logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["xla", "cudnn"])  # cudnn off a GPU falls back to the XLA implementation
def test_fused_attention_equals_explicit(name, impl):
    config = CONFIGS[name]
    params = params_for(config, init_params(jax.random.PRNGKey(0), config.replace(scan_layers=False)))
    ids = np.random.default_rng(0).integers(0, 97, (3, 12)).astype(np.int32)
    ref = logits(config, params, "explicit", ids)
    assert np.abs(ref).max() > 1.0  # weights large enough for a sensitive comparison
    np.testing.assert_allclose(logits(config, params, impl, ids), ref, **TOL)  # causal only: no mask array
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    np.testing.assert_allclose(logits(config, params, impl, ids, attention_mask=mask),
                               logits(config, params, "explicit", ids, attention_mask=mask), **TOL)
    # Through the cache: prefill then one decode step.
    model = GPT2LMHeadModel(config, tuning=Tuning(attention=impl))
    out = model.apply({"params": params}, ids[:, :8], cache=KVCache.init(config, 3, 16))
    out = model.apply({"params": params}, ids[:, 8:9], cache=out.cache)
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), ref[:, 8], **TOL)


def test_probabilities_requested_take_the_explicit_path():
    config = CONFIGS["plain"]
    params = init_params(jax.random.PRNGKey(1), config)
    ids = np.arange(10, dtype=np.int32)[None]
    out = GPT2LMHeadModel(config, tuning=Tuning(attention="xla")).apply({"params": params}, ids, output_attentions=True)
    assert len(out.attentions) == config.n_layer and out.attentions[0].shape == (1, 4, 10, 10)
    np.testing.assert_allclose(np.asarray(out.attentions[0]).sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="Tuning.attention must be one of"):
        Tuning(attention="flash")


def test_several_queries_multiply_values_heads_first():
    """P @ V of a pass with several queries is written heads first (``[b, h, T, d]``, then the heads move), so
    XLA computes it as a row-major GEMM that reads the values in place; written straight into ``[b, T, h, d]``,
    XLA CPU computes ``(V^T P^T)`` with a transposed left operand at ~half the speed (a 6-token speculative
    verification pass over gpt2's cache: 0.41 vs 0.19 ms a layer). One query keeps the direct form (a
    matrix-vector product either way, the direct one faster at batch 8)."""
    config = CONFIGS["plain"]
    params = init_params(jax.random.PRNGKey(2), config)
    model = GPT2LMHeadModel(config, tuning=Tuning(attention="explicit"))

    def pv_dots(length):
        cache = KVCache.init(config, 2, 16)
        ids = np.ones((2, length), np.int32)
        hlo = jax.jit(lambda p, i, c: model.apply({"params": p}, i, cache=c).logits).lower(
            params, ids, cache).compile().as_text()
        return [line for line in hlo.splitlines() if " dot(" in line and "bhqk,bhkd->" in line]

    several = pv_dots(4)
    assert several and all("bhqk,bhkd->bhqd" in line for line in several)
    for line in several:  # the product's shape ends in [T, head_dim]: the GEMM is P @ V, not (V^T P^T)^T
        assert f"4,{config.head_dim}]" in line.split(" dot(")[0], line
    assert all("bhqk,bhkd->bqhd" in line for line in pv_dots(1))


HALVES_CONFIG = GPT2Config(vocab_size=97, n_positions=160, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2)


def _halves_model(config, on: bool, **kwargs):
    return GPT2LMHeadModel(config, tuning=Tuning(attention="explicit", causal_attention_halves=on), **kwargs)


@pytest.mark.parametrize("length", [64, 65, 130])
@pytest.mark.parametrize("scan", [False, True])
def test_causal_halves_equal_the_full_masked_attention(length, scan):
    """The causal attention in two query halves (the all-masked quarter skipped) gives the full masked product's
    logits and gradients: the skipped scores' probabilities are exactly 0, so only the float32 reduction order
    differs (a softmax over 32-65 instead of 64-130 keys)."""
    config = HALVES_CONFIG.replace(scan_layers=scan)
    params = params_for(config, init_params(jax.random.PRNGKey(3), HALVES_CONFIG))
    ids = np.random.default_rng(1).integers(0, 97, (2, length)).astype(np.int32)
    weights = np.random.default_rng(2).standard_normal((2, length, 97)).astype(np.float32)

    def logits_and_grads(on: bool):
        model = _halves_model(config, on)
        run = lambda p: model.apply({"params": p}, ids).logits  # [2, length, 97]
        grads = jax.jit(jax.grad(lambda p: (run(p) * weights).sum()))(params)
        return np.asarray(jax.jit(run)(params)), grads

    (logits_on, grads_on), (logits_off, grads_off) = logits_and_grads(True), logits_and_grads(False)
    assert np.abs(logits_off).max() > 1.0
    np.testing.assert_allclose(logits_on, logits_off, **TOL)
    for on, off in zip(jax.tree_util.tree_leaves(grads_on), jax.tree_util.tree_leaves(grads_off)):
        np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(off)).max()))


def _score_shapes(model, params, ids, **kwargs):
    """The shapes of the attention-score products (``q . k``, written ``[b, h, T, S]``) in the compiled forward."""
    hlo = jax.jit(lambda p: model.apply({"params": p}, ids, **kwargs).logits).lower(params).compile().as_text()
    return {line.split(" dot(")[0].split("=")[1].strip().split("{")[0] for line in hlo.splitlines()
            if " dot(" in line and "bhqd,bhkd->bhqk" in line}


def test_causal_halves_apply_only_where_nothing_needs_the_whole_pattern():
    """The halves are used for plain causal attention of 64 tokens or more; probabilities asked for, a padding
    mask, a cache, or a short sequence keep the whole ``[T, T]`` product (and the same values)."""
    config = HALVES_CONFIG
    params = init_params(jax.random.PRNGKey(4), config)
    ids = np.random.default_rng(3).integers(0, 97, (2, 64)).astype(np.int32)
    model = _halves_model(config, True)
    assert _score_shapes(model, params, ids) == {"f32[2,4,32,32]", "f32[2,4,32,64]"}
    assert _score_shapes(model, params, ids[:, :63]) == {"f32[2,4,63,63]"}
    assert _score_shapes(model, params, ids, attention_mask=np.ones_like(ids)) == {"f32[2,4,64,64]"}
    assert _score_shapes(_halves_model(config, False), params, ids) == {"f32[2,4,64,64]"}
    out = model.apply({"params": params}, ids, output_attentions=True)
    assert out.attentions[0].shape == (2, 4, 64, 64)
    full = _halves_model(config, False).apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full.logits), **TOL)
    prefill = model.apply({"params": params}, ids, cache=KVCache.init(config, 2, 80))
    np.testing.assert_allclose(np.asarray(prefill.logits), np.asarray(full.logits), **TOL)


def test_causal_halves_train_with_attention_dropout():
    """With attention dropout each half draws its own mask: a training forward runs, is finite, and is
    reproducible for one key."""
    config = HALVES_CONFIG.replace(attn_pdrop=0.5)
    params = init_params(jax.random.PRNGKey(5), config)
    ids = np.random.default_rng(4).integers(0, 97, (2, 64)).astype(np.int32)
    model = _halves_model(config, True)
    run = jax.jit(lambda key: model.apply({"params": params}, ids, deterministic=False,
                                          rngs={"dropout": key}).logits)
    first, again, other = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    assert np.isfinite(np.asarray(first)).all()
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.allclose(np.asarray(first), np.asarray(other))
