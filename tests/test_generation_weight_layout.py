"""Generation's CPU weight layout (kernels transposed to ``[out, in]``): same results, cached per params object."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import backend
from gpt2_jax.config import GPT2Config
from gpt2_jax.generation import generate
from gpt2_jax.generation.engine import forward, init_cache
from gpt2_jax.generation.weight_layout import (
    TRANSPOSED_KERNELS_ENV, DecodeWeights, clear_cache, decode_weights, transpose_kernels, use_transposed_kernels,
)
from gpt2_jax.layers import KERNELS_OUT_IN
from gpt2_jax.model import GPT2LMHeadModel, init_params
from generation_helpers import TINY, prompts, tiny_params

ODD = GPT2Config(vocab_size=61, n_positions=32, n_embd=30, n_layer=2, n_head=5, n_inner=44,
                 activation_function="relu")


def test_every_dense_kernel_moves_transposed_and_nothing_else_changes():
    params = tiny_params()
    weights = transpose_kernels(params)
    kernels = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
    assert len(kernels) == 4 * TINY.n_layer
    for path, kernel in kernels:
        moved = weights.kernels_out_in
        kept = weights.params
        for key in path[:-1]:
            moved, kept = moved[key.key], kept[key.key]
        np.testing.assert_array_equal(np.asarray(moved["kernel"]), np.asarray(kernel).T)
        assert "kernel" not in kept  # the [in, out] copy is not passed to the programs
    others = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params) if p[-1].key != "kernel"}
    kept = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(weights.params)}
    assert kept.keys() == others.keys()
    assert all(kept[k] is others[k] for k in kept)  # shared, not copied
    assert weights.variables.keys() == {"params", KERNELS_OUT_IN}


@pytest.mark.parametrize("config", [TINY, ODD], ids=["tiny", "odd_inner_relu"])
def test_transposed_kernels_give_the_same_logits_as_the_params(config):
    params = init_params(jax.random.PRNGKey(3), config)
    ids = jnp.asarray(prompts(2, 7, vocab=config.vocab_size))
    model = GPT2LMHeadModel(config)
    plain = model.apply({"params": params}, ids).logits
    moved = model.apply(transpose_kernels(params).variables, ids).logits
    np.testing.assert_allclose(np.asarray(moved), np.asarray(plain), rtol=1e-5, atol=1e-5)
    cached_plain, _ = forward(params, ids, None, init_cache(config, 2, 8), config, "float32")
    cached_moved, _ = forward(transpose_kernels(params), ids, None, init_cache(config, 2, 8), config, "float32")
    np.testing.assert_allclose(np.asarray(cached_moved), np.asarray(cached_plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_gives_the_same_tokens_with_and_without_the_copy(batch):
    params = tiny_params()
    ids = prompts(batch, 6)
    with_copy = generate(transpose_kernels(params), ids, model_config=TINY, max_new_tokens=12, do_sample=True,
                         top_k=20, key=jax.random.key(5))
    without = generate(DecodeWeights(params), ids, model_config=TINY, max_new_tokens=12, do_sample=True, top_k=20,
                       key=jax.random.key(5))
    np.testing.assert_array_equal(with_copy.sequences, without.sequences)


def test_kernels_are_transposed_for_several_rows_only_with_the_weights_as_left_operand(monkeypatch):
    """Read as ``x @ W^T``, XLA CPU's ``[out, in]`` kernels win in a matrix-vector product only, and the copy is made
    for one-row decode steps only; computed as ``(W @ x^T)^T`` (``kernels_as_lhs``, the CPU default) they win at
    every row count, so several rows get the copy too."""
    from gpt2_jax.generation.request import build_request

    monkeypatch.setenv(TRANSPOSED_KERNELS_ENV, "1")
    params = tiny_params()
    as_right = backend.tuning_for(params).replace(transposed_kernels=True, kernels_as_lhs=False)
    assert decode_weights(params, rows=1, tuning=as_right).kernels_out_in is not None
    several = decode_weights(params, rows=8, tuning=as_right)
    assert several.kernels_out_in is None and several.params is params  # no copy at all
    assert decode_weights(params, rows=1) is decode_weights(params)  # the cached one-row copy survives
    as_left = as_right.replace(kernels_as_lhs=True)
    assert decode_weights(params, rows=8, tuning=as_left).kernels_out_in is not None
    assert backend.tuning_for(platform="cpu").kernels_as_lhs

    def rows(batch, **overrides):
        return build_request(params, TINY, prompts(batch, 5), max_new_tokens=4, **overrides).decode_rows

    assert rows(1) == 1 and rows(3) == 3
    assert rows(1, num_beams=3) == 3 and rows(2, num_beams=3, num_return_sequences=2) == 6
    assert rows(1, do_sample=True, num_return_sequences=4) == 4


def test_the_copy_is_made_once_per_params_object_and_dropped_with_it(monkeypatch):
    monkeypatch.setenv(TRANSPOSED_KERNELS_ENV, "1")
    clear_cache()
    params = init_params(jax.random.PRNGKey(1), TINY)
    first = decode_weights(params)
    assert decode_weights(params) is first  # same object: reused
    assert decode_weights(first) is first  # already prepared: returned as is
    updated = jax.tree_util.tree_map(lambda x: x * 1.0, params)  # e.g. after a training step
    second = decode_weights(updated)
    assert second is not first
    np.testing.assert_array_equal(np.asarray(second.kernels_out_in["h"]["0"]["mlp"]["c_fc"]["kernel"]),
                                  np.asarray(updated["h"]["0"]["mlp"]["c_fc"]["kernel"]).T)
    swapped = dict(updated, h={**updated["h"], "1": params["h"]["1"]})  # one block replaced in place
    assert decode_weights(swapped) is not second
    probe = decode_weights(updated)  # cache the updated params again, then let them go
    del updated, swapped, second, probe
    gc.collect()
    from gpt2_jax.generation import weight_layout

    assert weight_layout._LAST._entries == []  # the copies went with their params


def test_a_target_and_its_assistant_both_stay_prepared(monkeypatch):
    """Speculative decoding prepares two params objects per call: alternating between them reuses both copies."""
    monkeypatch.setenv(TRANSPOSED_KERNELS_ENV, "1")
    clear_cache()
    target, assistant = init_params(jax.random.PRNGKey(1), TINY), init_params(jax.random.PRNGKey(2), TINY)
    first_target, first_assistant = decode_weights(target), decode_weights(assistant)
    assert decode_weights(target) is first_target and decode_weights(assistant) is first_assistant
    third = init_params(jax.random.PRNGKey(3), TINY)
    decode_weights(third)  # the least recently used (the target) makes room
    assert decode_weights(assistant) is first_assistant
    assert decode_weights(target) is not first_target


def test_off_the_cpu_or_when_disabled_the_params_are_used_unchanged(monkeypatch):
    params = tiny_params()
    assert decode_weights(params, platform="gpu").kernels_out_in is None
    assert decode_weights(params, platform="tpu").params is params
    monkeypatch.setenv(TRANSPOSED_KERNELS_ENV, "0")
    assert not use_transposed_kernels("cpu")
    assert decode_weights(params, platform="cpu").kernels_out_in is None
    monkeypatch.setenv(TRANSPOSED_KERNELS_ENV, "yes please")
    with pytest.raises(ValueError, match=TRANSPOSED_KERNELS_ENV):
        decode_weights(params, platform="cpu")


def test_decode_weights_is_a_pytree_the_programs_can_take():
    weights = transpose_kernels(tiny_params())
    leaves, treedef = jax.tree_util.tree_flatten(weights)
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), DecodeWeights)
    assert len(leaves) == len(jax.tree_util.tree_leaves(tiny_params()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_consuming_preparation_frees_each_copied_original_and_computes_the_same(monkeypatch, dtype):
    """``decode_weights(consume=True)`` (what the CLIs do with the model they loaded): the same prepared weights
    as the cached path, every original that got a copy (kernels; narrow leaves widened on the CPU) deleted, the
    leaves used as they are kept alive and shared, and nothing cached."""
    monkeypatch.setenv(TRANSPOSED_KERNELS_ENV, "1")
    clear_cache()
    reference_params = jax.tree_util.tree_map(lambda x: x.astype(dtype), init_params(jax.random.PRNGKey(4), ODD))
    owned = jax.tree_util.tree_map(jnp.copy, reference_params)
    expected = decode_weights(reference_params)
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(owned)}
    consumed = decode_weights(owned, consume=True)
    assert decode_weights(reference_params) is expected  # the cached entry was not replaced
    for name, leaf in leaves.items():
        copied = name.endswith("['kernel']") or dtype != "float32"  # bfloat16 is widened to float32 on the CPU
        assert leaf.is_deleted() == copied, name
    for got, want in zip(jax.tree_util.tree_leaves(consumed), jax.tree_util.tree_leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ids = prompts(2, 5, vocab=ODD.vocab_size)
    settings = dict(model_config=ODD, max_new_tokens=6, eos_token_id=1, pad_token_id=0)
    out = generate(consumed, ids, **settings)
    np.testing.assert_array_equal(out.sequences, generate(reference_params, ids, **settings).sequences)
