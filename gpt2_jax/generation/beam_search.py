"""Beam search inside one compiled program, step for step Hugging Face's vectorised ``_beam_search``.

Each step scores ``num_beams * vocab`` continuations of every prompt, keeps the best ``K = max(2, 1 + n_eos) *
num_beams`` candidates, moves the candidates that hit eos (or the budget) into the finished set (length-penalised
score ``sum_logprobs / new_tokens ** length_penalty``) and continues with the best ``num_beams`` unfinished ones.
``early_stopping`` (True / False / ``"never"``) and the stopping heuristics are Hugging Face's.
``do_sample=True`` gives beam sampling: the ``K`` candidates are drawn without replacement (Gumbel top-k, the
distribution of ``torch.multinomial`` without replacement).

Cache reordering: all beams of a prompt share the prompt's slots (the prompt is prefilled once per prompt and its
cache rows repeated), so those slots never need reordering. Each step gathers only the generated region
(``cap`` slots of keys and values per layer) by the parent beams, after the step's forward pass; the prompt
region, the slot validity and the position counters are identical across a prompt's beams and are left untouched.
How the slots move is a backend choice (:attr:`gpt2_jax.backend.Tuning.beam_reorder_by_matmul`): on the CPU a
one-hot matmul, which XLA updates in place; elsewhere a gather.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .. import backend
from ..backend import Tuning
from ..config import GPT2Config
from ..kv_cache import KVCache
from . import processors
from .engine import count_trace, forward, hook_runner_for, program_weights, repeat_cache
from .logits_processors import ProcessorState, apply_processors
from .request import GenerationOutput, Knobs, Request, prompt_keys

NEG = -1.0e9  # Hugging Face's "impossible" score


@struct.dataclass
class BeamState:
    """The ``while_loop`` carry of beam search (``B`` prompts, ``N`` beams, ``L = bucket + cap`` slots).

    Attributes:
        step: ``[]`` int32, tokens generated so far.
        cache: ``B * N`` rows.
        running: ``[B, N, L]`` int32, the running beams (prompt + generated).
        running_scores: ``[B, N]`` summed log-probs of the running beams.
        sequences: ``[B, N, L]`` the finished hypotheses (best first).
        scores: ``[B, N]`` their length-penalised scores (``-1e9``-ish where none).
        finished: ``[B, N]`` bool, the hypothesis slot holds a finished sequence.
        finished_len: ``[B, N]`` int32, new tokens of each finished hypothesis.
        unsatisfied: ``[B, 1]`` bool, Hugging Face's ``is_early_stop_heuristic_unsatisfied``.
        parents: ``[B * N]`` int32, the row each running beam continues (for the cache reorder).
        going: ``[]`` bool, the loop continues.
        start: ``[B * N]`` int32, the first real slot of each row.
        keys: ``[B]`` PRNG keys (beam sampling), split every step.
        scores_out: ``[B * N, cap, vocab]`` processed log-probs of the running beams per step, or None.
        logits_out: ``[B * N, cap, vocab]`` raw logits of the running beams per step, or None.
    """

    step: jax.Array
    cache: KVCache
    running: jax.Array
    running_scores: jax.Array
    sequences: jax.Array
    scores: jax.Array
    finished: jax.Array
    finished_len: jax.Array
    unsatisfied: jax.Array
    parents: jax.Array
    going: jax.Array
    start: jax.Array
    keys: jax.Array
    scores_out: jax.Array | None = None
    logits_out: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class BeamSpec:
    """The static part of a beam search request, backend tuning included (a ``jit`` static argument)."""

    model_config: GPT2Config
    dtype: str
    bucket: int
    cap: int
    num_beams: int
    n_eos: int
    early_stopping: bool | str
    do_sample: bool
    tuning: Tuning
    output_scores: bool = False
    output_logits: bool = False
    hooks: Any = None  # a gpt2_jax.interp.runner.HookSpec (hook code); its data is a traced program argument

    @classmethod
    def from_request(cls, request: Request) -> "BeamSpec":
        c = request.config
        return cls(
            request.model_config, request.dtype, request.prompts.bucket, request.cap, c.num_beams,
            len(request.eos_ids), c.early_stopping, c.do_sample, request.tuning, c.output_scores, c.output_logits,
        )

    @property
    def candidates(self) -> int:
        """K: candidates kept per prompt and step."""
        return max(2, 1 + self.n_eos) * self.num_beams

    @property
    def min_tokens_to_keep(self) -> int:
        """What the warpers keep at least under beam sampling (Hugging Face: ``n_eos + 1``, at least 2)."""
        return max(2, self.n_eos + 1)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x [B, M, ...]`` gathered along axis 1 by ``index [B, K]`` -> ``[B, K, ...]``."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def reorder_generated(cache: KVCache, parents: jax.Array, bucket: int, num_beams: int,
                      tuning: Tuning | None = None) -> KVCache:
    """The cache with the generated slots ``[bucket, end)`` of every row taken from row ``parents[row]``.

    Rows are ``batch * num_beams`` beams, prompt by prompt, and each beam's parent is a beam of the same prompt
    (what beam search guarantees). Those rows share their prompt slots, validity and positions, so these are left
    as they are and only ``cap`` slots of keys and values per layer are moved. Works on per-layer and stacked
    (``scan_layers``) caches alike.

    With :attr:`~gpt2_jax.backend.Tuning.beam_reorder_by_matmul` (``tuning``; default
    :func:`~gpt2_jax.backend.tuning_for` the cache) the move is a per-prompt ``[beams, beams]`` one-hot matmul
    (exact: one 1 per row, at the highest precision; a parent outside its prompt's beams gives zeros): XLA (CPU)
    fused a gather into the slot update and then wrote a whole new cache array and copied it back into the loop
    carry, twice the cache per layer and step (a test checks the compiled loop). Otherwise it is a gather of the
    generated slots by ``parents``.
    """
    tuning = tuning if tuning is not None else backend.tuning_for(cache)
    rows = parents.shape[0]
    batch = rows // num_beams
    if tuning.beam_reorder_by_matmul:
        local = parents.reshape(batch, num_beams) - (jnp.arange(batch, dtype=parents.dtype) * num_beams)[:, None]
        pick = jax.nn.one_hot(local, num_beams)  # [batch, beams (child), beams (parent)]

    def take(x, axis):  # x [(n_layer,) rows, heads, slots, head_dim]; axis: the rows axis
        generated = jax.lax.slice_in_dim(x, bucket, x.shape[axis + 2], axis=axis + 2)  # [..., rows, heads, cap, hd]
        if tuning.beam_reorder_by_matmul:
            lead = generated.shape[:axis]  # (n_layer,) for a stacked cache, else ()
            by_prompt = generated.reshape(*lead, batch, num_beams, -1)  # [..., batch, beams, heads * cap * hd]
            moved = jnp.einsum("bcp,...bpf->...bcf", pick.astype(x.dtype), by_prompt,
                               precision=jax.lax.Precision.HIGHEST).reshape(generated.shape)
        else:
            moved = jnp.take(generated, parents, axis=axis)  # [..., rows, heads, cap, hd]
        return jax.lax.dynamic_update_slice_in_dim(x, moved, bucket, axis=axis + 2)

    return cache.map_kv(take)


def _beam_update(state: BeamState, logits: jax.Array, knobs: Knobs, spec: BeamSpec) -> BeamState:
    """One beam step from the logits of the running beams (``[B * N, vocab]``)."""
    batch, nb, length = state.running.shape
    vocab = logits.shape[-1]
    k_cand = spec.candidates
    end = spec.bucket + state.step  # slot of the token chosen now
    flat_running = state.running.reshape(batch * nb, length)
    slots = jnp.arange(length)[None, :]
    real = (slots >= state.start[:, None]) & (slots < end)
    stop_ids = jnp.zeros((vocab,), bool).at[knobs.eos_ids].set(True)
    view = ProcessorState(
        tokens=flat_running, start=state.start, end=end, step=state.step, prompt_width=knobs.prompt_width,
        max_new_tokens=knobs.max_new_tokens, seen=processors.seen_mask(flat_running, real, vocab),
    )
    log_probs = apply_processors(knobs.processors, jax.nn.log_softmax(logits, axis=-1), view)  # [B * N, vocab]
    scores_out = state.scores_out
    if scores_out is not None:
        scores_out = jax.lax.dynamic_update_slice_in_dim(scores_out, log_probs[:, None], state.step, axis=1)
    logits_out = state.logits_out
    if logits_out is not None:
        logits_out = jax.lax.dynamic_update_slice_in_dim(logits_out, logits[:, None], state.step, axis=1)
    accumulated = (log_probs.reshape(batch, nb, vocab) + state.running_scores[:, :, None]).reshape(batch, nb * vocab)

    keys = state.keys
    if spec.do_sample:
        pairs = jax.vmap(jax.random.split)(keys)
        keys, draw = pairs[:, 0], pairs[:, 1]
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (nb * vocab,)))(draw)
        _, top_index = jax.lax.top_k(accumulated + gumbel, k_cand)  # sampled without replacement, in draw order
        top_logp = jnp.take_along_axis(accumulated, top_index, axis=1)
    else:
        top_logp, top_index = jax.lax.top_k(accumulated, k_cand)  # [B, K]
    top_beam = top_index // vocab
    top_token = (top_index % vocab).astype(jnp.int32)
    top_running = _gather(state.running, top_beam)  # [B, K, L]
    top_running = jax.lax.dynamic_update_slice_in_dim(top_running, top_token[:, :, None], end, axis=2)

    # Candidates that finish now: an eos id, or the last token of the budget.
    hits = stop_ids[top_token] | (state.step + 1 >= knobs.max_new_tokens)  # [B, K]

    # The best N unfinished candidates continue.
    running_logp = top_logp + hits.astype(jnp.float32) * NEG
    next_index = jax.lax.top_k(running_logp, nb)[1]  # [B, N]
    running = _gather(top_running, next_index)
    running_scores = _gather(running_logp, next_index)
    parents = (_gather(top_beam, next_index) + jnp.arange(batch)[:, None] * nb).reshape(-1).astype(jnp.int32)

    # Finished candidates among the top N enter the finished set if they beat its members.
    new_len = state.step + 1
    top_n_mask = jnp.arange(k_cand) < nb
    just_finished = hits & top_n_mask[None, :]
    final_logp = top_logp / (new_len.astype(jnp.float32) ** knobs.length_penalty)
    if spec.early_stopping is True:
        full = jnp.all(state.finished, axis=-1, keepdims=True)
        final_logp = final_logp + full.astype(jnp.float32) * NEG
    final_logp = final_logp + (~state.unsatisfied).astype(jnp.float32) * NEG
    final_logp = final_logp + (~just_finished).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([state.scores, final_logp], axis=1)  # [B, N + K]
    keep = jax.lax.top_k(merged_scores, nb)[1]
    sequences = _gather(jnp.concatenate([state.sequences, top_running], axis=1), keep)
    scores = _gather(merged_scores, keep)
    finished = _gather(jnp.concatenate([state.finished, just_finished], axis=1), keep)
    lengths = jnp.concatenate([state.finished_len, jnp.broadcast_to(new_len, (batch, k_cand))], axis=1)
    finished_len = _gather(lengths, keep)

    # Can a running beam still beat the worst finished hypothesis?
    if spec.early_stopping == "never":
        best_len = jnp.where(knobs.length_penalty > 0, knobs.max_new_tokens, new_len)
    else:
        best_len = new_len
    best_possible = running_scores[:, :1] / (best_len.astype(jnp.float32) ** knobs.length_penalty)
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)  # [B, N]
    unsatisfied = state.unsatisfied & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
    going = jnp.any(unsatisfied) & ~jnp.all(hits)
    if spec.early_stopping is True:
        going &= ~jnp.all(finished)
    return state.replace(
        step=new_len, running=running, running_scores=running_scores, sequences=sequences, scores=scores,
        finished=finished, finished_len=finished_len, unsatisfied=unsatisfied, parents=parents, going=going,
        keys=keys, scores_out=scores_out, logits_out=logits_out,
    )


def start_beams(params, input_ids, attention_mask, keys, knobs: Knobs, spec: BeamSpec, hook_data=()) -> BeamState:
    """Prefill each prompt once, repeat its cache rows for the beams and take the first beam step."""
    cfg, nb = spec.model_config, spec.num_beams
    batch = input_ids.shape[0]
    length = spec.bucket + spec.cap
    cache = KVCache.zeros(cfg, batch, length, jnp.dtype(spec.dtype))
    logits, cache = forward(params, input_ids, attention_mask, cache, cfg, spec.dtype, spec.tuning,
                            hooks=hook_runner_for(spec.hooks, hook_data))  # [batch, vocab]: one row per prompt
    cache = repeat_cache(cache, nb)  # [batch, ...] -> [batch * beams, ...] rows
    running = jnp.full((batch, nb, length), knobs.pad_id, jnp.int32)
    running = running.at[:, :, : spec.bucket].set(input_ids[:, None, :])
    start = spec.bucket - attention_mask.sum(axis=1, dtype=jnp.int32)
    state = BeamState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        running=running,
        running_scores=jnp.zeros((batch, nb), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 expands at first
        sequences=running,
        scores=jnp.full((batch, nb), NEG, jnp.float32),
        finished=jnp.zeros((batch, nb), bool),
        finished_len=jnp.zeros((batch, nb), jnp.int32),
        unsatisfied=jnp.ones((batch, 1), bool),
        parents=jnp.arange(batch * nb, dtype=jnp.int32),
        going=jnp.ones((), bool),
        start=jnp.repeat(start, nb),
        keys=keys,
        scores_out=jnp.zeros((batch * nb, spec.cap, cfg.vocab_size), jnp.float32) if spec.output_scores else None,
        logits_out=jnp.zeros((batch * nb, spec.cap, cfg.vocab_size), jnp.float32) if spec.output_logits else None,
    )
    state = _beam_update(state, jnp.repeat(logits, nb, axis=0), knobs, spec)
    return state.replace(cache=reorder_generated(state.cache, state.parents, spec.bucket, spec.num_beams, spec.tuning))


def advance_beams(params, state: BeamState, knobs: Knobs, spec: BeamSpec, hook_data=()) -> BeamState:
    """Feed the chosen tokens, take a beam step, then move the generated cache slots to the new parent beams."""
    batch, nb, _ = state.running.shape
    last = jax.lax.dynamic_slice_in_dim(state.running, spec.bucket + state.step - 1, 1, axis=2)  # [B, N, 1]
    logits, cache = forward(params, last.reshape(batch * nb, 1), None, state.cache, spec.model_config, spec.dtype,
                            spec.tuning, hooks=hook_runner_for(spec.hooks, hook_data))  # rows: batch * beams
    state = _beam_update(state.replace(cache=cache), logits, knobs, spec)
    return state.replace(cache=reorder_generated(state.cache, state.parents, spec.bucket, spec.num_beams, spec.tuning))


@functools.partial(jax.jit, static_argnames=("spec", "num_return_sequences"))
def _beam_program(params, input_ids, attention_mask, keys, knobs, hook_data=(), *, spec: BeamSpec,
                  num_return_sequences: int):
    count_trace("beam_search")
    state = start_beams(params, input_ids, attention_mask, keys, knobs, spec, hook_data)
    state = jax.lax.while_loop(
        lambda s: s.going & (s.step < knobs.max_new_tokens),
        lambda s: advance_beams(params, s, knobs, spec, hook_data),
        state,
    )
    n = num_return_sequences
    flat = lambda x: x[:, :n].reshape(-1, *x.shape[2:])
    return (flat(state.sequences), flat(state.scores), flat(state.finished_len), state.step, state.scores_out,
            state.logits_out)


def run_beam_request(params, request: Request, key, hooks=None) -> GenerationOutput:
    """Run a checked beam-search request (``num_beams > 1``), with ``hooks`` (``[(name, fn), ...]``,
    :mod:`gpt2_jax.interp`) applied at the prefill (one row per prompt) and at every step (one row per beam): hook
    data must broadcast over the rows (a steering vector, a head mask), not hold one value per prompt."""
    cfg = request.config
    spec = BeamSpec.from_request(request)
    hook_data = ()
    if hooks:
        from ..interp.generation import hook_spec_for_generation

        hook_spec, hook_data, _ = hook_spec_for_generation(hooks, None, request.model_config)
        spec = dataclasses.replace(spec, hooks=hook_spec)
    prompts = request.prompts
    sequences, scores, lengths, steps, scores_out, logits_out = _beam_program(
        program_weights(params, request.tuning, request.decode_rows), jnp.asarray(prompts.input_ids),
        jnp.asarray(prompts.attention_mask),
        prompt_keys(key, request.batch_size), request.knobs, hook_data, spec=spec,
        num_return_sequences=cfg.num_return_sequences,
    )
    lengths = np.asarray(lengths)
    steps = int(lengths.max())
    sequences = np.asarray(sequences)
    return GenerationOutput(
        sequences=sequences[:, prompts.bucket - prompts.width : prompts.bucket + steps],
        prompt_width=prompts.width,
        num_new_tokens=lengths,
        sequences_scores=np.asarray(scores),
        scores=None if scores_out is None else np.asarray(scores_out)[:, : int(steps)],
        logits=None if logits_out is None else np.asarray(logits_out)[:, : int(steps)],
    )
