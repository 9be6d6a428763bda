"""The backend switchboard (:mod:`gpt2_jax.backend`): defaults per platform, overrides and their precedence, the
platform of a params tree, and generation that gives the same tokens under the CPU tuning and the plain one while
its public functions keep the documented 4-D cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import backend
from gpt2_jax.backend import PLATFORM_DEFAULTS, TUNING_ENV, Tuning
from gpt2_jax.config import GPT2Config
from gpt2_jax.generation import TRACE_COUNTS, decode_step, generate, init_cache, prefill, reorder_generated
from gpt2_jax.generation.engine import flatten_cache, repeat_cache, unflatten_cache
from gpt2_jax.kv_cache import KVCache
from generation_helpers import EOS, TINY, prompts, tiny_params

CPU = PLATFORM_DEFAULTS["cpu"]
PLAIN = Tuning()
#: Every field at its plain value: as scoped overrides, turns any platform's defaults into ``Tuning()``.
PLAIN_OVERRIDES = dataclasses.asdict(PLAIN)
CPU_TRICKS = ("transposed_kernels", "single_row_cache_view", "cumsum_by_matmul", "top_k_tiers",
              "beam_reorder_by_matmul", "cut_block_gradients")


@pytest.fixture(autouse=True)
def _clean_overrides(monkeypatch):
    """No test sees another's process-wide overrides or the caller's environment."""
    monkeypatch.delenv(TUNING_ENV, raising=False)
    monkeypatch.delenv(backend.TRANSPOSED_KERNELS_ENV, raising=False)
    backend.clear_overrides()
    yield
    backend.clear_overrides()


# Defaults per platform -------------------------------------------------------------------------------------------
def test_cpu_defaults_turn_every_cpu_trick_on():
    tuning = backend.tuning_for(platform="cpu")
    assert tuning == CPU
    assert all(getattr(tuning, name) for name in CPU_TRICKS)
    assert tuning.attention == "explicit" and not tuning.low_precision_compute


@pytest.mark.parametrize("platform, attention", [("gpu", "cudnn"), ("tpu", "xla")])
def test_accelerators_get_the_plain_formulation(platform, attention):
    tuning = backend.tuning_for(platform=platform)
    assert not any(getattr(tuning, name) for name in CPU_TRICKS)
    assert tuning.attention == attention and tuning.low_precision_compute


def test_an_unknown_platform_gets_the_plain_tuning():
    assert backend.tuning_for(platform="metal") == PLAIN


def test_tuning_is_hashable_and_validated():
    assert hash(CPU) != hash(PLAIN) and {CPU: 1}[PLATFORM_DEFAULTS["cpu"]] == 1  # a usable static jit argument
    with pytest.raises(ValueError, match="attention"):
        Tuning(attention="flash")
    with pytest.raises(ValueError, match="top_k_tiers"):
        Tuning(top_k_tiers=1)


# Environment, process and scoped overrides -------------------------------------------------------------------------
def test_environment_overrides_are_parsed(monkeypatch):
    monkeypatch.setenv(TUNING_ENV, " top_k_tiers=0, cumsum_by_matmul=off ,attention=xla,")
    tuning = backend.tuning_for(platform="cpu")
    assert tuning == CPU.replace(top_k_tiers=False, cumsum_by_matmul=False, attention="xla")
    monkeypatch.setenv(TUNING_ENV, "single_row_cache_view=yes,beam_reorder_by_matmul=TRUE")
    assert backend.tuning_for(platform="gpu") == PLATFORM_DEFAULTS["gpu"].replace(
        single_row_cache_view=True, beam_reorder_by_matmul=True)


def test_the_older_transposed_kernels_variable_is_honoured(monkeypatch):
    monkeypatch.setenv(backend.TRANSPOSED_KERNELS_ENV, "0")
    assert not backend.tuning_for(platform="cpu").transposed_kernels
    monkeypatch.setenv(backend.TRANSPOSED_KERNELS_ENV, "maybe")
    with pytest.raises(ValueError, match=backend.TRANSPOSED_KERNELS_ENV):
        backend.tuning_for(platform="cpu")


@pytest.mark.parametrize("text", ["top_k_tiers=maybe", "top_k_tiers", "no_such_setting=1", "attention=flash"])
def test_bad_environment_values_raise_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv(TUNING_ENV, text)
    with pytest.raises(ValueError, match=TUNING_ENV):
        backend.tuning_for(platform="cpu")


def test_process_overrides_beat_the_environment_and_scoped_ones_beat_both(monkeypatch):
    monkeypatch.setenv(TUNING_ENV, "top_k_tiers=0,cumsum_by_matmul=0,attention=xla")
    backend.set_overrides(top_k_tiers=True, attention="cudnn")
    tuning = backend.tuning_for(platform="cpu")
    assert (tuning.top_k_tiers, tuning.cumsum_by_matmul, tuning.attention) == (True, False, "cudnn")
    with backend.overrides(attention="explicit", cumsum_by_matmul=True):
        with backend.overrides(attention="xla"):  # innermost wins
            assert backend.tuning_for(platform="cpu").attention == "xla"
        inner = backend.tuning_for(platform="cpu")
        assert (inner.attention, inner.cumsum_by_matmul) == ("explicit", True)
    assert backend.tuning_for(platform="cpu") == tuning  # the scope is gone
    backend.set_overrides(attention=None)  # None drops that process override: the environment's shows again
    assert backend.tuning_for(platform="cpu").attention == "xla"
    backend.clear_overrides()
    assert backend.tuning_for(platform="cpu") == CPU.replace(top_k_tiers=False, cumsum_by_matmul=False,
                                                             attention="xla")


def test_overrides_reject_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="unknown tuning setting"):
        backend.set_overrides(fast=True)
    with pytest.raises(ValueError, match="attention"):
        backend.set_overrides(attention="flash")
    with pytest.raises(ValueError, match="unknown tuning setting"):
        with backend.overrides(fast=True):
            pass


# Where the params live ---------------------------------------------------------------------------------------------
def test_platform_of_a_cpu_array_and_of_a_tracer():
    cpu_array = jax.device_put(jnp.zeros(3), jax.devices("cpu")[0])
    assert backend.platform_of({"w": cpu_array}) == "cpu"
    default = "gpu" if jax.default_backend() in ("cuda", "rocm") else jax.default_backend()
    seen = []
    jax.jit(lambda x: seen.append(backend.platform_of(x)) or x)(cpu_array)
    assert seen == [default]  # a tracer has no devices: JAX's default backend
    assert backend.platform_of({}) == default and backend.platform_of([1.0]) == default
    assert backend.tuning_for({"w": cpu_array}) == CPU


# Generation: the public cache layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("tuning", [CPU, PLAIN], ids=["cpu", "plain"])
def test_public_cache_functions_keep_the_4d_layout_for_one_row(tuning):
    shape = (1, TINY.n_head, 16, TINY.head_dim)  # [batch, n_head, slots, head_dim]
    cache = init_cache(TINY, 1, 16)
    assert all(k.shape == shape for k in (*cache.keys, *cache.values))
    ids = prompts(1, 5, seed=3)
    _, cache = prefill(tiny_params(), ids, np.ones_like(ids), cache, config=TINY, tuning=tuning)
    assert all(k.shape == shape for k in (*cache.keys, *cache.values))
    _, cache = decode_step(tiny_params(), ids[:, -1], cache, config=TINY, tuning=tuning)
    assert all(k.shape == shape for k in (*cache.keys, *cache.values))
    assert int(cache.index) == 6


def test_public_functions_reject_the_loops_one_row_view():
    view = flatten_cache(init_cache(TINY, 1, 16))
    assert view.keys[0].shape == (TINY.n_head, 16, TINY.head_dim)
    with pytest.raises(ValueError, match="KVCache layout"):
        decode_step(tiny_params(), np.zeros(1, np.int32), view, config=TINY)
    assert unflatten_cache(view).keys[0].shape == (1, TINY.n_head, 16, TINY.head_dim)


# Generation: stacked (scan_layers) caches through the cache helpers ------------------------------------------------
def _filled_cache(batch: int, beams: int, bucket: int) -> KVCache:
    """A per-layer cache of ``batch * beams`` rows whose generated slots differ from row to row."""
    ids = prompts(batch, bucket, seed=21)
    _, cache = prefill(tiny_params(), ids, np.ones_like(ids), init_cache(TINY, batch, bucket + 6), config=TINY)
    cache = repeat_cache(cache, beams)
    for t in range(3):
        _, cache = decode_step(tiny_params(), prompts(1, batch * beams, seed=40 + t)[0], cache, config=TINY)
    return cache


def _stack(cache: KVCache) -> KVCache:
    """The same cache in the ``scan_layers`` layout: keys/values ``[n_layer, batch, n_head, S, head_dim]``."""
    return cache.replace(keys=jnp.stack(cache.keys), values=jnp.stack(cache.values))


def _assert_same_cache(per_layer: KVCache, stacked: KVCache) -> None:
    for a, b in zip(jax.tree_util.tree_leaves(_stack(per_layer)), jax.tree_util.tree_leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("tuning", [CPU, PLAIN], ids=["matmul", "gather"])
def test_beam_reorder_is_the_same_move_for_both_formulations_and_layouts(tuning):
    batch, beams, bucket = 2, 3, 8
    cache = _filled_cache(batch, beams, bucket)
    parents = jnp.asarray([2, 0, 2, 4, 4, 3], jnp.int32)  # beams follow beams of their own prompt
    expected = cache.reorder(parents)  # every slot of every row moved: the reference
    moved = reorder_generated(cache, parents, bucket, beams, tuning)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(moved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_same_cache(moved, reorder_generated(_stack(cache), parents, bucket, beams, tuning))


def test_repeat_and_flatten_handle_stacked_caches():
    cache = _filled_cache(1, 1, 8)
    stacked = _stack(cache)
    assert stacked.stacked and flatten_cache(stacked) is stacked  # no one-row view of a stacked cache
    assert unflatten_cache(stacked) is stacked
    _assert_same_cache(repeat_cache(cache, 3), repeat_cache(stacked, 3))


# Generation: CPU tuning vs the plain formulation -------------------------------------------------------------------
# A vocabulary above the first candidate tier (256), so the CPU's top-k tiers really run.
WIDE = dataclasses.replace(TINY, vocab_size=600)


def _generate_both(config: GPT2Config, ids, **kwargs):
    """``generate`` under the CPU tuning (the params live on the CPU) and under the plain formulation."""
    params = tiny_params(0, config)
    assert backend.tuning_for(params) == CPU
    cpu = generate(params, ids, model_config=config, **kwargs)
    with backend.overrides(**PLAIN_OVERRIDES):
        assert backend.tuning_for(params) == PLAIN
        plain = generate(params, ids, model_config=config, **kwargs)
    return cpu, plain


def test_greedy_tokens_are_the_same_under_both_tunings():
    for batch in (1, 3):  # one row: the single-row cache view; several: the 4-D cache
        cpu, plain = _generate_both(TINY, prompts(batch, 7, seed=5), max_new_tokens=12, eos_token_id=())
        np.testing.assert_array_equal(cpu.sequences, plain.sequences)


@pytest.mark.parametrize("top_k, top_p", [(40, 0.9), (0, 0.8), (300, 1.0)])
def test_sampled_tokens_are_the_same_under_both_tunings(top_k, top_p):
    ids = prompts(2, 6, seed=8, vocab=WIDE.vocab_size)
    cpu, plain = _generate_both(WIDE, ids, key=jax.random.key(3), max_new_tokens=16, do_sample=True, top_k=top_k,
                                top_p=top_p, num_return_sequences=2, eos_token_id=(), return_logprobs=True)
    np.testing.assert_array_equal(cpu.sequences, plain.sequences)
    # The log-probs differ by the logits' float32 round-off only (attention formulation and kernel layout differ):
    # logits of magnitude ~10 after a few hundred float32 accumulations, ~1e-5 at most.
    np.testing.assert_allclose(cpu.logprobs, plain.logprobs, rtol=0, atol=1e-4)


def test_a_new_tuning_compiles_a_new_program():
    ids = prompts(1, 4, seed=9)
    generate(tiny_params(), ids, model_config=TINY, max_new_tokens=3)
    before = TRACE_COUNTS["sample"]
    generate(tiny_params(), ids, model_config=TINY, max_new_tokens=3)
    assert TRACE_COUNTS["sample"] == before  # same tuning: the cached program
    with backend.overrides(top_k_tiers=False, cumsum_by_matmul=False):
        generate(tiny_params(), ids, model_config=TINY, max_new_tokens=3)
    assert TRACE_COUNTS["sample"] == before + 1  # never a program built under other settings


@pytest.mark.parametrize("do_sample", [False, True])
def test_beam_search_is_the_same_under_both_tunings(do_sample):
    ids = prompts(2, 5, seed=6)
    cpu, plain = _generate_both(TINY, ids, key=jax.random.key(4), max_new_tokens=10, num_beams=3,
                                num_return_sequences=2, do_sample=do_sample, eos_token_id=EOS)
    np.testing.assert_array_equal(cpu.sequences, plain.sequences)
    np.testing.assert_array_equal(cpu.num_new_tokens, plain.num_new_tokens)
    # Scores are sums of <= 10 float32 log-probs of logits that differ by round-off only.
    np.testing.assert_allclose(cpu.sequences_scores, plain.sequences_scores, rtol=1e-5, atol=1e-5)

