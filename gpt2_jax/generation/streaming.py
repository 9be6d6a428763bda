"""Streaming: a Python loop over the sampler's own step functions, yielding tokens as they are produced.

:func:`stream` compiles :func:`~gpt2_jax.generation.sampler.start_state` (prefill + first token) and
:func:`~gpt2_jax.generation.sampler.advance_state` (one decode step, the loop state donated so the cache is
updated in place) as two programs, and runs the loop from Python. They are the same functions the ``while_loop``
of :func:`~gpt2_jax.generation.generate` traces, with the same keys, so for the same request and key the stream
yields the same tokens as ``generate`` returns.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from .config import GenerationConfig
from .engine import count_trace, program_weights
from .request import build_request, prompt_keys, request_key
from .sampler import SamplerSpec, SamplingState, advance_state, keep_going, start_state


class StreamStep(NamedTuple):
    """One step of a stream: ``tokens [rows]`` picked this step, and ``active [rows]``, False for rows that
    had already finished (their token is the pad id)."""

    tokens: np.ndarray
    active: np.ndarray


def _report(state: SamplingState, done_before: jax.Array, knobs: dict, spec: SamplerSpec):
    token = jax.lax.dynamic_index_in_dim(state.tokens, spec.bucket + state.step - 1, axis=1, keepdims=False)
    return token, ~done_before, keep_going(state, knobs)


@functools.partial(jax.jit, static_argnames=("spec",))
def _start_program(params, input_ids, attention_mask, keys, knobs, *, spec: SamplerSpec):
    count_trace("stream_start")
    state = start_state(params, input_ids, attention_mask, keys, knobs, spec)
    return (state, *_report(state, jnp.zeros_like(state.done), knobs, spec))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def _advance_program(params, state: SamplingState, knobs, *, spec: SamplerSpec):
    count_trace("stream_advance")
    done_before = state.done
    state = advance_state(params, state, knobs, spec)
    return (state, *_report(state, done_before, knobs, spec))


def stream(
    params,
    input_ids,
    attention_mask=None,
    key=None,
    config: GenerationConfig | None = None,
    *,
    model_config: GPT2Config,
    dtype: Any = None,
    **overrides: Any,
) -> Iterator[StreamStep]:
    """Yield the tokens of every row step by step (greedy or sampling; beam search cannot stream).

    Takes the arguments of :func:`~gpt2_jax.generation.generate`. Everything is checked before the first
    compile. The stream ends when every row has finished or the budget is spent.

    Yields:
        :class:`StreamStep` ``(tokens [rows], active [rows])``, rows ordered as ``generate``'s output.
    """
    request = build_request(params, model_config, input_ids, attention_mask, config, dtype, **overrides)
    if request.config.num_beams > 1:
        raise ValueError("streaming supports greedy decoding and sampling, not beam search (num_beams > 1)")
    key = request_key(request.config, key)
    spec = SamplerSpec.from_request(request)
    prompts = request.prompts
    weights = program_weights(params, request.tuning, request.decode_rows)
    state, token, active, going = _start_program(
        weights, jnp.asarray(prompts.input_ids), jnp.asarray(prompts.attention_mask),
        prompt_keys(key, request.batch_size), request.knobs, spec=spec,
    )
    while True:
        yield StreamStep(np.asarray(token), np.asarray(active))
        if not bool(going):
            return
        state, token, active, going = _advance_program(weights, state, request.knobs, spec=spec)
