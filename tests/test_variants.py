"""A research variant through the unchanged library: rotary position embeddings in attention, no ``wpe``.

The variant itself is the first ~25 lines below (a subclass overriding ``position_qk`` plus one registration);
``init_params``, the train step and ``generate`` are used exactly as for GPT-2. Also: scan_layers and remat give
the same outputs and gradients as the plain unrolled model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax import GPT2Config, GPT2LMHeadModel, KVCache, generate, init_params
from gpt2_jax.layers import GPT2Attention, get_variant, register_variant
from gpt2_jax.stacking import params_for
from gpt2_jax.training import TrainState, make_train_step


# The variant: ---------------------------------------------------------------------------------------------------
class RotaryAttention(GPT2Attention):
    """GPT-2 attention with rotary position embeddings (RoFormer) applied to queries and keys."""

    base: float = 10000.0

    def position_qk(self, q, k, positions):  # q, k [batch, T, n_head, head_dim]; positions [batch, T]
        half = q.shape[-1] // 2
        inv_freq = self.base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
        angles = positions[:, :, None, None].astype(jnp.float32) * inv_freq  # [batch, T, 1, half]
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        def rotate(t):
            a, b = t[..., :half].astype(jnp.float32), t[..., half:].astype(jnp.float32)
            return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(t.dtype)

        return rotate(q), rotate(k)


register_variant("rotary-test", attention=RotaryAttention, learned_positions=False)
# ----------------------------------------------------------------------------------------------------------------

ROTARY = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, variant="rotary-test",
                    bos_token_id=1, eos_token_id=2, pad_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# float32 round-off through two blocks of width 32 with O(1) activations: ~1e-6; a wrong position is O(0.1).
TOL = dict(rtol=1e-5, atol=1e-5)


def test_variant_params_have_no_position_table():
    params = init_params(jax.random.PRNGKey(0), ROTARY)
    assert "wpe" not in params and "wpe" in init_params(jax.random.PRNGKey(0), ROTARY.replace(variant="gpt2"))
    assert get_variant("rotary-test").attention is RotaryAttention
    with pytest.raises(ValueError, match="unknown model variant 'nope'"):
        init_params(jax.random.PRNGKey(0), ROTARY.replace(variant="nope"))
    with pytest.raises(ValueError, match="cannot be replaced"):
        register_variant("gpt2", attention=RotaryAttention)


@pytest.mark.parametrize("scan", [False, True])
def test_rotary_cache_and_padding_invariants(scan):
    """Positions reach attention: prefill + decode == one full pass, and a left-padded row == the row alone."""
    config = ROTARY.replace(scan_layers=scan)
    params = params_for(config, init_params(jax.random.PRNGKey(1), ROTARY))
    model = GPT2LMHeadModel(config)
    ids = np.random.default_rng(0).integers(4, 64, (2, 9)).astype(np.int32)
    full = model.apply({"params": params}, ids).logits
    cache = KVCache.init(config, batch_size=2, max_length=16)
    out = model.apply({"params": params}, ids[:, :5], cache=cache)
    for t in range(5, 9):
        out = model.apply({"params": params}, ids[:, t:t + 1], cache=out.cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full[:, t]), **TOL)
    padded = np.concatenate([np.full((2, 3), 3, np.int32), ids], axis=1)
    mask = np.concatenate([np.zeros((2, 3), np.int32), np.ones_like(ids)], axis=1)
    left = model.apply({"params": params}, padded, attention_mask=mask).logits[:, 3:]
    np.testing.assert_allclose(np.asarray(left), np.asarray(full), **TOL)
    # A rotary model without positions would be permutation-blind before the causal mask: check it is not.
    shifted = model.apply({"params": params}, ids, position_ids=np.arange(9)[None] + 7).logits
    assert np.abs(np.asarray(shifted) - np.asarray(full)).max() < 1e-4  # rotary is relative: shift-invariant
    swapped = model.apply({"params": params}, ids[:, ::-1].copy()).logits
    assert not np.allclose(np.asarray(swapped[:, -1]), np.asarray(full[:, -1]), atol=1e-3)


def test_rotary_trains_and_generates_through_the_unchanged_engine():
    params = init_params(jax.random.PRNGKey(2), ROTARY)
    optimizer = optax.adam(3e-3)
    step = make_train_step(ROTARY, optimizer, dropout=False)
    tokens = jnp.asarray(np.tile(np.arange(4, 21, dtype=np.int32), (4, 1)))  # a pattern to memorise
    state = TrainState.create(params, optimizer)
    losses = []
    for i in range(30):
        state, metrics = step(state, tokens, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    out = generate(state.params, np.arange(4, 9)[None], model_config=ROTARY, max_new_tokens=6)
    assert out.sequences.shape == (1, 11)
    # What it memorised: the pattern continues.
    np.testing.assert_array_equal(np.asarray(out.sequences)[0, 5:], np.arange(9, 15))


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "minimal"])
def test_remat_and_scan_keep_loss_and_gradients(policy):
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4, scale_attn_by_inverse_layer_idx=True)
    params = init_params(jax.random.PRNGKey(3), config)
    ids = np.random.default_rng(1).integers(0, 64, (2, 12)).astype(np.int32)

    def loss_and_grads(cfg, remat):
        model = GPT2LMHeadModel(cfg, remat_policy=remat)
        p = params_for(cfg, params)
        loss, grads = jax.value_and_grad(lambda q: model.apply({"params": q}, ids, labels=ids).loss)(p)
        return loss, params_for(config, grads)

    ref_loss, ref_grads = loss_and_grads(config, "none")
    for scan in (False, True):
        loss, grads = loss_and_grads(config.replace(scan_layers=scan), policy)
        # Remat recomputes the same ops; scan reorders none of the sums: float32 round-off only (gradients are
        # O(1e-2..1), summed over 24 positions: a few ulp of the largest).
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat policy 'sometimes' is not one of"):
        GPT2LMHeadModel(config, remat_policy="sometimes").apply({"params": params}, ids)


@pytest.mark.parametrize("options", [dict(), dict(do_sample=True, top_k=20, top_p=0.9), dict(num_beams=3)],
                         ids=["greedy", "sample", "beams"])
def test_scan_layers_generates_the_unrolled_tokens(options):
    """One key, either layout: the same params (init_params stacks the unrolled init), so the same tokens."""
    config = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2, pad_token_id=3, initializer_range=0.3)
    scanned = config.replace(scan_layers=True)
    params, stacked = init_params(jax.random.PRNGKey(0), config), init_params(jax.random.PRNGKey(0), scanned)
    for a, b in zip(jax.tree_util.tree_leaves(params_for(scanned, params)), jax.tree_util.tree_leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.random.default_rng(4).integers(4, 96, (3, 7))
    kwargs = dict(max_new_tokens=10, key=jax.random.PRNGKey(5), **options)
    ours = generate(stacked, ids, model_config=scanned, **kwargs).sequences
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(generate(params, ids, model_config=config, **kwargs).sequences))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the unrolled-remat warning is about XLA CPU")
def test_remat_saves_compiled_memory_with_scan_and_warns_when_unrolled_on_cpu():
    """XLA's own buffer analysis of the compiled train step: with scanned layers every policy keeps less than
    keeping everything; unrolled on the CPU (where XLA drops the barriers remat relies on) the user is told."""
    config = GPT2Config(vocab_size=256, n_positions=256, n_embd=128, n_layer=4, n_head=4, scan_layers=True)
    optimizer = optax.adamw(1e-4)
    state = jax.eval_shape(lambda: TrainState.create(init_params(jax.random.PRNGKey(0), config), optimizer))
    tokens = jax.ShapeDtypeStruct((4, 257), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))

    def temp_bytes(cfg, policy):
        step = make_train_step(cfg, optimizer, dropout=False, remat=policy)
        return step.lower(state if cfg.scan_layers else unrolled_state, tokens, key).compile().memory_analysis().temp_size_in_bytes

    unrolled = config.replace(scan_layers=False)
    unrolled_state = jax.eval_shape(lambda: TrainState.create(init_params(jax.random.PRNGKey(0), unrolled), optimizer))
    keep_all = temp_bytes(config, "none")
    for policy in ("full", "dots_saveable", "minimal"):
        assert temp_bytes(config, policy) < keep_all, policy
    with pytest.warns(UserWarning, match="saves no memory on XLA CPU without scan_layers"):
        make_train_step(unrolled, optimizer, dropout=False, remat="full")
