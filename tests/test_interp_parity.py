"""Every hook point equals TransformerLens's (a ``TransformerBridge`` booted offline over the same random weights),
unpadded and left-padded, within atol 1e-5 (float32 round-off of O(1) activations through two blocks: ~1e-6)."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytest.importorskip("transformer_lens")

from gpt2_jax.interp import hook_names, run_with_cache
from hf_reference import hf_model
from interp_helpers import TINY, boot_bridge, max_dev
from test_model_parity import random_params

ATOL = 1e-5
#: hook_result is not a hook of the bridge unless use_attn_result is set; it is compared after setting it.
SHAPES = {"hook_q": "bthd", "hook_k": "bthd", "hook_v": "bthd", "hook_z": "bthd", "hook_attn_scores": "bhqk",
          "hook_pattern": "bhqk"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    params = random_params(TINY, seed=3)
    model = hf_model(params, TINY)
    start = time.perf_counter()
    bridge = boot_bridge(model, TINY, str(tmp_path_factory.mktemp("tl")))
    print(f"\nTransformerBridge boot: {time.perf_counter() - start:.2f} s")
    return params, bridge


def _batch(seed: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [2, 7], mask)`` of random tokens; the first row left-padded by ``padding`` pad tokens."""
    ids = np.random.default_rng(seed).integers(0, TINY.vocab_size - 2, (2, 7))
    mask = np.ones_like(ids)
    mask[0, :padding] = 0
    ids[0, :padding] = TINY.pad_token_id
    return ids, mask


def _masks(name, mask, ndim):
    """Where ours and TransformerLens's values are compared: real query tokens (and visible keys for scores)."""
    real = mask.astype(bool)  # [batch, T]
    if name.endswith(("hook_attn_scores", "hook_pattern")):  # [batch, head, query, key]
        causal = np.tril(np.ones((mask.shape[1],) * 2, bool))
        return real[:, None, :, None] & real[:, None, None, :] & causal
    return real.reshape(real.shape + (1,) * (ndim - 2))  # [batch, pos, ...]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_every_hook_point_matches_transformer_lens(setup, padded):
    params, bridge = setup
    ids, mask = _batch(seed=0, padding=3 if padded else 0)
    # Given a mask, the bridge counts positions over the real tokens, as our default does.
    logits, cache = run_with_cache(params, TINY, jnp.asarray(ids), names=hook_names(TINY),
                                   attention_mask=jnp.asarray(mask))
    kwargs = {"attention_mask": torch.from_numpy(mask)} if padded else {}
    bridge.set_use_attn_result(True)
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(torch.from_numpy(ids), **kwargs)
    deviations = {}
    for name in hook_names(TINY):
        assert name in ref, f"{name} is not a hook of the bridge"
        ours = np.asarray(cache[name])
        theirs = ref[name].detach().numpy()
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        deviations[name] = max_dev(ours, theirs, _masks(name, mask, ours.ndim))
    deviations["logits"] = max_dev(logits, ref_logits.detach().numpy(), mask.astype(bool)[:, :, None])
    print("\nlargest deviation per hook (" + ("left-padded" if padded else "unpadded") + "):")
    for name, dev in deviations.items():
        print(f"  {name:40s} {dev:.2e}")
    bad = {n: d for n, d in deviations.items() if not d <= ATOL}
    assert not bad, bad


#: Hooks of the residual stream: compared after centring over d_model (see the test's docstring).
RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@pytest.fixture(scope="module")
def processed_bridge(tmp_path_factory):
    params = random_params(TINY, seed=3)
    bridge = boot_bridge(hf_model(params, TINY), TINY, str(tmp_path_factory.mktemp("tl-compat")))
    bridge.enable_compatibility_mode(disable_warnings=True)  # fold_ln, centre writing weights and unembed, fold v bias
    bridge.set_use_attn_result(True)
    return params, bridge


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_processed_weights_match_transformer_lens_compatibility_mode(processed_bridge, padded):
    """Our ``process_weights`` (fold_layer_norm, center_writing_weights, center_unembed, fold_value_biases) against
    the bridge after ``enable_compatibility_mode()``: every hook and the logits within 1e-4, with one difference
    by design. TransformerLens centres ``W_E`` and ``W_pos`` over d_model because its unembedding is untied; our
    LM head is ``wte`` itself, so centring it would change the logits, and our ``center_unembed`` moves ``wte``'s mean
    over the vocabulary into ``wpe`` instead. Our residual stream therefore carries an extra component along the
    all-ones direction, which every LayerNorm removes: residual hooks are compared after centring over d_model, and
    ``hook_embed`` / ``hook_pos_embed`` through their sum, which is ``blocks.0.hook_resid_pre``."""
    from gpt2_jax.interp import process_weights

    params, bridge = processed_bridge
    ids, mask = _batch(seed=1, padding=2 if padded else 0)
    logits, cache = run_with_cache(process_weights(params, TINY), TINY, jnp.asarray(ids), names=hook_names(TINY),
                                   attention_mask=jnp.asarray(mask))
    kwargs = {"attention_mask": torch.from_numpy(mask)} if padded else {}
    with torch.no_grad():
        ref_logits, ref = bridge.run_with_cache(torch.from_numpy(ids), **kwargs)
    centred = lambda x: x - x.mean(-1, keepdims=True)
    deviations = {}
    for name in hook_names(TINY):
        if name in ("hook_embed", "hook_pos_embed"):
            continue
        ours, theirs = np.asarray(cache[name], np.float64), ref[name].detach().numpy().astype(np.float64)
        assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
        if name.endswith(RESIDUAL):
            ours, theirs = centred(ours), centred(theirs)
        deviations[name] = max_dev(ours, theirs, _masks(name, mask, ours.ndim))
    embedded = np.asarray(cache["hook_embed"], np.float64) + np.asarray(cache["hook_pos_embed"], np.float64)
    deviations["hook_embed + hook_pos_embed"] = max_dev(
        centred(embedded), centred(ref["blocks.0.hook_resid_pre"].numpy().astype(np.float64)), _masks("", mask, 3))
    deviations["logits"] = max_dev(logits, ref_logits.detach().numpy(), mask.astype(bool)[:, :, None])
    print("\nlargest deviation per hook, processed weights (" + ("left-padded" if padded else "unpadded") + "):")
    for name, dev in deviations.items():
        print(f"  {name:40s} {dev:.2e}")
    bad = {n: d for n, d in deviations.items() if not d <= 1e-4}
    assert not bad, bad
    # not vacuous: the residual stream really differs along the all-ones direction, and only there
    resid = "blocks.1.hook_resid_pre"
    assert max_dev(cache[resid], ref[resid].numpy(), _masks(resid, mask, 3)) > 1e-3
