"""Speculative (assisted) and prompt-lookup decoding: greedy output equals plain greedy (several configs, K in
{1, 3, 5}, ragged batches, processors), batched rows accept different numbers of tokens, the sampling rule keeps
the target's distribution (chi-square against the exact target distribution, and a deliberately wrong rule is
caught), the fallback, compile-once, and bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gpt2_jax.config import GPT2Config
from gpt2_jax.generation import TRACE_COUNTS, GenerationConfig, generate
from gpt2_jax.generation.request import build_request
from gpt2_jax.generation.speculative import WARMUP_ITERATIONS, extend_with_layers, run_speculative_request
from gpt2_jax.model import GPT2LMHeadModel, init_params
from generation_helpers import EOS, TINY, frequent_token, left_pad, prompts, tiny_params

DRAFT = TINY.replace(n_layer=1)
ODD = GPT2Config(vocab_size=96, n_positions=64, n_embd=24, n_layer=2, n_head=3, n_inner=40, bos_token_id=1,
                 eos_token_id=2, pad_token_id=3, initializer_range=0.3)


def pair(kind: str):
    """(target params, target config, draft params, draft config)."""
    if kind == "independent":  # a random draft: acceptance near zero
        return tiny_params(), TINY, tiny_params(1, DRAFT), DRAFT
    if kind == "agreeing":  # the draft plus a block with small output projections: partial agreement
        draft = tiny_params(2, DRAFT)
        target, cfg = extend_with_layers(draft, DRAFT, 1, 0.25, jax.random.PRNGKey(5))
        return target, cfg, draft, DRAFT
    if kind == "odd":
        draft_cfg = ODD.replace(n_layer=1)
        draft = init_params(jax.random.PRNGKey(3), draft_cfg)
        target, cfg = extend_with_layers(draft, draft_cfg, 2, 0.3, jax.random.PRNGKey(4))
        return target, cfg, draft, draft_cfg
    raise ValueError(kind)


def ragged():
    return left_pad([prompts(1, 9, seed=3)[0], prompts(1, 4, seed=4)[0], prompts(1, 6, seed=5)[0],
                     prompts(1, 2, seed=6)[0]])


@pytest.mark.parametrize("kind", ["independent", "agreeing", "odd"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy(kind, k):
    target, cfg, draft, draft_cfg = pair(kind)
    ids, mask = ragged()
    eos = frequent_token(seed=0, step=6, length=6) if kind == "independent" else ()
    kwargs = dict(max_new_tokens=14, eos_token_id=eos, min_new_tokens=2)
    plain = generate(target, ids, mask, model_config=cfg, **kwargs)
    spec = generate(target, ids, mask, model_config=cfg, assistant_params=draft, assistant_config=draft_cfg,
                    num_assistant_tokens=k, assistant_fallback=False, **kwargs)
    np.testing.assert_array_equal(spec.sequences, plain.sequences)
    np.testing.assert_array_equal(spec.num_new_tokens, plain.num_new_tokens)
    if kind != "independent":
        assert spec.acceptance_rate > 0.2, spec.acceptance_rate


def test_rows_accept_different_numbers_of_tokens():
    target, cfg, draft, draft_cfg = pair("agreeing")
    ids, mask = ragged()
    spec = generate(target, ids, mask, model_config=cfg, assistant_params=draft, assistant_config=draft_cfg,
                    num_assistant_tokens=4, assistant_fallback=False, max_new_tokens=20, eos_token_id=())
    assert len(set(spec.num_accepted.tolist())) > 1, spec.num_accepted
    assert (spec.num_accepted <= spec.num_drafted).all()


def test_speculative_greedy_with_processors_equals_plain_greedy():
    target, cfg, draft, draft_cfg = pair("agreeing")
    ids, mask = ragged()
    toks = generate(target, ids, mask, model_config=cfg, max_new_tokens=6, eos_token_id=()).new_tokens()
    kwargs = dict(max_new_tokens=12, eos_token_id=toks[1][4], min_new_tokens=3, repetition_penalty=1.4,
                  no_repeat_ngram_size=2, bad_words_ids=[[toks[0][2]], [toks[2][0], toks[2][1]]],
                  sequence_bias=[[[toks[3][1]], 2.0]], exponential_decay_length_penalty=(4, 1.5),
                  forced_eos_token_id=toks[0][0])
    plain = generate(target, ids, mask, model_config=cfg, **kwargs)
    spec = generate(target, ids, mask, model_config=cfg, assistant_params=draft, assistant_config=draft_cfg,
                    num_assistant_tokens=3, assistant_fallback=False, **kwargs)
    np.testing.assert_array_equal(spec.sequences, plain.sequences)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_prompt_lookup_equals_plain_greedy(n):
    cycle = [10, 20, 30, 40, 50, 60]
    rows = [cycle * 2 + cycle[:3], prompts(1, 7, seed=9)[0].tolist(), (cycle[::-1] * 2)[:9]]
    ids, mask = left_pad(rows)
    plain = generate(tiny_params(), ids, mask, model_config=TINY, max_new_tokens=20, eos_token_id=())
    look = generate(tiny_params(), ids, mask, model_config=TINY, max_new_tokens=20, eos_token_id=(),
                    prompt_lookup_num_tokens=n, assistant_fallback=False)
    np.testing.assert_array_equal(look.sequences, plain.sequences)
    assert look.num_accepted.sum() > 0  # greedy tiny models loop: copies from the row are accepted


def test_the_fallback_stops_drafting_when_acceptance_collapses():
    target, cfg, draft, draft_cfg = pair("independent")
    ids = prompts(1, 5, seed=1)
    plain = generate(target, ids, model_config=cfg, max_new_tokens=30, eos_token_id=())
    spec = generate(target, ids, model_config=cfg, assistant_params=draft, assistant_config=draft_cfg,
                    num_assistant_tokens=3, max_new_tokens=30, eos_token_id=())
    np.testing.assert_array_equal(spec.sequences, plain.sequences)
    assert spec.num_drafted.sum() <= (WARMUP_ITERATIONS + 1) * 3  # drafting stopped after the warm-up


def test_speculative_compiles_once_per_bucket():
    target, cfg, draft, draft_cfg = pair("agreeing")
    before = TRACE_COUNTS["speculative"]
    for length, budget, penalty in [(3, 5, 1.0), (9, 12, 1.3), (14, 7, 0.8)]:
        generate(target, prompts(2, length, seed=length), model_config=cfg, assistant_params=draft,
                 assistant_config=draft_cfg, num_assistant_tokens=3, max_new_tokens=budget,
                 repetition_penalty=penalty, eos_token_id=())
    assert TRACE_COUNTS["speculative"] - before == 1


def test_bad_assistants_and_values_fail_before_compiling():
    before = dict(TRACE_COUNTS)
    ids = prompts(1, 4)
    other_vocab = TINY.replace(vocab_size=100, n_layer=1)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(tiny_params(), ids, model_config=TINY, assistant_params=tiny_params(0, other_vocab),
                 assistant_config=other_vocab)
    other_eos = DRAFT.replace(eos_token_id=5)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(tiny_params(), ids, model_config=TINY, assistant_params=tiny_params(1, DRAFT),
                 assistant_config=other_eos)
    with pytest.raises(ValueError, match="family|GPT2Config"):
        generate(tiny_params(), ids, model_config=TINY, assistant_params=tiny_params(1, DRAFT),
                 assistant_config={"vocab_size": 96})
    with pytest.raises(ValueError, match="num_assistant_tokens"):
        generate(tiny_params(), ids, model_config=TINY, assistant_params=tiny_params(1, DRAFT),
                 assistant_config=DRAFT, num_assistant_tokens=0)
    with pytest.raises(ValueError, match="both"):
        generate(tiny_params(), ids, model_config=TINY, assistant_params=tiny_params(1, DRAFT))
    with pytest.raises(ValueError, match="beam"):
        generate(tiny_params(), ids, model_config=TINY, prompt_lookup_num_tokens=2, num_beams=2)
    assert dict(TRACE_COUNTS) == before


# The sampling rule keeps the target's distribution -----------------------------------------------------------------
SMALL = GPT2Config(vocab_size=8, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=1,
                   pad_token_id=1, initializer_range=0.6)
PROMPT = [2, 5, 3]
TEMPERATURE = 0.8
DRAWS = 20000


def exact_joint(params, config: GPT2Config, steps: int) -> np.ndarray:
    """The target's exact joint distribution of the next ``steps`` tokens (processed: temperature), ``[V^steps]``."""
    vocab = config.vocab_size
    seqs = np.asarray(list(itertools.product(range(vocab), repeat=steps)))  # [V^steps, steps]
    ids = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], axis=1)
    logits = GPT2LMHeadModel(config).apply({"params": params}, jnp.asarray(ids)).logits  # [N, T, V]
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64) / TEMPERATURE, axis=-1)
    start = len(PROMPT) - 1
    total = sum(np.asarray(logp)[np.arange(len(seqs)), start + j, seqs[:, j]] for j in range(steps))
    return np.exp(total)


def chi_square_p(samples: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's goodness of fit (cells with expected count < 5 pooled into one)."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    statistic = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return float(stats.chi2.sf(statistic, keep.sum() - 1))


def joint_index(tokens: np.ndarray, vocab: int) -> np.ndarray:
    return sum(tokens[:, j] * vocab ** (tokens.shape[1] - 1 - j) for j in range(tokens.shape[1]))


@pytest.fixture(scope="module")
def small_models():
    target = init_params(jax.random.PRNGKey(11), SMALL)
    draft = init_params(jax.random.PRNGKey(12), SMALL)  # an independent draft: q far from p
    return target, draft


def _sampled(target, draft, residual: bool, steps: int = 3, lookup: bool = False):
    ids = np.tile(PROMPT, (DRAWS, 1))
    config = GenerationConfig(max_new_tokens=steps, do_sample=True, temperature=TEMPERATURE, eos_token_id=(),
                              num_assistant_tokens=2, assistant_fallback=False,
                              prompt_lookup_num_tokens=2 if lookup else None)
    request = build_request(target, SMALL, ids, None, config)
    out = run_speculative_request(target, request, jax.random.key(7), assistant_params=None if lookup else draft,
                                  assistant_config=None if lookup else SMALL, residual=residual)
    return out.sequences[:, len(PROMPT):], out


def test_speculative_sampling_preserves_the_target_distribution(small_models):
    """Chi-square of the first three sampled tokens (512 cells: accepted, rejected and bonus tokens all occur)
    against the target's exact distribution. The threshold p < 1e-6 makes a false failure a one-in-a-million
    event for a correct sampler; the wrong rule below fails it by a wide margin."""
    target, draft = small_models
    probs = exact_joint(target, SMALL, 3)
    tokens, out = _sampled(target, draft, residual=True)
    assert 0.05 < out.acceptance_rate < 0.95  # both branches of the rule are exercised
    assert chi_square_p(joint_index(tokens, SMALL.vocab_size), probs) > 1e-6
    # The target's own sampler passes the same test (the exact distribution is right).
    own = generate(target, np.tile(PROMPT, (DRAWS, 1)), key=jax.random.key(8), model_config=SMALL,
                   max_new_tokens=3, do_sample=True, temperature=TEMPERATURE, eos_token_id=())
    assert chi_square_p(joint_index(own.sequences[:, len(PROMPT):], SMALL.vocab_size), probs) > 1e-6


def test_a_wrong_acceptance_rule_fails_the_test(small_models):
    """Resampling from p instead of the residual max(p - q, 0) after a rejection (a classic mistake) is caught."""
    target, draft = small_models
    probs = exact_joint(target, SMALL, 3)
    tokens, _ = _sampled(target, draft, residual=False)
    assert chi_square_p(joint_index(tokens, SMALL.vocab_size), probs) < 1e-6


def test_prompt_lookup_sampling_preserves_the_target_distribution(small_models):
    target, _ = small_models
    probs = exact_joint(target, SMALL, 3)
    tokens, out = _sampled(target, None, residual=True, lookup=True)
    assert out.num_accepted.sum() > 0
    assert chi_square_p(joint_index(tokens, SMALL.vocab_size), probs) > 1e-6


@pytest.mark.parametrize("lookup", [False, True])
def test_speculative_scores_equal_plain_scores(lookup):
    """output_scores / output_logits / return_logprobs: for each generated token, the target's processed / raw
    logits that chose it and its log-probability, as plain decoding gives them (one K + 1-token pass vs one-token
    passes: float32 round-off apart)."""
    target, cfg, draft, draft_cfg = pair("agreeing")
    ids, mask = ragged()
    kwargs = dict(max_new_tokens=9, eos_token_id=(), repetition_penalty=1.3, output_scores=True, output_logits=True,
                  return_logprobs=True)
    plain = generate(target, ids, mask, model_config=cfg, **kwargs)
    drafting = dict(prompt_lookup_num_tokens=2) if lookup else dict(assistant_params=draft,
                                                                    assistant_config=draft_cfg, num_assistant_tokens=3)
    spec = generate(target, ids, mask, model_config=cfg, assistant_fallback=False, **drafting, **kwargs)
    np.testing.assert_array_equal(spec.sequences, plain.sequences)
    assert spec.scores.shape == plain.scores.shape == (4, 9, cfg.vocab_size)
    np.testing.assert_allclose(spec.scores, plain.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spec.logits, plain.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    assert not np.allclose(spec.scores, spec.logits)  # the penalty processed them
    if not lookup:
        assert spec.num_accepted.sum() > 0  # several tokens per pass were committed with their own scores


@pytest.mark.parametrize("lookup", [False, True])
def test_speculative_stop_strings_equal_plain_stop_strings(lookup):
    """Stop strings (matched across token boundaries) cut a row inside a verification pass at the first committed
    token that completes one, as plain decoding does token by token."""
    from test_generation_processor_objects import tiny_hf_tokenizer

    hf_tok, pieces = tiny_hf_tokenizer()
    target, cfg, draft, draft_cfg = pair("agreeing")
    ids, mask = ragged()
    kwargs = dict(max_new_tokens=12, eos_token_id=(), tokenizer=hf_tok)
    free = generate(target, ids, mask, model_config=cfg, **kwargs)
    new = free.new_tokens()
    # a string spanning generated tokens 3-4 of row 0 and one ending inside token 6 of row 2
    stops = [(pieces[new[0][3]][-1:] + pieces[new[0][4]]).decode("latin-1"),
             (pieces[new[2][5]] + pieces[new[2][6]][:1]).decode("latin-1")]
    plain = generate(target, ids, mask, model_config=cfg, stop_strings=stops, **kwargs)
    assert plain.num_new_tokens.min() < 12  # some row really stopped
    drafting = dict(prompt_lookup_num_tokens=3) if lookup else dict(assistant_params=draft,
                                                                    assistant_config=draft_cfg, num_assistant_tokens=4)
    spec = generate(target, ids, mask, model_config=cfg, stop_strings=stops, assistant_fallback=False, **drafting,
                    **kwargs)
    np.testing.assert_array_equal(spec.sequences, plain.sequences)
    np.testing.assert_array_equal(spec.num_new_tokens, plain.num_new_tokens)
