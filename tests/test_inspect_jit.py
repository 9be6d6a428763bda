"""The research helpers' array parts run inside ``jax.jit`` (traced ids or params) and give what they give
eagerly; the string and plot parts take the concrete results."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import GPT2Config
from gpt2_jax.inspect import (AttentionMaps, LogitLens, attention_maps, format_logit_lens, logit_lens,
                              next_token_probs, next_token_table, next_token_top)
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import GPT2Tokenizer

CONFIG = GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5)
IDS = np.array([464, 4583, 286, 44449, 318], np.int32)


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.PRNGKey(0), CONFIG)


def test_logit_lens_under_jit(params):
    eager = logit_lens(params, CONFIG, IDS, top=3)
    jitted = jax.jit(functools.partial(logit_lens, config=CONFIG, top=3))(params, ids=jnp.asarray(IDS))
    assert isinstance(jitted, LogitLens) and jitted.layer_names == eager.layer_names
    np.testing.assert_array_equal(np.asarray(jitted.top_ids), eager.top_ids)
    np.testing.assert_allclose(np.asarray(jitted.top_probs), eager.top_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jitted.target_probs), eager.target_probs, rtol=1e-5, atol=1e-7)
    concrete = jax.tree_util.tree_map(np.asarray, jitted)  # the string part takes the concrete result
    assert format_logit_lens(concrete, GPT2Tokenizer()) == format_logit_lens(eager, GPT2Tokenizer())
    # a batch of sequences through vmap: one lens per row
    batch = jnp.stack([jnp.asarray(IDS), jnp.asarray(IDS[::-1])])
    lenses = jax.jit(jax.vmap(lambda ids: logit_lens(params, CONFIG, ids, top=3)))(batch)
    np.testing.assert_array_equal(np.asarray(lenses.top_ids[0]), eager.top_ids)


def test_attention_maps_under_jit(params):
    eager = attention_maps(params, CONFIG, IDS)
    jitted = jax.jit(lambda p, ids: attention_maps(p, CONFIG, ids))(params, jnp.asarray(IDS)[None, :])
    assert isinstance(jitted, AttentionMaps) and jitted.attentions.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(jitted.attentions), eager.attentions, rtol=1e-5, atol=1e-7)


def test_next_token_top_under_jit(params):
    probs = next_token_probs(params, CONFIG, IDS)
    top_ids, top_probs = jax.jit(lambda ids: next_token_top(params, CONFIG, ids, top=4))(jnp.asarray(IDS))
    expected = np.argsort(-probs, kind="stable")[:4]
    np.testing.assert_array_equal(np.asarray(top_ids), expected)
    np.testing.assert_allclose(np.asarray(top_probs), probs[expected], rtol=1e-5, atol=1e-8)
    rows = next_token_table(params, CONFIG, GPT2Tokenizer(), "The theory of relativity is", top=4)
    assert [r.id for r in rows] == expected.tolist()  # the string part, built on the same arrays


def test_traced_ids_are_checked_by_shape():
    with pytest.raises(ValueError, match="n_positions=32"):
        jax.jit(lambda ids: attention_maps(None, CONFIG, ids))(jnp.zeros((40,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        jax.jit(lambda ids: logit_lens(None, CONFIG, ids))(jnp.zeros((4,), jnp.float32))
