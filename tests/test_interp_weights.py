"""Weight processing preserves what it claims: logits (fold_layer_norm, center_writing_weights, fold_value_biases)
or log-probs (center_unembed), to float32 round-off; and it does what it says to the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import GPT2LMHeadModel
from gpt2_jax.interp import run_with_cache
from gpt2_jax.interp.weights import (center_unembed, center_writing_weights, fold_layer_norm, fold_value_biases,
                                     process_weights)
from interp_helpers import TINY
from test_model_parity import random_params

# Logits O(10) from O(1) activations through sums of 32-128 terms, reassociated by the folding: a few hundred u
# relative; 1e-4 absolute is ~20x that, and a wrong fold moves logits by O(1).
TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def setup():
    params = random_params(TINY, seed=9)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return params, ids, mask


def logits(params, ids, mask):
    return GPT2LMHeadModel(TINY).apply({"params": params}, ids, attention_mask=mask).logits


@pytest.mark.parametrize("process", [fold_layer_norm, center_writing_weights, fold_value_biases])
def test_logits_are_preserved(setup, process):
    params, ids, mask = setup
    processed = process(params, TINY)
    np.testing.assert_allclose(logits(processed, ids, mask), logits(params, ids, mask), **TOL)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), params, processed)
    assert any(jax.tree_util.tree_leaves(changed))


def test_center_unembed_preserves_log_probs_and_the_residual_stream(setup):
    params, ids, mask = setup
    processed = center_unembed(params, TINY)
    lp = lambda p: jax.nn.log_softmax(logits(p, ids, mask))
    np.testing.assert_allclose(lp(processed), lp(params), **TOL)
    np.testing.assert_allclose(processed["wte"]["embedding"].mean(0), 0.0, atol=1e-6)


def test_processed_weights_and_their_hooks(setup):
    params, ids, mask = setup
    processed = process_weights(params, TINY)
    lp = lambda p: jax.nn.log_softmax(logits(p, ids, mask))
    np.testing.assert_allclose(lp(processed), lp(params), **TOL)
    block = processed["h"]["1"]
    np.testing.assert_allclose(block["ln_1"]["scale"], 1.0)
    np.testing.assert_allclose(block["attn"]["c_attn"]["kernel"].mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(block["mlp"]["c_proj"]["kernel"].mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(block["attn"]["c_attn"]["bias"][2 * TINY.n_embd:], 0.0)
    # the writers are centred: every block's attention and MLP output has zero mean over d_model
    _, cache = run_with_cache(processed, TINY, ids, attention_mask=mask,
                              names=lambda n: n.endswith(("hook_attn_out", "hook_mlp_out")))
    for name, value in cache.items():
        np.testing.assert_allclose(value.mean(-1), 0.0, atol=1e-5, err_msg=name)
