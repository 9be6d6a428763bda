"""Token-for-token parity of our generation with ``transformers`` PyTorch ``generate`` on the same random weights.

Greedy, beam search (2 and 4 beams, length penalties, every ``early_stopping``), repetition penalty, no-repeat
n-grams, eos (one or several ids) with ``min_new_tokens``, left-padded batches, and per-token log-probs.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_jax.generation import GenerationConfig, generate
from generation_helpers import EOS, PAD, TINY, frequent_token, hf_generate, left_pad, prompts, tiny_params


def ours(ids, mask=None, **kwargs):
    return generate(tiny_params(), ids, mask, model_config=TINY, **kwargs)


def assert_same_tokens(out, ref):
    expected = ref.sequences.numpy()
    assert out.sequences.shape == expected.shape, (out.sequences, expected)
    np.testing.assert_array_equal(out.sequences, expected)


def test_greedy_matches_hf_token_for_token():
    ids = prompts(3, 7)
    out = ours(ids, max_new_tokens=20, eos_token_id=())
    ref = hf_generate(ids, max_new_tokens=20, eos_token_id=None, min_new_tokens=0)
    assert_same_tokens(out, ref)
    assert (out.num_new_tokens == 20).all()


def test_greedy_logprobs_match_hf_transition_scores():
    ids = prompts(2, 5, seed=1)
    out = ours(ids, max_new_tokens=8, eos_token_id=(), return_logprobs=True, repetition_penalty=1.2)
    ref = hf_generate(ids, max_new_tokens=8, eos_token_id=None, repetition_penalty=1.2)
    assert_same_tokens(out, ref)
    model = __import__("generation_helpers").tiny_hf()
    scores = model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True).numpy()
    np.testing.assert_allclose(out.logprobs, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [2, 4])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_matches_hf(num_beams, early_stopping):
    ids = prompts(3, 6, seed=2)
    eos = frequent_token(seed=2, step=4, length=6)  # a token beams really produce, so hypotheses finish early
    for length_penalty in (1.0, 0.5, 2.0, -1.0):
        kwargs = dict(max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty,
                      early_stopping=early_stopping, num_return_sequences=num_beams // 2 + 1)
        out = ours(ids, eos_token_id=eos, **kwargs)
        ref = hf_generate(ids, eos_token_id=eos, **kwargs)
        assert_same_tokens(out, ref)
        np.testing.assert_allclose(out.sequences_scores, ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)


def test_beam_search_several_eos_ids_and_padded_batch():
    rows = [prompts(1, 9, seed=3)[0], prompts(1, 4, seed=4)[0], prompts(1, 6, seed=5)[0]]
    ids, mask = left_pad(rows)
    eos = [frequent_token(seed=3, step=2, length=6), frequent_token(seed=3, step=5, length=6), EOS]
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=3, length_penalty=1.5)
    out = ours(ids, mask, eos_token_id=eos, **kwargs)
    ref = hf_generate(ids, mask, eos_token_id=eos, **kwargs)
    assert_same_tokens(out, ref)
    np.testing.assert_allclose(out.sequences_scores, ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    ids = prompts(2, 8, seed=6)
    out = ours(ids, max_new_tokens=16, repetition_penalty=penalty, eos_token_id=())
    ref = hf_generate(ids, max_new_tokens=16, repetition_penalty=penalty, eos_token_id=None)
    assert_same_tokens(out, ref)
    out = ours(ids, max_new_tokens=10, repetition_penalty=penalty, num_beams=2, eos_token_id=())
    ref = hf_generate(ids, max_new_tokens=10, repetition_penalty=penalty, num_beams=2, eos_token_id=None)
    assert_same_tokens(out, ref)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_matches_hf(size):
    ids = prompts(2, 6, seed=7)
    out = ours(ids, max_new_tokens=24, no_repeat_ngram_size=size, eos_token_id=())
    ref = hf_generate(ids, max_new_tokens=24, no_repeat_ngram_size=size, eos_token_id=None)
    assert_same_tokens(out, ref)
    # The constraint holds: no n-gram occurs twice in a row.
    for row in out.sequences:
        grams = [tuple(row[i : i + size]) for i in range(len(row) - size + 1)]
        assert len(grams) == len(set(grams))
    out = ours(ids, max_new_tokens=12, no_repeat_ngram_size=size, num_beams=4, eos_token_id=())
    ref = hf_generate(ids, max_new_tokens=12, no_repeat_ngram_size=size, num_beams=4, eos_token_id=None)
    assert_same_tokens(out, ref)


def test_eos_stops_rows_and_pads_after():
    ids = prompts(3, 6)
    eos = frequent_token(step=3)
    out = ours(ids, max_new_tokens=15, eos_token_id=eos)
    ref = hf_generate(ids, max_new_tokens=15, eos_token_id=eos)
    assert_same_tokens(out, ref)
    first = out.sequences[0, 6:]
    stop = int(np.argmax(first == eos))  # the first eos of row 0 (at step 3 or earlier)
    assert first[stop] == eos and stop <= 3 and (first[stop + 1 :] == PAD).all()
    assert out.num_new_tokens[0] == stop + 1


@pytest.mark.parametrize("min_new_tokens", [2, 6])
def test_min_new_tokens_with_eos_matches_hf(min_new_tokens):
    ids = prompts(3, 6)
    eos = [frequent_token(step=1), frequent_token(step=3)]
    out = ours(ids, max_new_tokens=12, eos_token_id=eos, min_new_tokens=min_new_tokens)
    ref = hf_generate(ids, max_new_tokens=12, eos_token_id=eos, min_new_tokens=min_new_tokens)
    assert_same_tokens(out, ref)
    assert (out.num_new_tokens >= min_new_tokens).all()
    out = ours(ids, max_new_tokens=10, eos_token_id=eos, min_new_tokens=min_new_tokens, num_beams=2)
    ref = hf_generate(ids, max_new_tokens=10, eos_token_id=eos, min_new_tokens=min_new_tokens, num_beams=2)
    assert_same_tokens(out, ref)


def test_left_padded_batch_matches_hf_and_rows_alone():
    rows = [prompts(1, 11, seed=8)[0], prompts(1, 3, seed=9)[0], prompts(1, 7, seed=10)[0]]
    ids, mask = left_pad(rows)
    eos = frequent_token(seed=8, step=6)
    config = GenerationConfig(max_new_tokens=14, eos_token_id=eos, repetition_penalty=1.1)
    out = ours(ids, mask, config=config)
    ref = hf_generate(ids, mask, max_new_tokens=14, eos_token_id=eos, repetition_penalty=1.1)
    assert_same_tokens(out, ref)
    new = out.new_tokens()
    for i, row in enumerate(rows):
        alone = ours(row[None, :], config=config)
        assert alone.new_tokens()[0] == new[i]
        ref_alone = hf_generate(row[None, :], max_new_tokens=14, eos_token_id=eos, repetition_penalty=1.1)
        assert ref_alone.sequences[0, len(row):].tolist()[: len(new[i])] == new[i]


def test_max_length_is_a_total_budget_like_hf():
    ids = prompts(2, 6, seed=11)
    out = ours(ids, max_length=15, eos_token_id=())
    ref = hf_generate(ids, max_length=15, eos_token_id=None)
    assert_same_tokens(out, ref)
    assert out.sequences.shape == (2, 15)
