"""Logits processors with Hugging Face semantics, written for traced knobs (no recompiles when a value changes).

Every function takes ``logits [batch, vocab]`` (float32) and returns the processed logits of the same shape, with
removed tokens set to ``-inf``. The knobs (``penalty``, ``temperature``, ``top_k``, ``top_p``) may be Python numbers
or traced scalars; the "disabled" values (1.0, 0, 1.0) leave the logits unchanged, as Hugging Face does by not adding
the processor at all.

The order :func:`process_logits` applies them in is Hugging Face's: repetition penalty, no-repeat n-gram,
min-new-tokens, then (sampling only) temperature, top-k, top-p.

Differences from Hugging Face, on purpose: the repetition penalty and the n-gram ban only look at each row's real
tokens (``start`` marks where a left-padded row begins), so a padded row is processed exactly as the row alone.
(Hugging Face's repetition penalty also skips left padding; its n-gram ban also scans the padding.)

How top-k / top-p find their threshold is a backend choice (:class:`gpt2_jax.backend.Tuning`, argument ``tuning``;
default: the settings of JAX's default backend): on the CPU, candidate tiers behind ``lax.cond``
(``top_k_tiers``) with a matmul cumulative sum (``cumsum_by_matmul``); elsewhere one full sort. The kept sets
are the same up to float32 round-off in the cumulative sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import backend
from ..backend import Tuning

NEG_INF = float("-inf")


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL repetition penalty (``RepetitionPenaltyLogitsProcessor``).

    Args:
        logits: ``[batch, vocab]``.
        seen: ``[batch, vocab]`` bool, True for every token id already in the row.
        penalty: > 0; a seen token's logit ``x`` becomes ``x * penalty`` if ``x < 0`` else ``x / penalty``.
    """
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def seen_mask(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """``[batch, vocab]`` bool: which ids occur at the ``valid [batch, L]`` positions of ``tokens [batch, L]``."""
    batch = tokens.shape[0]
    index = jnp.where(valid, tokens, vocab_size)  # invalid positions scatter into a dropped extra column
    mask = jnp.zeros((batch, vocab_size + 1), bool).at[jnp.arange(batch)[:, None], index].set(True)
    return mask[:, :vocab_size]


def no_repeat_ngram_banned(tokens: jax.Array, start: jax.Array, end, ngram_size: int, vocab_size: int) -> jax.Array:
    """Tokens that would repeat an n-gram (``NoRepeatNGramLogitsProcessor``), as a ``[batch, vocab]`` bool mask.

    Args:
        tokens: ``[batch, L]`` buffer; row ``b``'s real tokens are ``tokens[b, start[b]:end]``.
        start: ``[batch]`` int, first real slot of each row (left padding before it is ignored).
        end: ``[]`` int, one past the last written slot (shared by the rows).
        ngram_size: static n >= 1.
        vocab_size: static vocabulary size.

    Returns:
        True for every token ``t`` such that ``(last n-1 tokens, t)`` already occurs in the row.
    """
    batch, length = tokens.shape
    n = ngram_size
    padded = jnp.pad(tokens, ((0, 0), (0, n)))  # [batch, L + n]
    # windows[j][b, i] = tokens[b, i + j]: the j-th token of the n-gram starting at slot i.
    windows = [jax.lax.dynamic_slice_in_dim(padded, j, length, axis=1) for j in range(n)]
    prefix = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(end - (n - 1), 0), n, axis=1)  # [batch, n]
    slot = jnp.arange(length)[None, :]
    match = (slot >= start[:, None]) & (slot + n <= end)  # the whole n-gram lies in the row's real tokens
    for j in range(n - 1):
        match &= windows[j] == prefix[:, j : j + 1]
    banned_ids = jnp.where(match, windows[n - 1], vocab_size)  # [batch, L]
    mask = jnp.zeros((batch, vocab_size + 1), bool).at[jnp.arange(batch)[:, None], banned_ids].set(True)
    return mask[:, :vocab_size]


def suppress_tokens(logits: jax.Array, token_mask: jax.Array, active) -> jax.Array:
    """``-inf`` at the ``token_mask [vocab]`` ids while ``active`` (``[]`` or ``[batch]`` bool) holds.

    With ``token_mask`` = the eos ids and ``active = new_tokens < min_new_tokens`` this is Hugging Face's
    ``MinNewTokensLengthLogitsProcessor``.
    """
    active = jnp.asarray(active)
    if active.ndim == 1:
        active = active[:, None]
    return jnp.where(active & token_mask[None, :], NEG_INF, logits)


def temperature(logits: jax.Array, temp) -> jax.Array:
    """``TemperatureLogitsWarper``: ``logits / temp`` (``temp`` > 0)."""
    return logits / temp


def _kth_largest(sorted_ascending: jax.Array, k: jax.Array) -> jax.Array:
    """``[batch, 1]``: the k-th largest value of each row (``k`` in [1, vocab], traced)."""
    vocab = sorted_ascending.shape[-1]
    index = jnp.broadcast_to(vocab - k, sorted_ascending.shape[:-1])[..., None]
    return jnp.take_along_axis(sorted_ascending, index.astype(jnp.int32), axis=-1)


def _clip_top_k(top_k, vocab: int, min_tokens_to_keep: int) -> jax.Array:
    """0 (disabled) -> vocab; otherwise ``clip(max(top_k, min_tokens_to_keep), 1, vocab)``, as HF does."""
    top_k = jnp.asarray(top_k, jnp.int32)
    return jnp.where(top_k > 0, jnp.clip(jnp.maximum(top_k, min_tokens_to_keep), 1, vocab), vocab)


def top_k_filter(logits: jax.Array, top_k, min_tokens_to_keep: int = 1) -> jax.Array:
    """``TopKLogitsWarper``: ``-inf`` below the k-th largest logit (ties kept); ``top_k = 0`` disables."""
    k = _clip_top_k(top_k, logits.shape[-1], min_tokens_to_keep)
    kth = _kth_largest(jnp.sort(logits, axis=-1), k)
    return jnp.where(logits < kth, NEG_INF, logits)


def _top_p_threshold(sorted_ascending: jax.Array, top_p, min_tokens_to_keep: int) -> jax.Array:
    """``[batch, 1]``: the smallest logit ``TopPLogitsWarper`` keeps, from the ascending-sorted logits.

    Hugging Face removes the sorted positions whose cumulative probability (summed in ascending order) is
    ``<= 1 - top_p``, except the last ``min_tokens_to_keep``. The cumulative sum never decreases, so the removed
    positions are a prefix and the kept ones are the values ``>=`` the first kept one.
    """
    vocab = sorted_ascending.shape[-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_ascending, axis=-1), axis=-1)  # [batch, vocab]
    remove = cumulative <= 1.0 - jnp.asarray(top_p, cumulative.dtype)
    remove = remove & (jnp.arange(vocab) < vocab - min_tokens_to_keep)
    first_kept = jnp.sum(remove, axis=-1, keepdims=True, dtype=jnp.int32)  # [batch, 1]
    return jnp.take_along_axis(sorted_ascending, first_kept, axis=-1)


def top_p_filter(logits: jax.Array, top_p, min_tokens_to_keep: int = 1) -> jax.Array:
    """``TopPLogitsWarper`` (nucleus filtering); ``top_p = 1`` disables (Hugging Face skips the warper then)."""
    threshold = _top_p_threshold(jnp.sort(logits, axis=-1), top_p, min_tokens_to_keep)
    filtered = jnp.where(logits < threshold, NEG_INF, logits)
    return jnp.where(jnp.asarray(top_p) < 1.0, filtered, logits)


#: Static candidate-set sizes tried before a full sort of the vocabulary (see :func:`top_k_top_p_filter`).
FAST_FILTER_SIZES = (256, 4096)


def _sorted_filter(x: jax.Array, top_k, top_p, min_tokens_to_keep: int) -> jax.Array:
    """Top-k then top-p over a full ascending sort, in Hugging Face's order of summation."""
    vocab = x.shape[-1]
    ascending = jnp.sort(x, axis=-1)  # [batch, vocab]
    kth = _kth_largest(ascending, _clip_top_k(top_k, vocab, min_tokens_to_keep))
    ascending = jnp.where(ascending < kth, NEG_INF, ascending)  # the top-k filtered logits, still sorted
    nucleus = _top_p_threshold(ascending, top_p, min_tokens_to_keep)
    threshold = jnp.where(jnp.asarray(top_p) < 1.0, jnp.maximum(kth, nucleus), kth)
    return jnp.where(x < threshold, NEG_INF, x)


def _pick(values: jax.Array, index: jax.Array) -> jax.Array:
    """``values[b, index[b]]`` as ``[batch, 1]``, by a masked reduction over the whole row.

    (Indexing ``lax.top_k``'s output directly lets XLA rewrite the top-k into a full sort of the input.)
    """
    hit = jnp.arange(values.shape[-1])[None, :] == index.reshape(-1, 1)
    return jnp.max(jnp.where(hit, values, NEG_INF), axis=-1, keepdims=True)


def _exclusive_cumsum(w: jax.Array, block: int = 64, by_matmul: bool = True) -> jax.Array:
    """``[batch, n]`` -> sums of the preceding entries (0 first).

    With ``by_matmul`` (:attr:`~gpt2_jax.backend.Tuning.cumsum_by_matmul`), by two triangular matmuls over
    ``block``-sized chunks at the highest precision: ``jnp.cumsum`` lowers to strided slices on CPU, which makes
    XLA turn the ``lax.top_k`` feeding it into a full sort of the vocabulary; matmuls keep the top-k intact.
    Otherwise ``jnp.cumsum`` of the entries shifted right by one.
    """
    if not by_matmul:
        shifted = jnp.pad(w[:, :-1], ((0, 0), (1, 0)))  # [batch, n]: w[:, j - 1], 0 at j = 0
        return jnp.cumsum(shifted, axis=-1)
    batch, n = w.shape
    block = block if n % block == 0 else n
    strict = jnp.triu(jnp.ones((block, block), w.dtype), k=1)  # strict[i, j] = 1 for i < j
    chunks = w.reshape(batch, n // block, block)
    within = jnp.einsum("bci,ij->bcj", chunks, strict, precision=jax.lax.Precision.HIGHEST)
    totals = chunks.sum(-1)  # [batch, n // block]
    offsets = jnp.einsum("bi,ij->bj", totals, jnp.triu(jnp.ones((n // block, n // block), w.dtype), k=1),
                         precision=jax.lax.Precision.HIGHEST)
    return (within + offsets[:, :, None]).reshape(batch, n)


def _candidate_threshold(x: jax.Array, top_k, top_p, min_tokens_to_keep: int, size: int,
                         cumsum_by_matmul: bool = True):
    """The top-k / top-p threshold from the ``size`` largest logits only (the cumulative sum by
    :func:`_exclusive_cumsum`, ``by_matmul=cumsum_by_matmul``).

    Returns ``(threshold [batch, 1], exact [batch])``; ``exact`` is False where the kept set may reach beyond the
    candidates (top-k ties past ``size``, or a nucleus wider than ``size`` tokens), and the caller falls back.

    With descending probabilities ``q_1 >= q_2 >= ...``, Hugging Face's ascending cumulative sum at rank ``j`` is
    ``1 - S_{j-1}`` (``S`` the descending prefix sums), so rank ``j`` is removed iff ``S_{j-1} >= top_p``: the kept
    ranks are a prefix, at least ``min_tokens_to_keep`` long.
    """
    vocab = x.shape[-1]
    values = jax.lax.top_k(x, size)[0]  # [batch, size], descending
    k = _clip_top_k(top_k, vocab, min_tokens_to_keep)
    top_k_on = jnp.asarray(top_k) > 0
    rank = jnp.broadcast_to(jnp.minimum(k, size) - 1, values.shape[:-1])
    kth = jnp.where(top_k_on, _pick(values, rank), NEG_INF)  # [batch, 1]
    exact = jnp.where(top_k_on, (k <= size) & (jnp.sum(x >= kth, axis=-1) <= size), True)
    # Probabilities of the (top-k filtered) distribution: normalised over every kept token.
    peak = jnp.max(values, axis=-1, keepdims=True)  # (a slice of the top-k output would turn it into a sort)
    kept_values = jnp.where(values >= kth, values, NEG_INF)
    weights = jnp.exp(kept_values - peak)  # [batch, size]
    total = jnp.where(top_k_on, weights.sum(-1, keepdims=True),
                      jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True))  # [batch, 1]
    # S_{j-1}: probability of the higher-ranked tokens
    before = _exclusive_cumsum(weights, by_matmul=cumsum_by_matmul) / total
    top_p = jnp.asarray(top_p, before.dtype)
    count = jnp.maximum(jnp.sum(before < top_p, axis=-1), min_tokens_to_keep)  # kept prefix length
    nucleus_inside = (count < size) | (jnp.sum(weights, axis=-1) / total[:, 0] >= top_p)
    nucleus = _pick(values, jnp.minimum(count, size) - 1)
    p_on = top_p < 1.0
    threshold = jnp.where(p_on, jnp.maximum(kth, nucleus), kth)
    exact &= jnp.where(p_on, nucleus_inside, True)
    return threshold, exact


def top_k_top_p_filter(logits: jax.Array, top_k, top_p, min_tokens_to_keep: int = 1,
                       sizes: tuple[int, ...] | None = None, tuning: Tuning | None = None) -> jax.Array:
    """Top-k then top-p (``TopKLogitsWarper`` followed by ``TopPLogitsWarper``).

    Plain formulation (``tuning.top_k_tiers`` off, the GPU/TPU default): one full sort of the vocabulary, no
    data-dependent branch. Tiered (the CPU default): nothing runs when both are disabled (``lax.cond`` on the
    traced knobs); otherwise the threshold is taken from the 256 largest logits (``lax.top_k``, ~0.1 ms a row for
    GPT-2's vocabulary on the CPU) when the kept set provably lies among them, then from the 4096 largest, and only
    then from a full sort (~9 ms a row there). The result is the same in each case (up to float32 round-off in
    the cumulative sums).

    Args:
        logits: ``[batch, vocab]``.
        top_k: 0 disables; traced.
        top_p: 1.0 disables; traced.
        min_tokens_to_keep: static, as Hugging Face's.
        sizes: candidate-set sizes to try; given, the tiers run whatever ``tuning`` says (default:
            :data:`FAST_FILTER_SIZES` when ``tuning.top_k_tiers``, else no tiers).
        tuning: backend settings (static; default :func:`~gpt2_jax.backend.tuning_for` JAX's default backend).
    """
    tuning = tuning if tuning is not None else backend.tuning_for()
    if sizes is None:
        if not tuning.top_k_tiers:
            return _sorted_filter(logits, top_k, top_p, min_tokens_to_keep)
        sizes = FAST_FILTER_SIZES
    vocab = logits.shape[-1]
    sizes = tuple(s for s in sizes if s < vocab)

    def tiers(x, remaining):
        if not remaining:
            return _sorted_filter(x, top_k, top_p, min_tokens_to_keep)
        threshold, exact = _candidate_threshold(x, top_k, top_p, min_tokens_to_keep, remaining[0],
                                                tuning.cumsum_by_matmul)
        return jax.lax.cond(jnp.all(exact), lambda x: jnp.where(x < threshold, NEG_INF, x),
                            lambda x: tiers(x, remaining[1:]), x)

    enabled = (jnp.asarray(top_k) > 0) | (jnp.asarray(top_p) < 1.0)
    return jax.lax.cond(enabled, lambda x: tiers(x, sizes), lambda x: x, logits)


def _keep_top(values: jax.Array, remove: jax.Array, min_tokens_to_keep: int) -> jax.Array:
    """``remove`` with the ``min_tokens_to_keep`` largest ``values`` of each row never removed."""
    k = min(max(int(min_tokens_to_keep), 0), values.shape[-1])
    if k == 0:
        return remove
    index = jax.lax.top_k(values, k)[1]  # [batch, k]
    return remove.at[jnp.arange(values.shape[0])[:, None], index].set(False)


def min_p_filter(logits: jax.Array, min_p, min_tokens_to_keep: int = 1) -> jax.Array:
    """``MinPLogitsWarper``: ``-inf`` where the probability is below ``min_p`` times the row's top probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    remove = probs < jnp.asarray(min_p, probs.dtype) * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(_keep_top(probs, remove, min_tokens_to_keep), NEG_INF, logits)


def typical_filter(logits: jax.Array, mass, min_tokens_to_keep: int = 1) -> jax.Array:
    """``TypicalLogitsWarper``: keep the tokens whose surprisal is closest to the entropy, up to ``mass``."""
    batch, vocab = logits.shape
    normalized = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(normalized)
    entropy = -jnp.nansum(normalized * p, axis=-1, keepdims=True)  # [batch, 1]
    shifted = jnp.abs(-normalized - entropy)  # [batch, vocab]
    order = jnp.argsort(shifted, axis=-1)  # ascending, stable
    sorted_shifted = jnp.take_along_axis(shifted, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    last = jnp.minimum(jnp.sum(cumulative < jnp.asarray(mass, cumulative.dtype), axis=-1), vocab - 1)  # [batch]
    remove_sorted = sorted_shifted > jnp.take_along_axis(sorted_shifted, last[:, None], axis=-1)
    remove_sorted = remove_sorted & (jnp.arange(vocab) >= min_tokens_to_keep)[None, :]
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(batch)[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def _kth_logit(logits: jax.Array, min_tokens_to_keep: int) -> jax.Array:
    """``[batch, 1]``: the ``min_tokens_to_keep``-th largest logit (Hugging Face's safety check)."""
    k = min(max(int(min_tokens_to_keep), 1), logits.shape[-1])
    return jax.lax.top_k(logits, k)[0][:, -1:]


def epsilon_filter(logits: jax.Array, epsilon, min_tokens_to_keep: int = 1) -> jax.Array:
    """``EpsilonLogitsWarper``: ``-inf`` where the probability is below ``epsilon``."""
    probs = jax.nn.softmax(logits, axis=-1)
    remove = (probs < jnp.asarray(epsilon, probs.dtype)) & (logits < _kth_logit(logits, min_tokens_to_keep))
    return jnp.where(remove, NEG_INF, logits)


def eta_filter(logits: jax.Array, epsilon, min_tokens_to_keep: int = 1) -> jax.Array:
    """``EtaLogitsWarper``: ``-inf`` where the probability is below ``min(eps, sqrt(eps) * exp(-entropy))``."""
    probs = jax.nn.softmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1, keepdims=True)  # [batch, 1]
    eps = jnp.asarray(epsilon, probs.dtype)
    eta = jnp.minimum(eps, jnp.sqrt(eps) * jnp.exp(-entropy))
    remove = (probs < eta) & (logits < _kth_logit(logits, min_tokens_to_keep))
    return jnp.where(remove, NEG_INF, logits)


def sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Draw one token from ``softmax(logits [vocab])`` by inverting its cumulative distribution.

    One uniform number per draw (a categorical via Gumbel noise needs one per vocabulary entry: 4x slower for
    GPT-2); tokens at ``-inf`` are never drawn. Returns an int32 scalar.
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32)))  # [vocab], nondecreasing
    u = jax.random.uniform(key, (), jnp.float32) * cdf[-1]
    return jnp.minimum(jnp.sum(cdf <= u), logits.shape[-1] - 1).astype(jnp.int32)


def process_logits(
    logits: jax.Array,
    *,
    seen: jax.Array | None,
    penalty,
    banned: jax.Array | None,
    eos_mask: jax.Array,
    suppress_eos,
    do_sample: bool,
    temp,
    top_k,
    top_p,
    min_tokens_to_keep: int = 1,
    tuning: Tuning | None = None,
) -> jax.Array:
    """All processors in Hugging Face's order.

    Args:
        logits: ``[batch, vocab]`` float32 (log-probabilities for beam search, as Hugging Face passes them).
        seen: ``[batch, vocab]`` bool for the repetition penalty, or None.
        penalty: repetition penalty (1.0 = off).
        banned: ``[batch, vocab]`` bool from :func:`no_repeat_ngram_banned`, or None.
        eos_mask: ``[vocab]`` bool, the eos ids.
        suppress_eos: ``[]``/``[batch]`` bool, True while fewer than ``min_new_tokens`` tokens exist.
        do_sample: static; the warpers (temperature, top-k, top-p) only apply when sampling.
        temp, top_k, top_p: the warper knobs.
        min_tokens_to_keep: static; 1, or ``n_eos + 1`` for beam sampling (as Hugging Face).
        tuning: backend settings for the top-k / top-p formulation (static; see :func:`top_k_top_p_filter`).
    """
    if seen is not None:
        logits = repetition_penalty(logits, seen, penalty)
    if banned is not None:
        logits = jnp.where(banned, NEG_INF, logits)
    logits = suppress_tokens(logits, eos_mask, suppress_eos)
    if do_sample:
        logits = temperature(logits, temp)
        logits = top_k_top_p_filter(logits, top_k, top_p, min_tokens_to_keep, tuning=tuning)
    return logits
