"""Logits processors against Hugging Face's (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``RepetitionPenaltyLogitsProcessor``, ``NoRepeatNGramLogitsProcessor``,
``MinNewTokensLengthLogitsProcessor``) on the same logits, plus properties and config validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt2_jax.generation import GenerationConfig, processors

VOCAB = 64


@functools.partial(jax.jit, static_argnames=("min_keep",))
def _warp(logits, temp, top_k, top_p, min_keep=1):
    return processors.top_k_top_p_filter(processors.temperature(logits, temp), top_k, top_p, min_keep)


def hf_warp(logits: np.ndarray, temp: float, top_k: int, top_p: float, min_keep: int = 1) -> np.ndarray:
    """Hugging Face's warpers as ``generate`` builds them (each only when enabled)."""
    scores = torch.tensor(logits)
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    if temp != 1.0:
        scores = TemperatureLogitsWarper(temp)(ids, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(ids, scores)
    return scores.numpy()


def ambiguous_top_p(logits: np.ndarray, temp: float, top_k: int, top_p: float) -> np.ndarray:
    """Positions whose top-p fate hangs on float32 round-off (ascending cumulative probability within 1e-5 of
    ``1 - top_p``): the two implementations may sum in a different order."""
    x = logits.astype(np.float64) / temp
    if top_k:
        kth = np.sort(x, axis=-1)[:, -min(top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(x, axis=-1)
    xs = np.take_along_axis(x, order, axis=-1)
    p = np.exp(xs - xs.max(-1, keepdims=True))
    cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    near = np.abs(cum - (1 - top_p)) < 1e-5
    out = np.zeros_like(near)
    np.put_along_axis(out, order, near, axis=-1)
    return out


def assert_same_filter(ours, theirs, skip=None):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    check = np.ones(ours.shape, bool) if skip is None else ~skip
    np.testing.assert_array_equal(np.isneginf(ours)[check], np.isneginf(theirs)[check])
    kept = check & ~np.isneginf(theirs) & ~np.isneginf(ours)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6, atol=1e-30)  # XLA flushes denormals


@pytest.mark.parametrize("temp", [1.0, 0.5, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 5, 40, VOCAB, 1000])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.6, 0.1, 1e-6])
def test_warpers_match_hf(temp, top_k, top_p):
    logits = np.random.RandomState(top_k).randn(4, VOCAB).astype(np.float32) * 3
    ours = _warp(jnp.asarray(logits), temp, top_k, top_p)
    theirs = hf_warp(logits, temp, top_k, top_p)
    assert_same_filter(ours, theirs, ambiguous_top_p(logits, temp, top_k, top_p) if top_p < 1 else None)


@pytest.mark.parametrize("min_keep", [2, 3])
def test_warpers_min_tokens_to_keep_match_hf(min_keep):
    logits = np.random.RandomState(0).randn(3, VOCAB).astype(np.float32) * 4
    for top_k, top_p in [(1, 1.0), (0, 1e-4), (1, 1e-4), (10, 0.3)]:
        ours = _warp(jnp.asarray(logits), 1.0, top_k, top_p, min_keep=min_keep)
        assert_same_filter(ours, hf_warp(logits, 1.0, top_k, top_p, min_keep))
        assert (~np.isneginf(np.asarray(ours))).sum(-1).min() >= min_keep


@settings(max_examples=60, deadline=None)
@given(
    logits=hnp.arrays(np.float32, (2, 24), elements=st.floats(-20, 20, width=32), unique=True),
    temp=st.floats(0.05, 5.0),
    top_k=st.integers(0, 30),
    top_p=st.floats(1e-3, 1.0),
)
def test_warpers_match_hf_property(logits, temp, top_k, top_p):
    ours = _warp(jnp.asarray(logits), np.float32(temp), top_k, np.float32(top_p))
    theirs = hf_warp(logits, float(np.float32(temp)), top_k, float(np.float32(top_p)))
    skip = ambiguous_top_p(logits, float(np.float32(temp)), top_k, float(np.float32(top_p)))
    assert_same_filter(ours, theirs, skip if top_p < 1 else None)
    kept = ~np.isneginf(np.asarray(ours))
    assert kept.sum(-1).min() >= 1  # never everything removed
    best = np.argmax(logits, axis=-1)
    assert kept[np.arange(2), best].all()  # the most likely token always survives


@pytest.mark.parametrize("sizes", [None, (16,), (16, 512), ()])
def test_candidate_tiers_match_hf_on_a_large_vocabulary(sizes):
    """The threshold from the largest 16 / 256 / 512 / 4096 logits, or the full sort: all equal HF's warpers."""
    vocab, rng = 5000, np.random.RandomState(9)
    logits = np.concatenate([rng.randn(2, vocab) * 4, rng.randn(2, vocab) * 0.3]).astype(np.float32)  # peaked, flat
    f = jax.jit(lambda x, k, p: processors.top_k_top_p_filter(x, k, p, sizes=sizes))
    for top_k, top_p in [(0, 0.9), (0, 0.5), (10, 1.0), (10, 0.8), (300, 0.95), (vocab, 0.999), (0, 0.02)]:
        ours = f(jnp.asarray(logits), top_k, np.float32(top_p))
        skip = ambiguous_top_p(logits, 1.0, top_k, top_p) if top_p < 1 else None
        assert_same_filter(ours, hf_warp(logits, 1.0, top_k, top_p), skip)


def test_candidate_threshold_knows_when_it_is_not_enough():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 3000).astype(np.float32) * 0.3)  # a flat distribution
    _, exact = processors._candidate_threshold(x, 0, 0.9, 1, 256)
    assert not np.asarray(exact).any()  # the 0.9 nucleus of a flat distribution holds far more than 256 tokens
    _, exact = processors._candidate_threshold(x, 0, 0.05, 1, 256)
    assert np.asarray(exact).all()
    _, exact = processors._candidate_threshold(x, 300, 1.0, 1, 256)
    assert not np.asarray(exact).any()
    tied = jnp.zeros((1, 3000)).at[0, 0].set(1.0)  # top-k ties reaching past the candidates
    _, exact = processors._candidate_threshold(tied, 5, 1.0, 1, 256)
    assert not np.asarray(exact).any()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA CPU's compiled HLO")
def test_fast_tier_compiles_to_a_top_k_not_a_sort():
    """A full sort of GPT-2's vocabulary costs ~9 ms a row; the candidate tier must stay a TopK."""
    x = jax.ShapeDtypeStruct((2, 50257), jnp.float32)
    knobs = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32))
    f = jax.jit(lambda x, k, p: processors._candidate_threshold(x, k, p, 1, 256))
    text = f.lower(x, *knobs).compile().as_text()
    assert "sort(" not in text and "TopK" in text


def test_sample_draws_from_the_distribution():
    logits = jnp.log(jnp.asarray([0.5, 0.0, 0.3, 0.2]))
    draws = jax.vmap(processors.sample, in_axes=(0, None))(jax.random.split(jax.random.key(0), 20000), logits)
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.0, 0.3, 0.2], atol=0.015)
    assert freq[1] == 0


def test_top_k_keeps_ties_like_hf():
    logits = np.asarray([[1.0, 3.0, 3.0, 3.0, 0.5, -2.0]], np.float32)
    ours = processors.top_k_filter(jnp.asarray(logits), 2)
    np.testing.assert_array_equal(np.isneginf(np.asarray(ours)), np.isneginf(hf_warp(logits, 1.0, 2, 1.0)))
    assert (~np.isneginf(np.asarray(ours))).sum() == 3


def test_separate_filters_equal_combined():
    logits = jnp.asarray(np.random.RandomState(1).randn(3, VOCAB).astype(np.float32))
    both = processors.top_k_top_p_filter(logits, 12, 0.7)
    chained = processors.top_p_filter(processors.top_k_filter(logits, 12), 0.7)
    np.testing.assert_array_equal(np.asarray(both), np.asarray(chained))


@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_repetition_penalty_matches_hf(penalty):
    rng = np.random.RandomState(2)
    logits = rng.randn(3, VOCAB).astype(np.float32)
    ids = rng.randint(0, VOCAB, (3, 10))
    seen = processors.seen_mask(jnp.asarray(ids), jnp.ones(ids.shape, bool), VOCAB)
    ours = processors.repetition_penalty(jnp.asarray(logits), seen, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6, atol=0)


def test_repetition_penalty_skips_padding_like_hf():
    rng = np.random.RandomState(3)
    logits = rng.randn(2, VOCAB).astype(np.float32)
    ids = rng.randint(0, VOCAB, (2, 8))
    pad_lengths = torch.tensor([3, 0])
    valid = np.arange(8)[None, :] >= pad_lengths.numpy()[:, None]
    seen = processors.seen_mask(jnp.asarray(ids), jnp.asarray(valid), VOCAB)
    ours = processors.repetition_penalty(jnp.asarray(logits), seen, 1.4)
    hf = RepetitionPenaltyLogitsProcessor(1.4, prompt_ignore_length=pad_lengths)
    np.testing.assert_allclose(np.asarray(ours), hf(torch.tensor(ids), torch.tensor(logits)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(size):
    rng = np.random.RandomState(size)
    ids = rng.randint(0, 6, (4, 30))  # a small alphabet so n-grams repeat
    logits = rng.randn(4, VOCAB).astype(np.float32)
    for end in (1, size, 17, 30):
        banned = processors.no_repeat_ngram_banned(
            jnp.asarray(np.pad(ids, ((0, 0), (0, 5)))), jnp.zeros(4, jnp.int32), end, size, VOCAB
        )
        ours = np.where(np.asarray(banned), -np.inf, logits)
        theirs = NoRepeatNGramLogitsProcessor(size)(torch.tensor(ids[:, :end]), torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_no_repeat_ngram_ignores_left_padding():
    rng = np.random.RandomState(5)
    row = rng.randint(0, 5, 12)
    padded = np.concatenate([np.zeros(6, np.int64), row])  # six pad tokens (id 0) on the left
    alone = processors.no_repeat_ngram_banned(jnp.asarray(row[None]), jnp.zeros(1, jnp.int32), 12, 2, VOCAB)
    with_pad = processors.no_repeat_ngram_banned(jnp.asarray(padded[None]), jnp.asarray([6]), 18, 2, VOCAB)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(with_pad))


@pytest.mark.parametrize("generated", [0, 2, 5])
def test_min_new_tokens_matches_hf(generated):
    logits = np.random.RandomState(6).randn(2, VOCAB).astype(np.float32)
    eos = [3, 9]
    eos_mask = jnp.zeros(VOCAB, bool).at[jnp.asarray(eos)].set(True)
    ours = processors.suppress_tokens(jnp.asarray(logits), eos_mask, generated < 4)
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=5, min_new_tokens=4, eos_token_id=eos)
    theirs = hf(torch.zeros((2, 5 + generated), dtype=torch.long), torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(np.asarray(ours), theirs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be > 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences .3. must be <= num_beams .2."),
        (dict(num_return_sequences=2), "needs do_sample=True or num_beams > 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=-2.0), "repetition_penalty must be > 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens .5. exceeds max_new_tokens .3."),
        (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
        (dict(max_length=0), "max_length must be a positive integer or None"),
        (dict(eos_token_id=[2, -1]), "eos_token_id must be non-negative"),
        (dict(eos_token_id="x"), "eos_token_id must hold ints"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_config_is_hashable_and_temperature_ignored_when_greedy():
    a = GenerationConfig(temperature=0.0)  # greedy ignores the temperature, as Hugging Face does
    assert hash(a) == hash(GenerationConfig(temperature=0.0))
    assert GenerationConfig(eos_token_id=[1, 2]).eos_token_id == (1, 2)
    assert a.replace(max_new_tokens=5).max_new_tokens == 5
