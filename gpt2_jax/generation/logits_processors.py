"""Logits processors as objects: one protocol, one ordered list built from a :class:`GenerationConfig` in one place.

A processor is a :func:`flax.struct.dataclass` whose array fields are traced (changing a value never recompiles)
and whose ``struct.field(pytree_node=False)`` fields are static structure; it is called as
``processor(logits [rows, vocab], state: ProcessorState) -> logits [rows, vocab]``. The list is a tuple of such
pytrees, passed to the compiled programs as an argument: which processors are present (and their static fields)
is part of the program's identity, their values are not.

:func:`build_processors` is the one place the list is built, in Hugging Face's order (``_get_logits_processor``):
sequence bias, repetition penalty, no-repeat n-gram, bad words, min-new-tokens, forced bos, forced eos,
exponential decay length penalty, suppress tokens, begin-suppress tokens, the user's processors, then (sampling
only) temperature, top-k / top-p, min-p, typical-p, epsilon, eta, and last the renormalisation. The sampling loop,
beam search and speculative decoding all apply the same list.

Adding a processor = one class here + one :class:`GenerationConfig` field + one line in :func:`build_processors`.
Users may pass their own processor objects (anything with that call signature; a ``struct.dataclass`` keeps its
values traced) through ``generate(..., logits_processor=[...])``.

Differences from Hugging Face, on purpose: prefix matches (sequence bias, bad words, no-repeat n-grams) only look at
each row's real tokens, so a left-padded row is processed exactly as the row alone (Hugging Face's also match the
padding tokens, which only matters when a prefix contains the pad id).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..backend import Tuning
from . import processors as fn
from .config import GenerationConfig

NEG_INF = float("-inf")


@struct.dataclass
class ProcessorState:
    """What a processor may read besides the logits (all traced).

    Attributes:
        tokens: ``[rows, L]`` int32 buffer: the left-padded prompt, then the generated tokens.
        start: ``[rows]`` int32, the first real slot of each row.
        end: ``[]`` or ``[rows]`` int32, one past the last written slot (per row under speculative decoding).
        step: ``[]`` or ``[rows]`` int32, tokens generated so far (the index of the token being chosen).
        prompt_width: ``[]`` int32, the padded prompt width (Hugging Face's ``input_ids_seq_length``).
        max_new_tokens: ``[]`` int32, the budget.
        seen: ``[rows, vocab]`` bool, ids present in the row (prompt padding excluded).
    """

    tokens: jax.Array
    start: jax.Array
    end: jax.Array
    step: jax.Array
    prompt_width: jax.Array
    max_new_tokens: jax.Array
    seen: jax.Array

    @property
    def cur_len(self) -> jax.Array:
        """Hugging Face's ``input_ids.shape[-1]``: padded prompt width plus generated tokens."""
        return self.prompt_width + self.step


class LogitsProcessor(Protocol):
    """The protocol: ``(logits [rows, vocab], state) -> logits [rows, vocab]``."""

    def __call__(self, logits: jax.Array, state: ProcessorState) -> jax.Array: ...


def _col(x) -> jax.Array:
    """A ``[]`` or ``[rows]`` value as something that broadcasts against ``[rows, vocab]``."""
    x = jnp.asarray(x)
    return x[:, None] if x.ndim == 1 else x


def _mask(ids: Sequence[int], vocab: int) -> jax.Array:
    """``[vocab]`` bool, True at ``ids`` (ids outside the vocabulary are rejected before this)."""
    mask = np.zeros((vocab,), bool)
    mask[list(ids)] = True
    return jnp.asarray(mask)


def _force(logits: jax.Array, mask: jax.Array, active) -> jax.Array:
    """Where ``active``: ``-inf`` everywhere but 0 at the ``mask`` ids (Hugging Face's forced-token rows)."""
    forced = jnp.where(mask[None, :], 0.0, NEG_INF).astype(logits.dtype)
    return jnp.where(_col(active), forced, logits)


def match_prefixes(state: ProcessorState, prefixes: jax.Array) -> jax.Array:
    """``[rows, n]`` bool: the row's last real tokens equal ``prefixes [n, P]`` (right-aligned, ``-1`` = unused)."""
    width = prefixes.shape[1]
    slots = _col(state.end) - width + jnp.arange(width)[None, :]  # [rows or 1, P]
    slots = jnp.broadcast_to(slots, (state.tokens.shape[0], width))
    window = jnp.take_along_axis(state.tokens, jnp.clip(slots, 0, state.tokens.shape[1] - 1), axis=1)  # [rows, P]
    real = slots >= state.start[:, None]
    needed = prefixes[None, :, :] >= 0  # [1, n, P]
    ok = (window[:, None, :] == prefixes[None]) & real[:, None, :]
    return jnp.all(ok | ~needed, axis=-1)


# Processors (Hugging Face's order) ---------------------------------------------------------------------------------
@struct.dataclass
class SequenceBias:
    """``SequenceBiasLogitsProcessor`` (and, with ``-inf`` biases, ``NoBadWordsLogitsProcessor``).

    Attributes:
        single: ``[vocab]`` float32, the bias of one-token sequences.
        prefixes: ``[n, P]`` int32, the multi-token sequences without their last token (right-aligned, -1 padded).
        last: ``[n]`` int32, their last tokens.
        bias: ``[n]`` float32, their biases.
    """

    single: jax.Array
    prefixes: jax.Array
    last: jax.Array
    bias: jax.Array

    @classmethod
    def build(cls, pairs: Sequence[tuple[Sequence[int], float]], vocab: int) -> "SequenceBias":
        single = np.zeros((vocab,), np.float32)
        multi = [(tuple(ids), b) for ids, b in pairs if len(ids) > 1]
        for ids, b in pairs:
            if len(ids) == 1:
                single[ids[0]] = b
        width = max([len(ids) - 1 for ids, _ in multi], default=1)
        prefixes = np.full((len(multi), width), -1, np.int32)
        for i, (ids, _) in enumerate(multi):
            prefixes[i, width - (len(ids) - 1):] = ids[:-1]
        return cls(jnp.asarray(single), jnp.asarray(prefixes), jnp.asarray([ids[-1] for ids, _ in multi], jnp.int32),
                   jnp.asarray([b for _, b in multi], jnp.float32))

    def __call__(self, logits, state):
        bias = jnp.broadcast_to(self.single, logits.shape)
        if self.prefixes.shape[0]:
            hit = jnp.where(match_prefixes(state, self.prefixes), self.bias[None, :], 0.0)  # [rows, n]
            bias = bias.at[:, self.last].add(hit)
        return logits + bias


@struct.dataclass
class RepetitionPenalty:
    """``RepetitionPenaltyLogitsProcessor`` over the row's real tokens; 1.0 is a no-op."""

    penalty: jax.Array

    def __call__(self, logits, state):
        return fn.repetition_penalty(logits, state.seen, self.penalty)


@struct.dataclass
class NoRepeatNGram:
    """``NoRepeatNGramLogitsProcessor`` (the size is static)."""

    size: int = struct.field(pytree_node=False)

    def __call__(self, logits, state):
        vocab = logits.shape[-1]
        end = jnp.asarray(state.end)
        if end.ndim == 0:
            banned = fn.no_repeat_ngram_banned(state.tokens, state.start, end, self.size, vocab)
        else:  # one end per row (speculative decoding)
            one = lambda t, s, e: fn.no_repeat_ngram_banned(t[None], s[None], e, self.size, vocab)[0]
            banned = jax.vmap(one)(state.tokens, state.start, end)
        return jnp.where(banned, NEG_INF, logits)


@struct.dataclass
class MinNewTokens:
    """``MinNewTokensLengthLogitsProcessor``: the eos ids are ``-inf`` while fewer than ``min_new_tokens`` exist."""

    min_new_tokens: jax.Array
    eos: jax.Array  # [vocab] bool

    def __call__(self, logits, state):
        return fn.suppress_tokens(logits, self.eos, jnp.asarray(state.step) < self.min_new_tokens)


@struct.dataclass
class ForcedBOS:
    """``ForcedBOSTokenLogitsProcessor``: the bos id is forced when the (padded) input is one token long."""

    bos: jax.Array  # [vocab] bool

    def __call__(self, logits, state):
        return _force(logits, self.bos, state.cur_len == 1)


@struct.dataclass
class ForcedEOS:
    """``ForcedEOSTokenLogitsProcessor``: the eos id(s) forced as the last token of the budget."""

    eos: jax.Array  # [vocab] bool

    def __call__(self, logits, state):
        return _force(logits, self.eos, jnp.asarray(state.step) == state.max_new_tokens - 1)


@struct.dataclass
class ExponentialDecayLengthPenalty:
    """``ExponentialDecayLengthPenalty``: after ``start`` new tokens, eos logits grow by
    ``|logit| * (factor ** (step - start) - 1)`` (non-finite ones untouched)."""

    start: jax.Array
    factor: jax.Array
    eos: jax.Array  # [vocab] bool

    def __call__(self, logits, state):
        step = _col(state.step)
        exponent = (step - self.start).astype(jnp.float32)
        penalty = jnp.abs(logits) * (jnp.power(self.factor, exponent) - 1.0)
        penalty = jnp.where(self.eos[None, :] & jnp.isfinite(logits) & (step > self.start), penalty, 0.0)
        return logits + penalty


@struct.dataclass
class SuppressTokens:
    """``SuppressTokensLogitsProcessor``: ``-inf`` at the ids, always."""

    ids: jax.Array  # [vocab] bool

    def __call__(self, logits, state):
        return jnp.where(self.ids[None, :], NEG_INF, logits)


@struct.dataclass
class SuppressTokensAtBegin:
    """``SuppressTokensAtBeginLogitsProcessor``: ``-inf`` at the ids at generated step ``begin_step``."""

    ids: jax.Array  # [vocab] bool
    begin_step: jax.Array

    def __call__(self, logits, state):
        return fn.suppress_tokens(logits, self.ids, jnp.asarray(state.step) == self.begin_step)


@struct.dataclass
class Temperature:
    """``TemperatureLogitsWarper`` (1.0 is a no-op)."""

    temperature: jax.Array

    def __call__(self, logits, state):
        return fn.temperature(logits, self.temperature)


@struct.dataclass
class TopKTopP:
    """``TopKLogitsWarper`` then ``TopPLogitsWarper`` (0 / 1.0 disable), formulated per the backend tuning."""

    top_k: jax.Array
    top_p: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)
    tuning: Tuning | None = struct.field(pytree_node=False, default=None)

    def __call__(self, logits, state):
        return fn.top_k_top_p_filter(logits, self.top_k, self.top_p, self.min_tokens_to_keep, tuning=self.tuning)


@struct.dataclass
class MinP:
    """``MinPLogitsWarper``: drop tokens whose probability is below ``min_p`` times the top probability."""

    min_p: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits, state):
        return fn.min_p_filter(logits, self.min_p, self.min_tokens_to_keep)


@struct.dataclass
class TypicalP:
    """``TypicalLogitsWarper`` (locally typical sampling)."""

    mass: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits, state):
        return fn.typical_filter(logits, self.mass, self.min_tokens_to_keep)


@struct.dataclass
class EpsilonCutoff:
    """``EpsilonLogitsWarper``: drop tokens of probability below ``epsilon``."""

    epsilon: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits, state):
        return fn.epsilon_filter(logits, self.epsilon, self.min_tokens_to_keep)


@struct.dataclass
class EtaCutoff:
    """``EtaLogitsWarper``: drop tokens below ``min(epsilon, sqrt(epsilon) * exp(-entropy))``."""

    epsilon: jax.Array
    min_tokens_to_keep: int = struct.field(pytree_node=False, default=1)

    def __call__(self, logits, state):
        return fn.eta_filter(logits, self.epsilon, self.min_tokens_to_keep)


@struct.dataclass
class Renormalize:
    """``LogitNormalization``: log-softmax of the processed logits (always last)."""

    def __call__(self, logits, state):
        return jax.nn.log_softmax(logits, axis=-1)


def apply_processors(processors: Sequence[Any], logits: jax.Array, state: ProcessorState) -> jax.Array:
    """Run the list in order: ``logits [rows, vocab]`` -> processed ``[rows, vocab]``."""
    for processor in processors:
        logits = processor(logits, state)
    return logits


def _check_ids(ids: Sequence[int], vocab: int, name: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab}): {bad}")


def build_processors(
    config: GenerationConfig,
    *,
    eos_ids: tuple[int, ...],
    vocab_size: int,
    prompt_width: int,
    tuning: Tuning | None,
    beams: bool = False,
    user: Sequence[Any] = (),
) -> tuple:
    """The ordered processor list of a request (Hugging Face's ``_get_logits_processor`` order).

    Args:
        config: the request's config (which processors exist, and their values).
        eos_ids: the resolved eos ids.
        vocab_size: the model's vocabulary.
        prompt_width: the padded prompt width (for ``begin_suppress_tokens`` with ``forced_bos_token_id``).
        tuning: backend settings of the top-k / top-p formulation.
        beams: beam search (warpers keep at least ``n_eos + 1`` tokens, at least 2, as Hugging Face's).
        user: the caller's own processors, placed after the built-in processors and before the warpers.

    Raises:
        ValueError: ids outside the vocabulary.
    """
    c, vocab = config, vocab_size
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    eos_mask = _mask(eos_ids, vocab)
    out: list = []
    if c.sequence_bias is not None:
        for ids, _ in c.sequence_bias:
            _check_ids(ids, vocab, "sequence_bias")
        out.append(SequenceBias.build(c.sequence_bias, vocab))
    out.append(RepetitionPenalty(f32(c.repetition_penalty)))
    if c.no_repeat_ngram_size:
        out.append(NoRepeatNGram(c.no_repeat_ngram_size))
    if c.bad_words_ids is not None:
        for ids in c.bad_words_ids:
            _check_ids(ids, vocab, "bad_words_ids")
        words = [ids for ids in c.bad_words_ids if not (len(ids) == 1 and ids[0] in eos_ids)]
        if words:
            out.append(SequenceBias.build([(ids, NEG_INF) for ids in words], vocab))
    out.append(MinNewTokens(i32(c.min_new_tokens), eos_mask))
    if c.forced_bos_token_id is not None:
        _check_ids([c.forced_bos_token_id], vocab, "forced_bos_token_id")
        out.append(ForcedBOS(_mask([c.forced_bos_token_id], vocab)))
    if c.forced_eos_token_id is not None:
        forced = (c.forced_eos_token_id,) if isinstance(c.forced_eos_token_id, int) else c.forced_eos_token_id
        _check_ids(forced, vocab, "forced_eos_token_id")
        out.append(ForcedEOS(_mask(forced, vocab)))
    if c.exponential_decay_length_penalty is not None:
        start, factor = c.exponential_decay_length_penalty
        out.append(ExponentialDecayLengthPenalty(i32(start), f32(factor), eos_mask))
    if c.suppress_tokens is not None:
        _check_ids(c.suppress_tokens, vocab, "suppress_tokens")
        out.append(SuppressTokens(_mask(c.suppress_tokens, vocab)))
    if c.begin_suppress_tokens is not None:
        _check_ids(c.begin_suppress_tokens, vocab, "begin_suppress_tokens")
        begin = 1 if (prompt_width <= 1 and c.forced_bos_token_id is not None) else 0
        out.append(SuppressTokensAtBegin(_mask(c.begin_suppress_tokens, vocab), i32(begin)))
    out.extend(user)
    if c.do_sample:
        keep = max(2, len(eos_ids) + 1) if beams else 1
        out.append(Temperature(f32(c.temperature)))
        out.append(TopKTopP(i32(c.top_k), f32(c.top_p), keep, tuning))
        if c.min_p is not None:
            out.append(MinP(f32(c.min_p), keep))
        if c.typical_p < 1.0:
            out.append(TypicalP(f32(c.typical_p), keep))
        if 0.0 < c.epsilon_cutoff < 1.0:
            out.append(EpsilonCutoff(f32(c.epsilon_cutoff), keep))
        if 0.0 < c.eta_cutoff < 1.0:
            out.append(EtaCutoff(f32(c.eta_cutoff), keep))
    if c.renormalize_logits:
        out.append(Renormalize())
    return tuple(out)
