"""Hooks inside generation: identity hooks keep greedy tokens, a steering vector equals a manual loop that adds it,
returned activations equal run_with_cache on the final sequence, hook data is traced and hook code recompiles.
Every strategy (greedy, sampling, beam search, beam sampling, speculative with a draft model, prompt lookup) runs
the hooks: adding a vector at ``hook_pos_embed`` is the same model as adding it to every row of ``wpe`` (bitwise:
``wpe[pos] + v`` either way), so the hooked generation must equal the plain one with shifted weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.generation import engine
from gpt2_jax.generation.api import generate
from gpt2_jax.interp import add_vector, run_with_cache, run_with_hooks
from interp_helpers import TINY
from test_model_parity import random_params

CONFIG = TINY.replace(eos_token_id=None)  # no early stop: every row generates the full budget
NEW = 5
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
    params = random_params(CONFIG, seed=11)
    prompts = np.random.default_rng(3).integers(0, 90, (2, 4)).astype(np.int32)
    return params, prompts


def gen(params, prompts, **kw):
    return generate(params, prompts, model_config=CONFIG, max_new_tokens=NEW, **{"do_sample": False, **kw})


def test_identity_hooks_keep_greedy_tokens(setup):
    params, prompts = setup
    plain = gen(params, prompts)
    hooked = gen(params, prompts, hooks=[("blocks.1.hook_resid_post", lambda a, ctx: a),
                                         ("blocks.0.attn.hook_pattern", lambda a, ctx: a)])
    np.testing.assert_array_equal(hooked.sequences, plain.sequences)


def test_steering_equals_a_manual_loop_and_data_is_traced(setup):
    params, prompts = setup
    name = "blocks.0.hook_resid_post"
    vector = jnp.asarray(np.random.default_rng(5).standard_normal(CONFIG.n_embd) * 3, jnp.float32)
    before = engine.TRACE_COUNTS["sample"]
    steered = gen(params, prompts, hooks=[(name, add_vector(vector))])
    assert not np.array_equal(steered.sequences, gen(params, prompts).sequences)
    seq = jnp.asarray(prompts)
    for _ in range(NEW):  # the manual loop: full forward with the vector added, argmax of the last position
        logits = run_with_hooks(params, CONFIG, seq, [(name, add_vector(vector))])
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(steered.sequences, np.asarray(seq))
    traces = engine.TRACE_COUNTS["sample"]
    gen(params, prompts, hooks=[(name, add_vector(-vector))])  # new data: the same program
    assert engine.TRACE_COUNTS["sample"] == traces
    gen(params, prompts, hooks=[(name, lambda a, ctx: a * 0.5)])  # new code: a new program
    assert engine.TRACE_COUNTS["sample"] == traces + 1 and traces > before


def test_returned_activations_equal_run_with_cache_on_the_final_sequence(setup):
    params, prompts = setup
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "ln_final.hook_scale"]
    out = gen(params, prompts, return_activations=names)
    _, cache = run_with_cache(params, CONFIG, jnp.asarray(out.sequences), names=names)
    width = out.prompt_width
    for name in names:
        got = out.activations[name]
        assert got.shape[:2] == (2, NEW), (name, got.shape)
        # generated token i was picked from the logits at position width - 1 + i
        np.testing.assert_allclose(got, np.asarray(cache[name])[:, width - 1: width - 1 + NEW], **TOL, err_msg=name)
    with pytest.raises(ValueError, match="hook_pattern.*position-major"):
        gen(params, prompts, return_activations=["blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="return_activations= works with greedy decoding and sampling"):
        gen(params, prompts, num_beams=2, return_activations=["blocks.0.hook_resid_post"])


STRATEGIES = {
    "greedy": {},
    "sampling": dict(do_sample=True, top_k=20),
    "beams": dict(num_beams=3, num_return_sequences=2),
    "beam_sampling": dict(num_beams=3, do_sample=True),
    "speculative": dict(assistant=True, num_assistant_tokens=3, assistant_fallback=False),
    "prompt_lookup": dict(prompt_lookup_num_tokens=2, assistant_fallback=False),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_the_hooks(setup, strategy):
    import jax

    params, prompts = setup
    options = dict(STRATEGIES[strategy])
    if options.pop("assistant", False):  # the draft proposes unhooked; the hooked target decides
        options.update(assistant_params=random_params(CONFIG.replace(n_layer=1), seed=12),
                       assistant_config=CONFIG.replace(n_layer=1))
    if options.get("do_sample"):
        options["key"] = jax.random.PRNGKey(4)
    vector = jnp.asarray(np.random.default_rng(6).standard_normal(CONFIG.n_embd) * 2, jnp.float32)
    shifted = jax.tree_util.tree_map(lambda x: x, params)
    shifted["wpe"] = {"embedding": params["wpe"]["embedding"] + vector}
    steered = gen(params, prompts, hooks=[("hook_pos_embed", add_vector(vector))], **options)
    expected = gen(shifted, prompts, **options)
    np.testing.assert_array_equal(steered.sequences, expected.sequences)
    assert not np.array_equal(steered.sequences, gen(params, prompts, **options).sequences)  # the hook acted
    identity = gen(params, prompts, hooks=[("blocks.1.hook_resid_post", lambda a, ctx: a)], **options)
    np.testing.assert_array_equal(identity.sequences, gen(params, prompts, **options).sequences)


def test_beam_search_hook_data_is_traced(setup):
    params, prompts = setup
    name = "blocks.0.hook_resid_post"
    vector = jnp.asarray(np.random.default_rng(7).standard_normal(CONFIG.n_embd), jnp.float32)
    gen(params, prompts, num_beams=2, hooks=[(name, add_vector(vector))])
    traces = engine.TRACE_COUNTS["beam_search"]
    gen(params, prompts, num_beams=2, hooks=[(name, add_vector(2 * vector))])  # new data: the same program
    assert engine.TRACE_COUNTS["beam_search"] == traces
