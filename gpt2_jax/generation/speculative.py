"""Speculative (assisted) decoding and prompt-lookup decoding in one compiled ``lax.while_loop``.

Each iteration proposes ``K`` draft tokens per row, from a smaller GPT-2 (the assistant, same vocabulary) or, for
prompt lookup, copied from the continuation of the latest earlier occurrence of the row's trailing n-gram; the
target then scores ``[last token, d_1 .. d_K]`` in one forward pass and the row keeps the accepted prefix plus one
token of its own:

* greedy: ``d_j`` is accepted while it equals the target's argmax, so the output is token-for-token the target's
  plain greedy output (up to float32 round-off between a one-token and a ``K + 1``-token forward pass);
* sampling: the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept ``d_j ~ q_j`` with
  probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection draw from ``norm(max(p_j - q_j, 0))``,
  after ``K`` acceptances from ``p_{K+1}``, so every token is distributed as under the target's own sampler.
  ``p`` and ``q`` are the *processed* distributions (the request's processors run at every position, with the
  draft tokens before it in place, so step-dependent processors see what plain decoding would).

Rows accept different numbers of tokens. Rejected cache slots are marked invalid instead of being rewound (slots
are not positions: each row's positions count its valid slots), so the shared write index moves by the most any
row kept; at one row nothing is left behind. When drafting does not pay (measured tokens per iteration below the
estimated break-even, ``1.1 + K * draft_cost / target_cost``), the loop stops drafting and continues with plain
decode steps (``assistant_fallback``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..backend import Tuning
from ..config import GPT2Config
from ..kv_cache import KVCache
from . import processors
from .engine import (carry_cache, count_trace, hook_runner_for, hooked_model, program_weights, repeat_cache,
                     unflatten_cache)
from .logits_processors import ProcessorState, apply_processors
from .request import GenerationOutput, Knobs, Request, prompt_keys, row_keys
from .weight_layout import DecodeWeights

VERIFY_OVERHEAD = 1.1  # a K+1-token verify pass costs about one decode step plus this margin (weights dominate)
WARMUP_ITERATIONS = 4  # iterations measured before the fallback may switch drafting off


def param_count(config: GPT2Config) -> int:
    """Weights one decode step streams (blocks + tied head), the cost model of the fallback."""
    d = config.n_embd
    inner = config.n_inner or 4 * d
    return config.n_layer * (4 * d * d + 2 * d * inner) + config.vocab_size * d


def check_assistant(target: GPT2Config, assistant: GPT2Config, needed: int | None = None) -> None:
    """Raise a clear error when the assistant cannot draft for the target (before anything compiles).

    Raises:
        ValueError: another vocabulary, other special ids, another model family / variant, or fewer positions than
            ``needed`` (the longest prompt plus the budget).
    """
    if not isinstance(assistant, GPT2Config):
        raise ValueError(f"assistant_config must be a GPT2Config, got {type(assistant).__name__}")
    if assistant.vocab_size != target.vocab_size:
        raise ValueError(f"the assistant's vocabulary ({assistant.vocab_size}) differs from the target's "
                         f"({target.vocab_size}): speculative decoding needs the same tokenizer")
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(assistant, name) != getattr(target, name):
            raise ValueError(f"the assistant's {name} ({getattr(assistant, name)}) differs from the target's "
                             f"({getattr(target, name)}): speculative decoding needs the same tokenizer")
    if getattr(assistant, "variant", None) != getattr(target, "variant", None):
        raise ValueError(f"the assistant is a {getattr(assistant, 'variant', None)!r} model and the target a "
                         f"{getattr(target, 'variant', None)!r} one: use a draft of the same family")
    if needed is not None and needed > assistant.n_positions:
        raise ValueError(f"the longest prompt plus max_new_tokens ({needed}) is beyond the assistant's n_positions "
                         f"({assistant.n_positions})")


@dataclasses.dataclass(frozen=True)
class SpecSpec:
    """The static part of a speculative request (a ``jit`` static argument)."""

    model_config: GPT2Config
    draft_config: GPT2Config | None  # None: prompt lookup
    dtype: str
    draft_dtype: str
    bucket: int
    cap: int
    slots: int  # cache slots of target and draft
    k: int
    ngram: int
    num_return_sequences: int
    do_sample: bool
    fallback: bool
    threshold: float  # tokens per iteration below which drafting does not pay
    tuning: Tuning
    residual: bool = True  # False: resample from p on rejection (a wrong rule, kept to show the test's power)
    output_scores: bool = False  # keep the processed target logits of every committed token
    output_logits: bool = False  # keep the raw target logits of every committed token
    return_logprobs: bool = False  # keep the log-probability of every committed token under the processed logits
    hooks: Any = None  # the target's hook code (gpt2_jax.interp.runner.HookSpec); its data is a traced argument

    @property
    def buffer(self) -> int:
        return self.bucket + self.cap + self.k + 1


@struct.dataclass
class SpecState:
    """The ``while_loop`` carry (``rows`` = prompts x return sequences).

    Attributes:
        tokens: ``[rows, bucket + cap + K + 1]`` prompt then committed tokens (pad after a row finished).
        start: ``[rows]`` first real slot; n: ``[rows]`` tokens committed; done: ``[rows]`` finished.
        cache, draft_cache: the target's and the draft's caches (``draft_cache`` None for prompt lookup).
        pending: ``[rows]`` the last draft token when all K were accepted (the draft has not consumed it yet).
        pending_ok: ``[rows]`` bool, ``pending`` is to be fed first next iteration.
        keys: ``[rows]`` PRNG keys. seen: ``[rows, vocab]`` ids in the row.
        scores, raw_logits: ``[rows, cap, vocab]`` (``output_scores`` / ``output_logits``): for generated token i,
        the target's processed / raw logits that chose it (None when not asked for). logprobs: ``[rows, cap]`` the
        log-probability of generated token i under those processed logits (``return_logprobs``; 0 after the end).
        accepted, drafted: ``[rows]`` accepted / proposed draft tokens. iters, draft_iters, draft_tokens: counters
        of the fallback. use_draft: ``[]`` bool, still drafting.
    """

    tokens: jax.Array
    start: jax.Array
    n: jax.Array
    done: jax.Array
    cache: KVCache
    draft_cache: KVCache | None
    pending: jax.Array
    pending_ok: jax.Array
    keys: jax.Array
    seen: jax.Array
    accepted: jax.Array
    drafted: jax.Array
    iters: jax.Array
    draft_iters: jax.Array
    draft_tokens: jax.Array
    use_draft: jax.Array
    scores: jax.Array | None = None  # [rows, cap, vocab] processed target logits of each committed token
    raw_logits: jax.Array | None = None  # [rows, cap, vocab] raw target logits of each committed token
    logprobs: jax.Array | None = None  # [rows, cap] log-probability of each committed token (processed logits)


def _forward_all(params, ids, mask, cache: KVCache, config: GPT2Config, dtype: str, tuning: Tuning, keep: int,
                 hooks=None):
    """A cached forward pass returning the logits of the last ``keep`` positions ``[rows, keep, vocab]`` (with
    ``hooks``, a :class:`~gpt2_jax.interp.runner.HookRunner`, applied: the target's passes only)."""
    variables = params.variables if isinstance(params, DecodeWeights) else {"params": params}
    out = hooked_model(config, dtype, tuning, hooks).apply(variables, ids, attention_mask=mask,
                                                           cache=unflatten_cache(cache), logits_to_keep=keep)
    return out.logits.astype(jnp.float32), carry_cache(out.cache, tuning)


def _view(state: SpecState, knobs: Knobs, spec: SpecSpec, tokens, extra: int | jax.Array, seen) -> ProcessorState:
    """Processor state for choosing token ``n + extra`` of each row (``tokens`` holding what precedes it)."""
    step = state.n + extra
    return ProcessorState(tokens=tokens, start=state.start, end=spec.bucket + step, step=step,
                          prompt_width=knobs.prompt_width, max_new_tokens=knobs.max_new_tokens, seen=seen)


def _put(tokens: jax.Array, slot: jax.Array, token: jax.Array, where=True) -> jax.Array:
    """``tokens [rows, L]`` with ``token [rows]`` at ``slot [rows]`` where ``where`` holds."""
    rows = jnp.arange(tokens.shape[0])
    old = tokens[rows, slot]
    return tokens.at[rows, slot].set(jnp.where(where, token, old), mode="drop")


def _seen_with(seen: jax.Array, token: jax.Array, where=True) -> jax.Array:
    rows = jnp.arange(seen.shape[0])
    return seen.at[rows, token].set(seen[rows, token] | where)


def _choose(processed: jax.Array, keys: jax.Array, do_sample: bool) -> jax.Array:
    """Argmax, or one draw per row with ``keys [rows]``."""
    if not do_sample:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.vmap(processors.sample)(keys, processed).astype(jnp.int32)


def _draft_assistant(dparams, state: SpecState, knobs: Knobs, spec: SpecSpec, last, row_keys_: jax.Array):
    """K draft tokens from the assistant: ``(drafts [rows, K], draft logits [rows, K, vocab], valid, cache)``."""
    cfg, k = spec.draft_config, spec.k
    cache = state.draft_cache
    # Step 0 feeds [pending, last] (pending first when the draft has not seen it) or [last, -] (right padded).
    ids = jnp.where(state.pending_ok[:, None], jnp.stack([state.pending, last], 1), jnp.stack([last, last], 1))
    mask = jnp.stack([jnp.ones_like(state.pending_ok), state.pending_ok], 1)
    index = cache.index
    logits, cache = _forward_all(dparams, ids, mask, cache, cfg, spec.draft_dtype, spec.tuning, 2)
    logits = jnp.where(state.pending_ok[:, None], logits[:, 1], logits[:, 0])  # [rows, vocab]
    cache = cache.replace(index=index + 1 + jnp.max(state.pending_ok.astype(jnp.int32)))
    keys = jax.vmap(lambda key: jax.random.split(key, k))(row_keys_)  # [rows, K]

    def one(carry, j):
        logits, cache, tokens, seen = carry
        processed = apply_processors(knobs.processors, logits, _view(state, knobs, spec, tokens, j, seen))
        token = _choose(processed, keys[:, j], spec.do_sample)
        tokens = _put(tokens, spec.bucket + state.n + j, token)
        seen = _seen_with(seen, token)
        new_logits, new_cache = _forward_all(dparams, token[:, None], None, cache, cfg, spec.draft_dtype,
                                             spec.tuning, 1)
        return (new_logits[:, 0], new_cache, tokens, seen), (token, processed)

    # K proposals; the last forward pass (of d_K) is not needed, so the loop runs K - 1 passes and picks d_K after.
    (logits, cache, tokens, seen), (drafts, q) = jax.lax.scan(
        one, (logits, cache, state.tokens, state.seen), jnp.arange(k - 1))
    processed = apply_processors(knobs.processors, logits, _view(state, knobs, spec, tokens, k - 1, seen))
    last_draft = _choose(processed, keys[:, k - 1], spec.do_sample)
    drafts = jnp.concatenate([drafts.T, last_draft[:, None]], axis=1)  # [K - 1, rows] -> [rows, K]
    q = jnp.concatenate([jnp.moveaxis(q, 0, 1), processed[:, None]], axis=1)  # [rows, K, vocab]
    return drafts, q, jnp.ones(drafts.shape, bool), cache


def _draft_lookup(state: SpecState, spec: SpecSpec):
    """K draft tokens copied from the continuation of the latest earlier match of the row's trailing n-gram
    (longest n first, ``max_matching_ngram_size`` down to 1): ``(drafts [rows, K], valid [rows, K])``."""
    tokens, k = state.tokens, spec.k
    rows, length = tokens.shape
    end = spec.bucket + state.n  # [rows], one past the last committed token
    slot = jnp.arange(length)[None, :]
    found = jnp.zeros((rows,), bool)
    source = jnp.zeros((rows,), jnp.int32)
    for g in range(spec.ngram, 0, -1):
        tail = jnp.take_along_axis(tokens, jnp.clip(end[:, None] - g + jnp.arange(g)[None, :], 0, length - 1), 1)
        ok = (slot >= state.start[:, None]) & (slot + g < end[:, None]) & (end[:, None] - g >= state.start[:, None])
        for j in range(g):  # window starting at slot i equals the trailing n-gram
            shifted = jnp.roll(tokens, -j, axis=1)
            ok &= shifted == tail[:, j : j + 1]
        latest = jnp.max(jnp.where(ok, slot, -1), axis=1)  # [rows]
        take = ~found & (latest >= 0)
        source = jnp.where(take, latest + g, source)
        found |= take
    where = source[:, None] + jnp.arange(k)[None, :]  # [rows, K]
    drafts = jnp.take_along_axis(tokens, jnp.clip(where, 0, length - 1), 1)
    valid = found[:, None] & (where < end[:, None])
    return drafts.astype(jnp.int32), valid


def _verify(params, dparams, state: SpecState, knobs: Knobs, spec: SpecSpec, hook_data=()) -> SpecState:
    """One draft-and-verify iteration."""
    k, rows = spec.k, state.n.shape[0]
    vocab = spec.model_config.vocab_size
    keys = jax.vmap(lambda key: jax.random.split(key, 4))(state.keys)  # [rows, 4]
    next_keys, draft_keys, accept_keys, sample_keys = keys[:, 0], keys[:, 1], keys[:, 2], keys[:, 3]
    last = jnp.take_along_axis(state.tokens, (spec.bucket + state.n - 1)[:, None], 1)[:, 0]  # [rows]
    if spec.draft_config is not None:
        drafts, q_logits, valid, draft_cache = _draft_assistant(dparams, state, knobs, spec, last, draft_keys)
    else:
        drafts, valid = _draft_lookup(state, spec)
        q_logits, draft_cache = None, None
    # Target: logits after [last, d_1 .. d_K] in one pass.
    index, before = state.cache.index, state.cache.next_position
    ids = jnp.concatenate([last[:, None], drafts], axis=1)  # [rows, K + 1]
    logits, cache = _forward_all(params, ids, None, state.cache, spec.model_config, spec.dtype, spec.tuning, k + 1,
                                 hook_runner_for(spec.hooks, hook_data))
    tokens, seen, processed = state.tokens, state.seen, []
    for j in range(k + 1):  # process position j with d_1 .. d_j in place
        processed.append(apply_processors(knobs.processors, logits[:, j], _view(state, knobs, spec, tokens, j, seen)))
        if j < k:
            tokens = _put(tokens, spec.bucket + state.n + j, drafts[:, j])
            seen = _seen_with(seen, drafts[:, j])
    p = jnp.stack(processed, axis=1)  # [rows, K + 1, vocab]
    if spec.do_sample:
        probs = jax.nn.softmax(p, axis=-1)
        if q_logits is None:  # prompt lookup: a deterministic draft, q = one-hot
            q = jax.nn.one_hot(drafts, vocab, dtype=probs.dtype)
        else:
            q = jax.nn.softmax(q_logits, axis=-1)
        p_d = jnp.take_along_axis(probs[:, :k], drafts[..., None], -1)[..., 0]  # [rows, K]
        q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
        u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(accept_keys)
        ok = valid & (u * q_d < p_d)  # u < p/q without dividing (q_d > 0 for a drawn token)
    else:
        target = jnp.argmax(p[:, :k], axis=-1).astype(jnp.int32)
        ok = valid & (drafts == target)
    n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # leading accepted [rows]
    p_at = jnp.take_along_axis(p, n_acc[:, None, None], axis=1)[:, 0]  # [rows, vocab]
    if spec.do_sample:
        at = jnp.take_along_axis(probs, n_acc[:, None, None], axis=1)[:, 0]
        q_at = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), n_acc[:, None, None], axis=1)[:, 0]
        q_valid = jnp.take_along_axis(jnp.pad(valid, ((0, 0), (0, 1))), n_acc[:, None], axis=1)
        residual = jnp.maximum(at - jnp.where(q_valid, q_at, 0.0), 0.0) if spec.residual else at
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, at)
        bonus = jax.vmap(processors.sample)(sample_keys, jnp.log(residual)).astype(jnp.int32)
    else:
        bonus = jnp.argmax(p_at, axis=-1).astype(jnp.int32)
    emitted = jnp.concatenate([drafts, jnp.zeros((rows, 1), jnp.int32)], axis=1)  # [rows, K + 1]
    emitted = emitted.at[jnp.arange(rows), n_acc].set(bonus)
    was_done = state.done  # rows finished before this iteration count no drafts
    state = _commit(state, emitted, n_acc + 1, knobs, spec, p, logits)  # emitted j was chosen from p[:, j]
    # Target cache: keep [last, d_1 .. d_n] of each row; the rest of the K + 1 slots become holes.
    kept = n_acc + 1
    slot_valid = jnp.arange(k + 1)[None, :] < kept[:, None]
    cache = cache.replace(valid=jax.lax.dynamic_update_slice(cache.valid, slot_valid, (0, index)),
                          next_position=before + kept, index=index + jnp.max(kept))
    if draft_cache is not None:  # draft slots after step 0: [last, d_1 .. d_{K-1}] from index0 + (0 or 1)
        fed = jnp.minimum(n_acc, k - 1)  # accepted drafts the assistant has consumed
        start = draft_cache.index - k  # the K slots [last (or a hole), d_1 .. d_{K-1}] the scan ended after
        j = jnp.arange(k)[None, :]
        d_valid = jax.lax.dynamic_slice_in_dim(draft_cache.valid, start, k, axis=1) & (j <= fed[:, None])
        draft_cache = draft_cache.replace(
            valid=jax.lax.dynamic_update_slice(draft_cache.valid, d_valid, (0, start)),
            next_position=draft_cache.next_position - (k - 1 - fed),
            index=start + 1 + jnp.max(fed),
        )
    full = n_acc == k
    return state.replace(
        cache=cache, draft_cache=draft_cache, pending=drafts[:, k - 1], pending_ok=full, keys=next_keys,
        accepted=state.accepted + jnp.where(was_done, 0, n_acc),
        drafted=state.drafted + jnp.where(was_done, 0, jnp.sum(valid, axis=1, dtype=jnp.int32)),
    )


def _commit(state: SpecState, emitted: jax.Array, count: jax.Array, knobs: Knobs, spec: SpecSpec,
            processed: jax.Array | None = None, raw: jax.Array | None = None) -> SpecState:
    """Write up to ``count [rows]`` of ``emitted [rows, T]`` after each row's tokens, stopping at eos, at a stop
    string and at the budget; rows already done write nothing. ``processed`` / ``raw`` ``[rows, T, vocab]``: the
    target logits that chose each emitted token, kept in ``state.scores`` / ``state.raw_logits`` (and the token's
    log-probability under ``processed`` in ``state.logprobs``) when those are tracked."""
    vocab = spec.model_config.vocab_size
    is_eos = jnp.zeros((vocab,), bool).at[knobs.eos_ids].set(True)[emitted]  # [rows, T]
    t = jnp.arange(emitted.shape[1])[None, :]
    first_eos = jnp.min(jnp.where(is_eos & (t < count[:, None]), t, emitted.shape[1]), axis=1)
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), knobs.max_new_tokens - state.n)
    count = jnp.where(state.done, 0, count)
    rows = jnp.arange(emitted.shape[0])[:, None]

    def written(count):  # the token buffer with the first ``count [rows]`` emitted tokens of each row written
        slots = jnp.where(t < count[:, None], spec.bucket + state.n[:, None] + t, state.tokens.shape[1])
        return state.tokens.at[rows, slots].set(emitted, mode="drop")  # unwritten slots dropped

    stopped = jnp.zeros_like(state.done)
    if knobs.stop is not None:  # stop strings: a row ends with the first committed token that completes one
        tentative = written(count)
        hits = jnp.stack([knobs.stop.matches(tentative, state.start, spec.bucket + state.n + j + 1)
                          for j in range(emitted.shape[1])], axis=1) & (t < count[:, None])  # [rows, T]
        first_stop = jnp.min(jnp.where(hits, t, emitted.shape[1]), axis=1)
        stopped = first_stop < count
        count = jnp.minimum(count, first_stop + 1)
    write = t < count[:, None]
    tokens = written(count)
    seen = state.seen.at[rows, jnp.where(write, emitted, vocab)].set(True, mode="drop")
    extra = {}
    steps = jnp.where(write, state.n[:, None] + t, spec.cap)  # generated index of each write; cap: dropped
    picked = None
    if state.logprobs is not None:  # [rows, T]: each emitted token's log-probability under its processed logits
        picked = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), emitted[..., None], axis=-1)[..., 0]
    for field, values in (("scores", processed), ("raw_logits", raw), ("logprobs", picked)):
        buffer = getattr(state, field)
        if buffer is not None:  # [rows, cap, vocab] or, for logprobs, [rows, cap]
            extra[field] = buffer.at[rows, steps].set(values.astype(buffer.dtype), mode="drop")
    n = state.n + count
    done = state.done | (first_eos < count) | stopped | (n >= knobs.max_new_tokens)
    return state.replace(tokens=tokens, seen=seen, n=n, done=done, **extra)


def _plain(params, state: SpecState, knobs: Knobs, spec: SpecSpec, hook_data=()) -> SpecState:
    """One plain decode step (after the fallback switched drafting off)."""
    last = jnp.take_along_axis(state.tokens, (spec.bucket + state.n - 1)[:, None], 1)  # [rows, 1]
    logits, cache = _forward_all(params, last, None, state.cache, spec.model_config, spec.dtype, spec.tuning, 1,
                                 hook_runner_for(spec.hooks, hook_data))
    processed = apply_processors(knobs.processors, logits[:, 0], _view(state, knobs, spec, state.tokens, 0, state.seen))
    pairs = jax.vmap(jax.random.split)(state.keys)
    if spec.do_sample:
        token = jax.vmap(processors.sample)(pairs[:, 1], processed).astype(jnp.int32)
    else:
        token = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    state = _commit(state, token[:, None], jnp.ones_like(state.n), knobs, spec, processed[:, None], logits)
    return state.replace(cache=cache, keys=pairs[:, 0])


def _draft_iteration(params, dparams, state: SpecState, knobs: Knobs, spec: SpecSpec, hook_data=()) -> SpecState:
    """One draft-and-verify iteration plus the fallback's bookkeeping (``use_draft`` turns off for good when the
    measured tokens per iteration fall below the break-even ``spec.threshold``)."""
    before = jnp.sum(state.n)
    live = jnp.maximum(jnp.sum(~state.done), 1)
    state = _verify(params, dparams, state, knobs, spec, hook_data)
    if not spec.fallback:
        return state.replace(iters=state.iters + 1)
    gained = (jnp.sum(state.n) - before).astype(jnp.float32) / live.astype(jnp.float32)  # tokens per live row
    draft_iters = state.draft_iters + 1
    draft_tokens = state.draft_tokens + gained
    pays = (draft_iters < WARMUP_ITERATIONS) | (draft_tokens >= spec.threshold * draft_iters)
    return state.replace(iters=state.iters + 1, draft_iters=draft_iters, draft_tokens=draft_tokens, use_draft=pays)


def _start(params, dparams, input_ids, attention_mask, keys, knobs: Knobs, spec: SpecSpec,
           hook_data=()) -> SpecState:
    """Prefill target (and draft) and commit the target's first token."""
    cfg, n = spec.model_config, spec.num_return_sequences
    batch = input_ids.shape[0]
    cache = KVCache.zeros(cfg, batch, spec.slots, jnp.dtype(spec.dtype))
    logits, cache = _forward_all(params, input_ids, attention_mask, carry_cache(cache, spec.tuning), cfg,
                                 spec.dtype, spec.tuning, 1, hook_runner_for(spec.hooks, hook_data))
    draft_cache = None
    if spec.draft_config is not None:
        draft_cache = KVCache.zeros(spec.draft_config, batch, spec.slots, jnp.dtype(spec.draft_dtype))
        _, draft_cache = _forward_all(dparams, input_ids, attention_mask, carry_cache(draft_cache, spec.tuning),
                                      spec.draft_config, spec.draft_dtype, spec.tuning, 1)
    if n > 1:
        cache, draft_cache = (None if c is None else carry_cache(repeat_cache(unflatten_cache(c), n), spec.tuning)
                              for c in (cache, draft_cache))
        logits, input_ids, attention_mask = (jnp.repeat(x, n, axis=0) for x in (logits, input_ids, attention_mask))
    rows = batch * n
    real = attention_mask.astype(bool)
    tokens = jnp.full((rows, spec.buffer), knobs.pad_id, jnp.int32).at[:, : spec.bucket].set(input_ids)
    state = SpecState(
        tokens=tokens, start=spec.bucket - real.sum(axis=1, dtype=jnp.int32), n=jnp.zeros((rows,), jnp.int32),
        done=jnp.zeros((rows,), bool), cache=cache, draft_cache=draft_cache,
        pending=jnp.zeros((rows,), jnp.int32), pending_ok=jnp.zeros((rows,), bool), keys=row_keys(keys, n),
        seen=processors.seen_mask(input_ids, real, cfg.vocab_size), accepted=jnp.zeros((rows,), jnp.int32),
        drafted=jnp.zeros((rows,), jnp.int32), iters=jnp.zeros((), jnp.int32),
        draft_iters=jnp.zeros((), jnp.int32), draft_tokens=jnp.zeros((), jnp.float32),
        use_draft=jnp.asarray(not spec.fallback or spec.threshold <= spec.k + 1),  # can drafting ever pay?
        scores=jnp.zeros((rows, spec.cap, cfg.vocab_size), jnp.float32) if spec.output_scores else None,
        raw_logits=jnp.zeros((rows, spec.cap, cfg.vocab_size), jnp.float32) if spec.output_logits else None,
        logprobs=jnp.zeros((rows, spec.cap), jnp.float32) if spec.return_logprobs else None,
    )
    processed = apply_processors(knobs.processors, logits[:, 0], _view(state, knobs, spec, tokens, 0, state.seen))
    pairs = jax.vmap(jax.random.split)(state.keys)
    token = _choose(processed, pairs[:, 1], spec.do_sample)
    return _commit(state, token[:, None], jnp.ones((rows,), jnp.int32), knobs, spec, processed[:, None],
                   logits).replace(keys=pairs[:, 0])


@functools.partial(jax.jit, static_argnames=("spec",))
def _speculative_program(params, dparams, input_ids, attention_mask, keys, knobs, hook_data=(), *, spec: SpecSpec):
    count_trace("speculative")
    state = _start(params, dparams, input_ids, attention_mask, keys, knobs, spec, hook_data)
    # Drafting while it pays, then (after the fallback) plain decode steps: two loops, no cond in the hot path.
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done) & s.use_draft,
                               lambda s: _draft_iteration(params, dparams, s, knobs, spec, hook_data), state)
    if spec.fallback:
        state = jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                                   lambda s: _plain(params, s, knobs, spec, hook_data).replace(iters=s.iters + 1),
                                   state)
    return (state.tokens, state.n, state.accepted, state.drafted, state.iters, state.scores, state.raw_logits,
            state.logprobs)


def make_spec(request: Request, assistant_config: GPT2Config | None, assistant_params=None, *,
              residual: bool = True) -> SpecSpec:
    """The static part of a checked speculative / prompt-lookup request."""
    c = request.config
    lookup = assistant_config is None
    k = c.prompt_lookup_num_tokens if lookup else c.num_assistant_tokens
    rows = request.batch_size * c.num_return_sequences
    bucket, cap = request.prompts.bucket, request.cap
    # Slots: one row keeps what it accepts (<= cap + 2K + 2); several rows may leave holes (<= K + 1 per token).
    slots = bucket + (cap + 2 * k + 2 if rows == 1 else (k + 1) * (cap + 1) + k + 1)
    ratio = 0.0 if lookup else param_count(assistant_config) / param_count(request.model_config)
    draft_dtype = request.dtype
    return SpecSpec(
        model_config=request.model_config, draft_config=assistant_config, dtype=request.dtype,
        draft_dtype=draft_dtype, bucket=bucket, cap=cap, slots=slots, k=k, ngram=c.max_matching_ngram_size,
        num_return_sequences=c.num_return_sequences, do_sample=c.do_sample, fallback=c.assistant_fallback,
        threshold=VERIFY_OVERHEAD + k * ratio, tuning=request.tuning, residual=residual,
        output_scores=c.output_scores, output_logits=c.output_logits, return_logprobs=c.return_logprobs,
    )


def run_speculative_request(params, request: Request, key, *, assistant_params=None,
                            assistant_config: GPT2Config | None = None, residual: bool = True,
                            hooks=None) -> GenerationOutput:
    """Run a checked speculative (``assistant_params``) or prompt-lookup request. ``hooks`` (``[(name, fn), ...]``,
    :mod:`gpt2_jax.interp`) run in the target's passes (prefill, verification of ``[last, d_1 .. d_K]``, plain
    steps), so greedy output equals hooked greedy decoding; the draft proposes unhooked.

    Raises:
        ValueError: an assistant that does not fit the target.
    """
    if assistant_config is not None:
        check_assistant(request.model_config, assistant_config,
                        request.prompts.width + request.config.max_new_tokens)
    spec = make_spec(request, assistant_config, residual=residual)
    hook_data = ()
    if hooks:
        from ..interp.generation import hook_spec_for_generation

        hook_spec, hook_data, _ = hook_spec_for_generation(hooks, None, request.model_config)
        spec = dataclasses.replace(spec, hooks=hook_spec)
    prompts = request.prompts
    # Weights laid out for the rows of a plain decode step: at one row the target's transposed kernels keep the
    # fallback's single-token steps fast (gpt2-large: 115 vs 158 ms), while its K + 1-token verification would
    # be faster untransposed (248 vs 302 ms at K = 5): holding both layouts would cost a second copy of the kernels.
    rows = request.decode_rows
    dparams = None if assistant_params is None else program_weights(assistant_params, request.tuning, rows)
    tokens, n, accepted, drafted, _, scores, raw, logprobs = _speculative_program(
        program_weights(params, request.tuning, rows), dparams, jnp.asarray(prompts.input_ids),
        jnp.asarray(prompts.attention_mask), prompt_keys(key, request.batch_size), request.knobs, hook_data,
        spec=spec,
    )
    n = np.asarray(n)
    steps = int(n.max())
    tokens = np.asarray(tokens)[:, prompts.bucket - prompts.width : prompts.bucket + steps]
    return GenerationOutput(sequences=tokens, prompt_width=prompts.width, num_new_tokens=n,
                            num_accepted=np.asarray(accepted), num_drafted=np.asarray(drafted),
                            logprobs=None if logprobs is None else np.asarray(logprobs)[:, :steps],
                            scores=None if scores is None else np.asarray(scores)[:, :steps],
                            logits=None if raw is None else np.asarray(raw)[:, :steps])


def extend_with_layers(params, config: GPT2Config, extra_layers: int, scale: float, key) -> tuple:
    """A target that agrees with ``params`` (the draft) at a tunable rate: the draft's weights plus
    ``extra_layers`` random blocks on top whose output projections (and their biases) are multiplied by ``scale``,
    so they nudge the residual stream by an amount ``scale`` controls (0: the draft itself).

    Returns:
        ``(params, config)`` of the target (unrolled layers; the draft's arrays are shared, not copied).
    """
    from ..model import init_params

    if config.scan_layers:
        raise ValueError("extend_with_layers takes an unrolled (scan_layers=False) draft")
    target_config = config.replace(n_layer=config.n_layer + extra_layers)
    fresh = init_params(key, target_config)
    layers = dict(params["h"])
    for i in range(config.n_layer, target_config.n_layer):
        block = jax.tree_util.tree_map(lambda x: x, fresh["h"][str(i)])
        for part in ("attn", "mlp"):
            proj = block[part]["c_proj"]
            block[part]["c_proj"] = {name: value * scale for name, value in proj.items()}
        layers[str(i)] = block
    return {**params, "h": layers}, target_config
