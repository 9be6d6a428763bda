"""Processor objects: each new processor against its Hugging Face ``LogitsProcessor`` / warper on the same logits
(hypothesis-driven shapes and values), greedy generations with the token-level processors and stop strings
token-equal to ``transformers`` ``generate`` on random weights (ragged batches included), per-step scores and raw
logits equal to Hugging Face's ``output_scores`` / ``output_logits``, user processors, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import struct
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TypicalLogitsWarper,
)

from gpt2_jax.generation import GenerationConfig, generate, processors
from gpt2_jax.generation.logits_processors import ProcessorState, SequenceBias, build_processors
from generation_helpers import EOS, PAD, TINY, frequent_token, hf_generate, left_pad, prompts, tiny_hf, tiny_params


def random_logits(seed: int, rows: int, vocab: int, scale: float) -> np.ndarray:
    return (np.random.RandomState(seed).randn(rows, vocab) * scale).astype(np.float32)


def assert_same_kept(ours, theirs, skip=None):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    check = np.ones(ours.shape, bool) if skip is None else ~skip
    np.testing.assert_array_equal(np.isneginf(ours)[check], np.isneginf(theirs)[check])
    kept = check & ~np.isneginf(theirs) & ~np.isneginf(ours)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6, atol=0)


def softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# A few shapes (each new shape compiles the eager ops again), any values.
shapes = dict(seed=st.integers(0, 2**31 - 1), rows=st.sampled_from([1, 3]), vocab=st.sampled_from([2, 7, 64, 257]),
              scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]), keep=st.integers(1, 3))


# Warpers on logits -------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(min_p=st.floats(0.0, 1.0), **shapes)
def test_min_p_matches_hf(min_p, seed, rows, vocab, scale, keep):
    x = random_logits(seed, rows, vocab, scale)
    ours = processors.min_p_filter(jnp.asarray(x), min_p, keep)
    theirs = MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(None, torch.tensor(x)).numpy()
    p = softmax64(x)
    skip = np.abs(p - min_p * p.max(-1, keepdims=True)) <= 1e-6 * p.max(-1, keepdims=True)  # round-off decides
    assert_same_kept(ours, theirs, skip)


@settings(max_examples=15, deadline=None)
@given(mass=st.floats(0.05, 0.99), **shapes)
def test_typical_p_matches_hf(mass, seed, rows, vocab, scale, keep):
    x = random_logits(seed, rows, vocab, scale)
    p = softmax64(x)
    logp = np.log(p)
    shifted = np.abs(-logp - (-(p * logp).sum(-1, keepdims=True)))
    order = np.argsort(shifted, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, -1), -1)
    if np.any(np.abs(cum - mass) < 1e-5):  # the cut point hangs on round-off: the whole row may differ
        return
    ours = processors.typical_filter(jnp.asarray(x), mass, keep)
    theirs = TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(None, torch.tensor(x)).numpy()
    assert_same_kept(ours, theirs)


@settings(max_examples=15, deadline=None)
@given(epsilon=st.floats(1e-4, 0.5), **shapes)
def test_epsilon_cutoff_matches_hf(epsilon, seed, rows, vocab, scale, keep):
    x = random_logits(seed, rows, vocab, scale)
    ours = processors.epsilon_filter(jnp.asarray(x), epsilon, keep)
    theirs = EpsilonLogitsWarper(epsilon, min_tokens_to_keep=keep)(None, torch.tensor(x)).numpy()
    skip = np.abs(softmax64(x) - epsilon) <= 1e-6 * epsilon
    assert_same_kept(ours, theirs, skip)


@settings(max_examples=15, deadline=None)
@given(epsilon=st.floats(1e-4, 0.5), **shapes)
def test_eta_cutoff_matches_hf(epsilon, seed, rows, vocab, scale, keep):
    x = random_logits(seed, rows, vocab, scale)
    ours = processors.eta_filter(jnp.asarray(x), epsilon, keep)
    theirs = EtaLogitsWarper(epsilon, min_tokens_to_keep=keep)(None, torch.tensor(x)).numpy()
    p = softmax64(x)
    entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(-1, keepdims=True)
    eta = np.minimum(epsilon, np.sqrt(epsilon) * np.exp(-entropy))
    skip = np.abs(p - eta) <= 1e-5 * eta  # the entropy's round-off moves eta
    assert_same_kept(ours, theirs, skip)


# Prefix processors on logits with token histories ------------------------------------------------------------------
def _state(ids: np.ndarray) -> ProcessorState:
    rows, length = ids.shape
    return ProcessorState(tokens=jnp.asarray(ids, jnp.int32), start=jnp.zeros((rows,), jnp.int32),
                          end=jnp.asarray(length), step=jnp.asarray(0), prompt_width=jnp.asarray(length),
                          max_new_tokens=jnp.asarray(10), seen=jnp.zeros((rows, 8), bool))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.sampled_from([1, 3]), length=st.sampled_from([3, 8]),
       words=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4), min_size=1, max_size=6),
       biases=st.lists(st.floats(-5, 5), min_size=6, max_size=6))
def test_sequence_bias_and_bad_words_match_hf(seed, rows, length, words, biases):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, 8, (rows, length))  # a small vocabulary, so prefixes really match
    x = random_logits(seed, rows, 8, 2.0)
    pairs = {tuple(w): float(b) for w, b in zip(words, biases)}
    ours = SequenceBias.build(list(pairs.items()), 8)(jnp.asarray(x), _state(ids))
    theirs = SequenceBiasLogitsProcessor([[list(k), v] for k, v in pairs.items()])(
        torch.tensor(ids), torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    cfg = GenerationConfig(bad_words_ids=words, eos_token_id=EOS)
    built = build_processors(cfg, eos_ids=(EOS,), vocab_size=8, prompt_width=length, tuning=None)
    out = jnp.asarray(x)
    for proc in built:
        if isinstance(proc, SequenceBias):
            out = proc(out, _state(ids))
    theirs = NoBadWordsLogitsProcessor(words, eos_token_id=EOS)(torch.tensor(ids), torch.tensor(x)).numpy()
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(theirs))


# Greedy generations against transformers generate ------------------------------------------------------------------
def ours(ids, mask=None, **kwargs):
    return generate(tiny_params(), ids, mask, model_config=TINY, **kwargs)


def ragged():
    return left_pad([prompts(1, 9, seed=3)[0], prompts(1, 4, seed=4)[0], prompts(1, 6, seed=5)[0]])


def _greedy_tokens(ids, mask, n):
    return ours(ids, mask, max_new_tokens=n, eos_token_id=()).new_tokens()


CASES = {
    "bad_words_ids": lambda toks: dict(bad_words_ids=[[toks[0][2]], [toks[1][0], toks[1][1]], [toks[2][3]]]),
    "sequence_bias": lambda toks: dict(sequence_bias=[[[toks[0][1]], -4.0], [[toks[1][2], toks[1][3]], 6.0],
                                                      [[toks[2][0]], 2.5]]),
    "suppress_tokens": lambda toks: dict(suppress_tokens=[toks[0][0], toks[1][1], toks[2][4]]),
    "begin_suppress_tokens": lambda toks: dict(begin_suppress_tokens=[toks[0][0], toks[1][0], toks[2][0]]),
    "forced_eos_token_id": lambda toks: dict(forced_eos_token_id=toks[0][3]),
    "exponential_decay_length_penalty": lambda toks: dict(exponential_decay_length_penalty=(2, 1.6)),
    "renormalize_logits": lambda toks: dict(renormalize_logits=True, min_new_tokens=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_with_processor_matches_hf_on_a_ragged_batch(name):
    ids, mask = ragged()
    kwargs = CASES[name](_greedy_tokens(ids, mask, 8))
    eos = frequent_token(seed=0, step=4, length=6)
    kwargs.setdefault("min_new_tokens", 0)
    out = ours(ids, mask, max_new_tokens=10, eos_token_id=eos, output_scores=True, output_logits=True, **kwargs)
    ref = hf_generate(ids, mask, max_new_tokens=10, eos_token_id=eos, output_logits=True, **kwargs)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    theirs = torch.stack(ref.scores, 1).numpy()
    assert out.scores.shape == theirs.shape
    np.testing.assert_array_equal(np.isneginf(out.scores), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(out.scores[finite], theirs[finite], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logits, torch.stack(ref.logits, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_forced_bos_matches_hf():
    ids = [[7], [9], [11]]  # a one-token prompt: Hugging Face forces the bos at the first step
    out = ours(ids, max_new_tokens=6, eos_token_id=(), forced_bos_token_id=50, begin_suppress_tokens=[5, 6])
    ref = hf_generate(np.asarray(ids), max_new_tokens=6, eos_token_id=None, forced_bos_token_id=50,
                      begin_suppress_tokens=[5, 6])
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    assert (out.sequences[:, 1] == 50).all()


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_scores_and_logits_match_hf(num_beams):
    ids = prompts(2, 6, seed=2)
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, repetition_penalty=1.3, sequence_bias=[[[10], 1.5]])
    out = ours(ids, eos_token_id=(), output_scores=True, output_logits=True, **kwargs)
    ref = hf_generate(ids, eos_token_id=None, output_logits=True, **kwargs)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    theirs = torch.stack(ref.scores, 1).numpy()
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(out.scores), finite)
    np.testing.assert_allclose(out.scores[finite], theirs[finite], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logits, torch.stack(ref.logits, 1).numpy(), rtol=1e-4, atol=1e-4)


# Stop strings ------------------------------------------------------------------------------------------------------
def tiny_hf_tokenizer():
    """A byte-level Hugging Face tokenizer over TINY's 96 ids: printable characters and a few multi-character
    tokens, so stop strings span token boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gpt2_jax.tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    pieces = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz .,"]
    pieces += [b"th", b"he", b"the", b" the", b"in", b"ing", b"an", b"and", b"er", b"re", b"on", b" a", b"st",
               b"op", b"sto", b"p.", b"en", b"es", b"or", b"te", b"ti", b"is", b"it", b"ou", b"ar", b"al", b"to",
               b"nd", b"ed", b"ha", b"at", b"ng", b"e ", b" s", b" t", b"s.", b"d,", b"ll"]
    pieces += [f"w{i}".encode() for i in range(TINY.vocab_size - len(pieces))]
    vocab = {"".join(b2u[c] for c in p): i for i, p in enumerate(pieces[: TINY.vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok), pieces


def test_stop_strings_match_hf_across_token_boundaries():
    hf_tok, pieces = tiny_hf_tokenizer()
    ids, mask = ragged()
    toks = _greedy_tokens(ids, mask, 10)
    # Strings that span a boundary between generated tokens 2-3 of row 0 and 4-5 of row 2, cut mid-token.
    text0 = pieces[toks[0][2]] + pieces[toks[0][3]]
    text2 = pieces[toks[2][4]] + pieces[toks[2][5]]
    stops = [text0[max(len(pieces[toks[0][2]]) - 1, 0):].decode("latin-1"),
             text2[-max(len(pieces[toks[2][5]]), 1) - 1:].decode("latin-1")]
    stops = [s for s in stops if s]
    # An eos id is set: without one, Hugging Face keeps writing real tokens after a row has stopped (it only pads
    # finished rows when an eos criterion exists); with one, stopped rows are padded, as ours always are.
    out = ours(ids, mask, max_new_tokens=10, eos_token_id=EOS, stop_strings=stops, tokenizer=hf_tok)
    ref = hf_generate(ids, mask, max_new_tokens=10, eos_token_id=EOS, stop_strings=stops, tokenizer=hf_tok)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    assert out.num_new_tokens.min() < 10  # some row really stopped


def test_stop_strings_with_the_gpt2_tokenizer_stop_at_the_string():
    """On GPT-2's own vocabulary: the check fires exactly at the tokens where a stop string ends inside the newest
    token (checked against plain byte-string search)."""
    from gpt2_jax.generation.stop_strings import stop_string_tables, vocab_token_bytes
    from gpt2_jax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    stops = ["d, th", "sign", "op s"]
    ids = tok.encode("Hello world, the stop sign is red, thanks")
    table = vocab_token_bytes(tok, 50257)
    tables = stop_string_tables(tok, stops, 50257)
    buffer = jnp.asarray([ids], jnp.int32)
    for end in range(1, len(ids) + 1):
        text = b"".join(table[i] for i in ids[:end])
        newest = len(text) - len(table[ids[end - 1]])
        expected = any(text.find(s.encode(), max(newest - len(s) + 1, 0)) >= 0 for s in stops)
        got = bool(tables.matches(buffer, jnp.zeros((1,), jnp.int32), end)[0])
        assert got == expected, (end, text)


# User processors and bad input -------------------------------------------------------------------------------------
@struct.dataclass
class BanToken:
    """A user processor: ``-inf`` at one (traced) id."""

    token: jax.Array

    def __call__(self, logits, state):
        return logits.at[:, self.token].set(-jnp.inf)


def test_user_processor_objects_are_applied_and_traced():
    from gpt2_jax.generation import TRACE_COUNTS

    ids = prompts(2, 5, seed=8)
    plain = ours(ids, max_new_tokens=6, eos_token_id=())
    first = int(plain.sequences[0, 5])
    banned = ours(ids, max_new_tokens=6, eos_token_id=(), logits_processor=[BanToken(jnp.asarray(first))])
    assert banned.sequences[0, 5] != first
    same = ours(ids, max_new_tokens=6, eos_token_id=(), suppress_tokens=[first])
    np.testing.assert_array_equal(banned.sequences[0, 5], same.sequences[0, 5])
    before = TRACE_COUNTS["sample"]
    ours(ids, max_new_tokens=6, eos_token_id=(), logits_processor=[BanToken(jnp.asarray(first + 1))])
    assert TRACE_COUNTS["sample"] == before  # the id is traced


def test_changing_processor_values_does_not_recompile():
    from gpt2_jax.generation import TRACE_COUNTS

    cfg = TINY.replace(n_positions=70)  # fresh programs
    p = tiny_params(0, cfg)
    before = TRACE_COUNTS["sample"]
    for i, mp in enumerate((0.05, 0.2, 0.5)):
        generate(p, prompts(2, 3 + i), key=jax.random.key(i), model_config=cfg, do_sample=True, min_p=mp,
                 typical_p=0.9 - 0.1 * i, epsilon_cutoff=0.01 * (i + 1), eta_cutoff=0.02, sequence_bias=[[[i + 4], 1.0]],
                 suppress_tokens=[i + 10], exponential_decay_length_penalty=(i, 1.1 + i), max_new_tokens=4 + i)
    assert TRACE_COUNTS["sample"] - before == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(sequence_bias={(): 1.0}), "sequence_bias"),
    (dict(exponential_decay_length_penalty=(1,)), "exponential_decay_length_penalty"),
    (dict(num_assistant_tokens=0), "num_assistant_tokens"),
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
])
def test_config_rejects_bad_processor_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_bad_input_fails_before_compiling():
    from gpt2_jax.generation import TRACE_COUNTS

    before = dict(TRACE_COUNTS)
    ids = prompts(1, 4)
    with pytest.raises(ValueError, match="tokenizer"):
        ours(ids, stop_strings=["ab"])
    with pytest.raises(ValueError, match="suppress_tokens"):
        ours(ids, suppress_tokens=[TINY.vocab_size])
    with pytest.raises(ValueError, match="bad_words_ids"):
        ours(ids, bad_words_ids=[[1, TINY.vocab_size + 3]])
    assert dict(TRACE_COUNTS) == before
