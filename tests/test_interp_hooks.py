"""run_with_hooks / run_with_cache: interventions equal the hand-written computation, one program per hook code
(data traced), jit / vmap / grad, activation gradients, cache helpers, patching, and errors on bad input."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import GPT2LMHeadModel
from gpt2_jax.interp import (activation_patching, add_vector, attribution_patching, hook_names, mean_ablate_neuron,
                             patch_from, run_with_cache, run_with_hooks, zero_ablate_head, zero_ablate_neuron)
from gpt2_jax.interp import run as run_module
from gpt2_jax.stacking import with_scan_layers
from interp_helpers import TINY
from test_model_parity import random_params

# O(1) activations through two blocks of width 32: float32 round-off ~1e-6 (two programs computing the same sums
# in different orders), a wrong intervention O(0.1).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, seed=5)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 6)), jnp.int32)


def plain_logits(params, ids, **kw):
    return GPT2LMHeadModel(TINY).apply({"params": params}, ids, **kw).logits


def test_no_hooks_and_identity_hooks_equal_the_plain_model(params, ids):
    ref = plain_logits(params, ids)
    np.testing.assert_allclose(run_with_hooks(params, TINY, ids), ref, **TOL)
    identity = [(n, lambda a, ctx: a) for n in hook_names(TINY)]
    np.testing.assert_allclose(run_with_hooks(params, TINY, ids, identity), ref, **TOL)
    logits, cache = run_with_cache(params, TINY, ids)
    np.testing.assert_allclose(logits, ref, **TOL)
    assert "blocks.0.attn.hook_result" not in cache and "blocks.1.hook_resid_post" in cache


def test_head_ablation_equals_the_head_mask(params, ids):
    # zeroing head 2 of layer 1's z is what a head mask of 0 does to the attention probabilities
    head_mask = jnp.ones((TINY.n_layer, TINY.n_head)).at[1, 2].set(0.0)
    ref = plain_logits(params, ids, head_mask=head_mask)
    ours = run_with_hooks(params, TINY, ids, [("blocks.1.attn.hook_z", zero_ablate_head(2))])
    np.testing.assert_allclose(ours, ref, **TOL)
    assert np.abs(np.asarray(ours - plain_logits(params, ids))).max() > 1e-3  # the ablation did something
    pattern = run_with_hooks(params, TINY, ids, [("blocks.1.attn.hook_pattern", zero_ablate_head(2))])
    np.testing.assert_allclose(pattern, ref, **TOL)


def test_neuron_ablation_equals_hand_written(params, ids):
    _, cache = run_with_cache(params, TINY, ids, names=["blocks.0.mlp.hook_post", "blocks.0.hook_resid_mid"])
    post = cache["blocks.0.mlp.hook_post"]
    w = params["h"]["0"]["mlp"]["c_proj"]
    for hook, fill in ((zero_ablate_neuron(5), 0.0), (mean_ablate_neuron(5), post[..., 5].mean())):
        edited = post.at[..., 5].set(fill)
        resid_post = cache["blocks.0.hook_resid_mid"] + edited @ w["kernel"] + w["bias"]
        # the rest of the model from the hand-edited residual stream
        ref = run_with_hooks(params, TINY, ids, [("blocks.0.hook_resid_post", patch_from(resid_post))])
        np.testing.assert_allclose(run_with_hooks(params, TINY, ids, [("blocks.0.mlp.hook_post", hook)]), ref, **TOL)


def test_hook_code_is_part_of_the_program_and_data_is_traced(params, ids):
    name = "blocks.0.hook_resid_post"
    before = run_module.TRACE_COUNTS["run"]
    double = run_with_hooks(params, TINY, ids, [(name, lambda a, ctx: a * 2)])
    negate = run_with_hooks(params, TINY, ids, [(name, lambda a, ctx: -a)])  # same shapes, other code
    assert run_module.TRACE_COUNTS["run"] == before + 2
    assert not np.allclose(double, negate)
    vectors = [jnp.full((TINY.n_embd,), v) for v in (0.5, -1.0, 2.0)]
    outs = [run_with_hooks(params, TINY, ids, [(name, add_vector(v))]) for v in vectors]
    assert run_module.TRACE_COUNTS["run"] == before + 3  # one program for every vector
    for v, out in zip(vectors, outs):
        ref = run_with_hooks(params, TINY, ids, [(name, lambda a, ctx, v=v: a + v)])
        np.testing.assert_allclose(out, ref, **TOL)
    partial = jax.tree_util.Partial(lambda s, a, ctx: a * s, jnp.float32(3.0))  # data first
    run_with_hooks(params, TINY, ids, [(name, partial)])
    count = run_module.TRACE_COUNTS["run"]
    run_with_hooks(params, TINY, ids, [(name, jax.tree_util.Partial(partial.func, jnp.float32(-1.0)))])
    assert run_module.TRACE_COUNTS["run"] == count


def test_jit_vmap_and_grad(params, ids):
    name = "blocks.1.hook_resid_pre"
    direction = jnp.asarray(np.random.default_rng(2).standard_normal(TINY.n_embd), jnp.float32)

    def steered(scale):
        return run_with_hooks(params, TINY, ids, [(name, add_vector(direction, scale))])[:, -1, 7].sum()

    scales = jnp.asarray([0.0, 0.5, 1.0])
    batched = jax.jit(jax.vmap(steered))(scales)
    np.testing.assert_allclose(batched, [steered(s) for s in scales], **TOL)
    # d/dscale through the hook equals the directional derivative from the activation gradient
    _, cache = run_with_cache(params, TINY, ids, names=[name], loss_fn=lambda lg: lg[:, -1, 7].sum())
    np.testing.assert_allclose(jax.grad(steered)(0.0), (cache.grads[name] @ direction).sum(), rtol=1e-4, atol=1e-5)


def test_activation_gradients_equal_grad_of_an_injected_zero(params, ids):
    names = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post", "ln_final.hook_scale"]
    loss = lambda logits: jax.nn.log_softmax(logits)[..., 3].sum()
    logits, cache = run_with_cache(params, TINY, ids, names=names, loss_fn=loss)
    np.testing.assert_allclose(logits, plain_logits(params, ids), **TOL)
    for name in names:
        zero = jnp.zeros_like(cache[name])
        grad = jax.grad(lambda d: loss(run_with_hooks(params, TINY, ids, [(name, add_vector(d))])))(zero)
        np.testing.assert_allclose(cache.grads[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_cache_selection_and_helpers(params, ids):
    logits, cache = run_with_cache(params, TINY, ids, names=re.compile(r"hook_(resid|embed|pos|attn_out|mlp_out|z)|"
                                                                       r"ln_final"))
    assert "blocks.0.attn.hook_q" not in cache
    with pytest.raises(KeyError, match="closest cached"):
        cache["blocks.0.attn.hook_q"]
    _, only = run_with_cache(params, TINY, ids, names=lambda n: n.endswith("hook_scale"))
    assert set(only) == {"blocks.0.ln1.hook_scale", "blocks.0.ln2.hook_scale", "blocks.1.ln1.hook_scale",
                         "blocks.1.ln2.hook_scale", "ln_final.hook_scale"}
    final = cache["blocks.1.hook_resid_post"]
    np.testing.assert_allclose(cache.decompose_resid().sum(0), final, **TOL)
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"] and stack.shape == (5, *final.shape)
    heads = cache.stack_head_results(layer=1)  # [n_head, batch, pos, d_model]
    attn_bias = params["h"]["0"]["attn"]["c_proj"]["bias"]
    np.testing.assert_allclose(heads.sum(0) + attn_bias, cache["blocks.0.hook_attn_out"], **TOL)
    # direct logit attribution: the parts through ln_final sum to the logit, less ln_final's bias term
    tokens = jnp.asarray([3, 8])
    parts = cache.decompose_resid(apply_ln=True)[:, :, -1]  # [component, batch, d_model]
    attrs = cache.logit_attrs(parts, tokens)  # [component, batch]
    bias_term = params["wte"]["embedding"][tokens] @ params["ln_f"]["bias"]
    np.testing.assert_allclose(attrs.sum(0) + bias_term, logits[jnp.arange(2), -1, tokens], **TOL)


def test_activation_patching_equals_the_loop(params):
    rng = np.random.default_rng(4)
    clean = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 5)), jnp.int32)
    corrupted = clean.at[0, 1].set((clean[0, 1] + 7) % TINY.vocab_size)
    metric = lambda logits: logits[0, -1, 11] - logits[0, -1, 12]
    for name, over in (("hook_resid_pre", "layer_pos"), ("attn.hook_z", "layer_head"),
                       ("attn.hook_z", "layer_pos_head"), ("hook_mlp_out", "layer")):
        result = activation_patching(params, TINY, clean, corrupted, metric, name=name, over=over)
        _, cache = run_with_cache(params, TINY, clean, names=lambda n: n.endswith(name))
        expected = np.zeros(result.shape)
        for index in np.ndindex(*result.shape):
            layer, *where = index
            source = cache[f"blocks.{layer}.{name}"]
            mask = np.zeros(source.shape[1:], bool)
            sel = [slice(None)] * mask.ndim
            axes = {"layer": (), "layer_pos": (0,), "layer_head": (1,), "layer_pos_head": (0, 1)}[over]
            for axis, i in zip(axes, where):
                sel[axis] = i
            mask[tuple(sel)] = True
            logits = run_with_hooks(params, TINY, corrupted, [(f"blocks.{layer}.{name}", patch_from(source, mask))])
            expected[index] = metric(logits)
        np.testing.assert_allclose(result, expected, **TOL, err_msg=f"{name} over {over}")
    chunked = activation_patching(params, TINY, clean, corrupted, metric, batch_size=3)
    np.testing.assert_allclose(chunked, activation_patching(params, TINY, clean, corrupted, metric), **TOL)
    # logits of the final position only: the same values (the metric sees [batch, 1, vocab])
    last = activation_patching(params, TINY, clean, corrupted, metric, logits_to_keep=1)
    np.testing.assert_allclose(last, activation_patching(params, TINY, clean, corrupted, metric), **TOL)
    assert attribution_patching(params, TINY, clean, corrupted, metric, logits_to_keep=1).shape == last.shape
    with pytest.raises(ValueError, match=r"logits_to_keep must be an int in \[0, 5\]"):
        activation_patching(params, TINY, clean, corrupted, metric, logits_to_keep=6)


def test_attribution_patching_equals_its_formula(params):
    rng = np.random.default_rng(6)
    clean = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 5)), jnp.int32)
    corrupted = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 5)), jnp.int32)
    metric = lambda logits: (logits[:, -1, 11] - logits[:, -1, 12]).mean()
    result = attribution_patching(params, TINY, clean, corrupted, metric, name="hook_resid_pre", over="layer_pos")
    _, clean_cache = run_with_cache(params, TINY, clean, names=lambda n: n.endswith("hook_resid_pre"))
    for layer in range(TINY.n_layer):
        name = f"blocks.{layer}.hook_resid_pre"
        corrupted_act = run_with_cache(params, TINY, corrupted, names=[name])[1][name]
        grad = jax.grad(lambda d: metric(run_with_hooks(params, TINY, corrupted, [(name, add_vector(d))])))(
            jnp.zeros_like(corrupted_act))
        expected = ((clean_cache[name] - corrupted_act) * grad).sum(axis=(0, 2))  # [pos]
        np.testing.assert_allclose(result[layer], expected, rtol=1e-4, atol=1e-6)


def test_bad_input_is_named(params, ids):
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.0.attn.hook_zz'; closest: blocks.0.attn.hook_z"):
        run_with_hooks(params, TINY, ids, [("blocks.0.attn.hook_zz", lambda a, ctx: a)])
    with pytest.raises(ValueError, match=r"layer 7 is out of range for a 2-layer model \(layers 0..1\)"):
        run_with_cache(params, TINY, ids, names=["blocks.7.hook_resid_pre"])
    with pytest.raises(ValueError, match=r"hook \S*<lambda> on 'blocks.0.hook_resid_pre' returned shape \[2, 6\] dtype "
                                         r"float32; the activation has shape \[2, 6, 32\] dtype float32"):
        run_with_hooks(params, TINY, ids, [("blocks.0.hook_resid_pre", lambda a, ctx: a.sum(-1))])
    with pytest.raises(ValueError, match=r"returned shape \[2, 6, 32\] dtype bfloat16"):
        run_with_hooks(params, TINY, ids, [("blocks.0.hook_resid_pre", lambda a, ctx: a.astype(jnp.bfloat16))])
    scan_config, scan_params = with_scan_layers(TINY, params)
    with pytest.raises(ValueError, match="scan_layers"):
        run_with_hooks(scan_params, scan_config, ids, [("hook_embed", lambda a, ctx: a)])
    with pytest.raises(ValueError, match="over must be one of"):
        activation_patching(params, TINY, ids, ids, lambda lg: lg.sum(), over="pos")


def test_hook_points_add_nothing_to_the_program_when_unused(params, ids):
    """The plain path's program is unchanged by the hook points: with no hook (hooks=None) and with a runner that
    wants nothing, the traced programs are identical."""
    from gpt2_jax.interp import HookRunner

    trace = lambda hooks: str(jax.make_jaxpr(
        lambda p, x: GPT2LMHeadModel(TINY, hooks=hooks).apply({"params": p}, x).logits)(params, ids))
    assert trace(None) == trace(HookRunner())
