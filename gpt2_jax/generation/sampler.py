"""Greedy decoding and sampling in one compiled program: prefill, then a ``lax.while_loop`` over decode steps.

The loop state is a pytree (:class:`SamplingState`). Each iteration feeds the previous token, processes the
logits (repetition penalty, no-repeat n-gram, min-new-tokens, then temperature / top-k / top-p when sampling),
picks the next token (argmax, or a categorical draw with the row's key, split every step), and stops early when
every row has produced an eos id. The budget ``max_new_tokens`` and every knob are traced, so one program serves
every request of the same bucket (see :mod:`gpt2_jax.generation.engine`).

Randomness: row ``r`` of the output (prompt ``b``, return sequence ``j``) draws from
``fold_in(prompt_key_b, j)``, split each step, where ``prompt_key_b = fold_in(key, b)`` for a single key, or the
``b``-th of ``[batch]`` keys. Passing one key per prompt makes each prompt's samples independent of what else is
in the batch.

Streaming (:mod:`gpt2_jax.generation.streaming`) runs :func:`start_state` and :func:`advance_state` (the same
functions traced here) from a Python loop.
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
from .config import GenerationConfig
from .engine import carry_cache, count_trace, forward, hook_runner_for, program_weights, repeat_cache, unflatten_cache
from .logits_processors import ProcessorState, apply_processors
from .request import GenerationOutput, Knobs, Request, prompt_keys, row_keys


@struct.dataclass
class SamplingState:
    """The ``while_loop`` carry of the sampler.

    Attributes:
        step: ``[]`` int32, tokens generated so far.
        tokens: ``[rows, bucket + cap]`` int32: the left-padded prompt, then the generated tokens.
        start: ``[rows]`` int32, the first real slot of each row (for the n-gram ban).
        cache: the KV cache (``rows`` rows, ``bucket + cap`` slots), in the carry layout of the spec's tuning
            (:func:`~gpt2_jax.generation.engine.carry_cache`: the one-row view under ``single_row_cache_view``).
        done: ``[rows]`` bool, the row has produced an eos id.
        num_new_tokens: ``[rows]`` int32, tokens generated before finishing (eos included).
        keys: ``[rows]`` PRNG keys, split every step.
        seen: ``[rows, vocab]`` bool, ids present in the row (repetition penalty).
        logprobs: ``[rows, cap]`` float32 log-probs of the picked tokens, or None.
        scores: ``[rows, cap, vocab]`` float32 processed scores of each step (``output_scores``), or None.
        raw_logits: ``[rows, cap, vocab]`` float32 raw logits of each step (``output_logits``), or None.
    """

    step: jax.Array
    tokens: jax.Array
    start: jax.Array
    cache: KVCache
    done: jax.Array
    num_new_tokens: jax.Array
    keys: jax.Array
    seen: jax.Array
    logprobs: jax.Array | None
    scores: jax.Array | None = None
    raw_logits: jax.Array | None = None
    activations: dict | None = None  # {name: [rows, cap, ...]} (return_activations)


def _write_activations(buffers: dict | None, runner, step: jax.Array) -> dict | None:
    """``buffers[name] [rows, cap, ...]`` with the last position of each recorded activation written at ``step``."""
    if not buffers:
        return buffers
    return {name: jax.lax.dynamic_update_slice_in_dim(buf, runner.store[name][:, -1:].astype(buf.dtype), step, axis=1)
            for name, buf in buffers.items()}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static (compile-time) part of a sampling request, backend tuning included; hashable, a ``jit`` static
    argument."""

    model_config: GPT2Config
    dtype: str
    bucket: int
    cap: int
    num_return_sequences: int
    do_sample: bool
    return_logprobs: bool
    tuning: Tuning
    output_scores: bool = False
    output_logits: bool = False
    hooks: Any = None  # a gpt2_jax.interp.runner.HookSpec (hook code); its data is a traced program argument
    activations: tuple[str, ...] = ()  # hook names whose activations are returned for every generated token

    @classmethod
    def from_request(cls, request: Request) -> "SamplerSpec":
        c = request.config
        return cls(
            request.model_config, request.dtype, request.prompts.bucket, request.cap, c.num_return_sequences,
            c.do_sample, c.return_logprobs, request.tuning, c.output_scores, c.output_logits,
        )


def eos_mask(eos_ids: jax.Array, vocab_size: int) -> jax.Array:
    """``[vocab]`` bool, True at the eos ids."""
    return jnp.zeros((vocab_size,), bool).at[eos_ids].set(True)


def processor_state(state: SamplingState, knobs: Knobs, spec: SamplerSpec) -> ProcessorState:
    """What the processors see while choosing token ``step`` of every row."""
    return ProcessorState(tokens=state.tokens, start=state.start, end=spec.bucket + state.step, step=state.step,
                          prompt_width=knobs.prompt_width, max_new_tokens=knobs.max_new_tokens, seen=state.seen)


def pick(processed: jax.Array, keys: jax.Array, do_sample: bool):
    """Argmax, or one draw per row with its key split (``(token [rows] int32, new keys)``)."""
    if not do_sample:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32), keys
    pairs = jax.vmap(jax.random.split)(keys)  # [rows, 2, ...]
    keys, draw = pairs[:, 0], pairs[:, 1]
    return jax.vmap(processors.sample)(draw, processed).astype(jnp.int32), keys


def _write_step(buffer: jax.Array | None, values: jax.Array, step: jax.Array) -> jax.Array | None:
    """``buffer [rows, cap, vocab]`` with ``values [rows, vocab]`` written at ``step`` (None stays None)."""
    if buffer is None:
        return None
    return jax.lax.dynamic_update_slice_in_dim(buffer, values[:, None, :].astype(buffer.dtype), step, axis=1)


def select_next(state: SamplingState, logits: jax.Array, knobs: Knobs, spec: SamplerSpec) -> SamplingState:
    """Process ``logits [rows, vocab]`` with the request's processors, pick each row's next token and write it at
    slot ``bucket + step``."""
    vocab = logits.shape[-1]
    end = spec.bucket + state.step  # one past the last written slot
    processed = apply_processors(knobs.processors, logits, processor_state(state, knobs, spec))  # [rows, vocab]
    token, keys = pick(processed, state.keys, spec.do_sample)
    token = jnp.where(state.done, knobs.pad_id, token)  # [rows]
    rows = jnp.arange(token.shape[0])
    logprobs = state.logprobs
    if logprobs is not None:
        picked = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), token[:, None], axis=-1)[:, 0]
        logprobs = jax.lax.dynamic_update_slice_in_dim(
            logprobs, jnp.where(state.done, 0.0, picked)[:, None], state.step, axis=1
        )
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], end, axis=1)
    finished = eos_mask(knobs.eos_ids, vocab)[token]
    if knobs.stop is not None:
        finished |= knobs.stop.matches(tokens, state.start, end + 1)
    return state.replace(
        step=state.step + 1,
        tokens=tokens,
        done=state.done | finished,
        num_new_tokens=state.num_new_tokens + (~state.done).astype(jnp.int32),
        keys=keys,
        seen=state.seen.at[rows, token].set(True),
        logprobs=logprobs,
        scores=_write_step(state.scores, processed, state.step),
        raw_logits=_write_step(state.raw_logits, logits, state.step),
    )


def start_state(params, input_ids, attention_mask, keys, knobs: Knobs, spec: SamplerSpec,
                hook_data=()) -> SamplingState:
    """Prefill the prompts and pick the first token.

    Args:
        params: model params.
        input_ids: ``[batch, bucket]`` left-padded prompts; attention_mask: the same shape.
        keys: ``[batch]`` prompt keys.
        knobs: traced knobs (:func:`~gpt2_jax.generation.request.make_knobs`).
        spec: the static part.
    """
    cfg, n = spec.model_config, spec.num_return_sequences
    batch = input_ids.shape[0]
    cache = KVCache.zeros(cfg, batch, spec.bucket + spec.cap, jnp.dtype(spec.dtype))
    runner = hook_runner_for(spec.hooks, hook_data, spec.activations)
    logits, cache = forward(params, input_ids, attention_mask, cache, cfg, spec.dtype, spec.tuning,
                            hooks=runner)  # once a prompt
    activations = None
    if spec.activations:  # [batch, bucket, ...] -> [rows, cap, ...] buffers, the prompt's last position at step 0
        store = {k: jnp.repeat(v[:, -1:], n, axis=0) for k, v in runner.store.items()}
        activations = {k: jnp.zeros((batch * n, spec.cap, *v.shape[2:]), v.dtype).at[:, :1].set(v)
                       for k, v in store.items()}
    if n > 1:  # the return sequences of a prompt share its prefill
        cache = repeat_cache(cache, n)
        logits, input_ids, attention_mask = (jnp.repeat(x, n, axis=0) for x in (logits, input_ids, attention_mask))
    rows = batch * n
    tokens = jnp.full((rows, spec.bucket + spec.cap), knobs.pad_id, jnp.int32)
    tokens = tokens.at[:, : spec.bucket].set(input_ids)
    real = attention_mask.astype(bool)
    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        tokens=tokens,
        start=spec.bucket - real.sum(axis=1, dtype=jnp.int32),
        cache=carry_cache(cache, spec.tuning),
        done=jnp.zeros((rows,), bool),
        num_new_tokens=jnp.zeros((rows,), jnp.int32),
        keys=row_keys(keys, n),
        seen=processors.seen_mask(input_ids, real, cfg.vocab_size),
        logprobs=jnp.zeros((rows, spec.cap), jnp.float32) if spec.return_logprobs else None,
        scores=jnp.zeros((rows, spec.cap, cfg.vocab_size), jnp.float32) if spec.output_scores else None,
        raw_logits=jnp.zeros((rows, spec.cap, cfg.vocab_size), jnp.float32) if spec.output_logits else None,
        activations=activations,
    )
    return select_next(state, logits, knobs, spec)


def advance_state(params, state: SamplingState, knobs: Knobs, spec: SamplerSpec, hook_data=()) -> SamplingState:
    """Feed the last token of every row through the model and pick the next one."""
    last = jax.lax.dynamic_slice_in_dim(state.tokens, spec.bucket + state.step - 1, 1, axis=1)  # [rows, 1]
    runner = hook_runner_for(spec.hooks, hook_data, spec.activations)
    logits, cache = forward(params, last, None, unflatten_cache(state.cache), spec.model_config, spec.dtype,
                            spec.tuning, hooks=runner)  # the model takes the 4-D cache: a free reshape of the view
    state = state.replace(cache=carry_cache(cache, spec.tuning),
                          activations=_write_activations(state.activations, runner, state.step))
    return select_next(state, logits, knobs, spec)


def keep_going(state: SamplingState, knobs: Knobs) -> jax.Array:
    """The loop condition: budget left and some row not finished."""
    return (state.step < knobs.max_new_tokens) & ~jnp.all(state.done)


@functools.partial(jax.jit, static_argnames=("spec",))
def _sample_program(params, input_ids, attention_mask, keys, knobs, hook_data=(), *, spec: SamplerSpec):
    count_trace("sample")
    state = start_state(params, input_ids, attention_mask, keys, knobs, spec, hook_data)
    state = jax.lax.while_loop(
        lambda s: keep_going(s, knobs), lambda s: advance_state(params, s, knobs, spec, hook_data), state
    )
    return (state.tokens, state.step, state.num_new_tokens, state.logprobs, state.scores, state.raw_logits,
            state.activations)


def run_request(params, request: Request, key, hooks=None, return_activations=None) -> GenerationOutput:
    """Run a checked greedy / sampling request (``num_beams == 1``), with ``hooks`` (``[(name, fn), ...]``,
    :mod:`gpt2_jax.interp`) applied at prefill and every decode step, and the ``return_activations`` names
    recorded for every generated token."""
    spec = SamplerSpec.from_request(request)
    hook_data = ()
    if hooks or return_activations:
        from ..interp.generation import hook_spec_for_generation

        hook_spec, hook_data, names = hook_spec_for_generation(hooks, return_activations, request.model_config)
        spec = dataclasses.replace(spec, hooks=hook_spec, activations=names)
    prompts = request.prompts
    keys = prompt_keys(key, request.batch_size)
    tokens, steps, counts, logprobs, scores, raw, activations = _sample_program(
        program_weights(params, request.tuning, request.decode_rows), jnp.asarray(prompts.input_ids),
        jnp.asarray(prompts.attention_mask), keys, request.knobs, hook_data, spec=spec,
    )
    steps = int(steps)
    tokens = np.asarray(tokens)
    return GenerationOutput(
        sequences=tokens[:, prompts.bucket - prompts.width : prompts.bucket + steps],
        prompt_width=prompts.width,
        num_new_tokens=np.asarray(counts),
        logprobs=None if logprobs is None else np.asarray(logprobs)[:, :steps],
        scores=None if scores is None else np.asarray(scores)[:, :steps],
        logits=None if raw is None else np.asarray(raw)[:, :steps],
        activations=None if not activations else {k: np.asarray(v)[:, :steps] for k, v in activations.items()},
    )


def __getattr__(name: str):
    """``sampler.generate`` moved to :mod:`gpt2_jax.generation.api`; the old import path keeps working."""
    if name == "generate":
        from .api import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
