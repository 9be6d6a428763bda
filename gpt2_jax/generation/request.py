"""One generation request, checked and normalised on the host before anything is traced or compiled.

:func:`build_request` resolves the special ids, validates the prompts against the model (vocabulary, n_positions),
left-pads them to their bucket, turns the knobs into arrays and resolves the backend tuning once from where the
params live (:func:`gpt2_jax.backend.tuning_for`). :class:`GenerationOutput` is what
:func:`gpt2_jax.generation.generate` returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from .. import backend
from ..backend import Tuning
from ..config import GPT2Config
from ..precision import compute_dtype
from .config import GenerationConfig
from .engine import PreparedPrompts, new_token_cap, prepare_prompts, resolve_special_ids
from .logits_processors import build_processors


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request: prompts at their bucket, the resolved config and special ids, the traced knobs and the
    backend tuning (a static argument of every program the request runs)."""

    prompts: PreparedPrompts
    config: GenerationConfig
    model_config: GPT2Config
    eos_ids: tuple[int, ...]
    pad_id: int
    cap: int  # static cap of the new-token budget
    dtype: str  # compute dtype name
    knobs: Knobs  # the traced arguments, processors included
    tuning: Tuning  # backend settings, resolved once from the params' platform

    @property
    def batch_size(self) -> int:
        return int(self.prompts.input_ids.shape[0])

    @property
    def decode_rows(self) -> int:
        """Rows each decode step computes: prompts x beams (beam search) or x return sequences (sampling)."""
        return self.batch_size * self.config.rows_per_prompt


@struct.dataclass
class Knobs:
    """The traced arguments of a request (a pytree: changing a value never recompiles; which processors exist is
    structure and does).

    Attributes:
        max_new_tokens: ``[]`` int32, the budget (below the static cap).
        length_penalty: ``[]`` float32 (beam search).
        eos_ids: ``[n_eos]`` int32.
        pad_id: ``[]`` int32.
        prompt_width: ``[]`` int32, the padded prompt width (Hugging Face's ``input_ids_seq_length``).
        processors: the ordered logits processors (:func:`~gpt2_jax.generation.logits_processors.build_processors`).
        stop: the stop-string tables (:class:`~gpt2_jax.generation.stop_strings.StopStrings`), or None.
    """

    max_new_tokens: jax.Array
    length_penalty: jax.Array
    eos_ids: jax.Array
    pad_id: jax.Array
    prompt_width: jax.Array
    processors: tuple
    stop: Any = None


def make_knobs(config: GenerationConfig, eos_ids: tuple[int, ...], pad_id: int, *, vocab_size: int,
               prompt_width: int = 1, tuning: Tuning | None = None, beams: bool = False,
               logits_processor: tuple = (), stop: Any = None) -> Knobs:
    """The traced knobs of a request, the processor list built once from ``config``."""
    return Knobs(
        max_new_tokens=jnp.asarray(config.max_new_tokens, jnp.int32),
        length_penalty=jnp.asarray(config.length_penalty, jnp.float32),
        eos_ids=jnp.asarray(eos_ids, jnp.int32).reshape(-1),
        pad_id=jnp.asarray(pad_id, jnp.int32),
        prompt_width=jnp.asarray(prompt_width, jnp.int32),
        processors=build_processors(config, eos_ids=eos_ids, vocab_size=vocab_size, prompt_width=prompt_width,
                                    tuning=tuning, beams=beams, user=tuple(logits_processor)),
        stop=stop,
    )


def build_request(
    params,
    model_config: GPT2Config,
    input_ids,
    attention_mask=None,
    config: GenerationConfig | None = None,
    dtype: Any = None,
    *,
    tuning: Tuning | None = None,
    logits_processor=(),
    tokenizer: Any = None,
    **overrides: Any,
) -> Request:
    """Check and normalise a request (see :func:`gpt2_jax.generation.generate` for the arguments).

    ``logits_processor``: the caller's own processor objects (see
    :mod:`~gpt2_jax.generation.logits_processors`); ``tokenizer``: needed for ``stop_strings``.

    ``tuning`` defaults to :func:`~gpt2_jax.backend.tuning_for` the params (their devices' platform, then the
    overrides); it is resolved here, once, and travels with the request.

    Raises:
        ValueError: bad knob values, ids outside the vocabulary, prompt + budget beyond ``n_positions``,
            stop strings without a tokenizer.
    """
    if not isinstance(model_config, GPT2Config):
        raise ValueError(f"model_config must be a GPT2Config, got {type(model_config).__name__}")
    config = config if config is not None else GenerationConfig()
    if overrides:
        config = config.replace(**overrides)
    vocab = model_config.vocab_size
    eos, pad, bos = resolve_special_ids(
        config.eos_ids_or_none(), config.pad_token_id, config.bos_token_id, model_config, vocab
    )
    prepare = lambda budget: prepare_prompts(
        input_ids, attention_mask, vocab_size=vocab, n_positions=model_config.n_positions,
        max_new_tokens=budget, bos_id=bos, pad_id=pad,
    )
    if config.max_length is not None:  # a total-length budget: what is left after the longest prompt
        width = prepare(0).width
        if config.max_length <= width:
            raise ValueError(f"max_length ({config.max_length}) leaves no room after the longest prompt ({width} tokens)")
        config = config.replace(max_new_tokens=config.max_length - width, max_length=None)
    prompts = prepare(config.max_new_tokens)
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    dtype_name = compute_dtype(dtype, params, tuning)  # float32 for bfloat16 where low_precision_compute is off
    stop = None
    if config.stop_strings is not None:
        from .stop_strings import stop_string_tables

        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer= (a GPT2Tokenizer or a Hugging Face "
                             "tokenizer) to generate")
        stop = stop_string_tables(tokenizer, config.stop_strings, vocab)
    knobs = make_knobs(config, eos, pad, vocab_size=vocab, prompt_width=prompts.width, tuning=tuning,
                       beams=config.num_beams > 1, logits_processor=tuple(logits_processor), stop=stop)
    return Request(
        prompts=prompts, config=config, model_config=model_config, eos_ids=eos, pad_id=pad,
        cap=new_token_cap(config.max_new_tokens), dtype=dtype_name, knobs=knobs, tuning=tuning,
    )


def request_key(config: GenerationConfig, key):
    """The key a checked request runs with: ``key``, or a fixed one when nothing is sampled.

    Raises:
        ValueError: sampling (``do_sample``) without a key.
    """
    if key is not None:
        return key
    if config.do_sample:
        raise ValueError("sampling (do_sample=True) needs a key: pass key=jax.random.key(seed)")
    return jax.random.PRNGKey(0)


def _is_typed_key(key) -> bool:
    return jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)


def prompt_keys(key, batch_size: int) -> jax.Array:
    """One key per prompt: a single key ``k`` gives ``fold_in(k, b)`` for prompt ``b``; ``batch_size`` keys (a
    ``[batch]`` typed key array or ``[batch, 2]`` raw ``uint32`` keys) are used as they are.

    Raises:
        ValueError: a key batch of the wrong size.
    """
    key = key if _is_typed_key(key) else jnp.asarray(key)
    batch_shape = key.shape if _is_typed_key(key) else key.shape[:-1]
    if not _is_typed_key(key) and (key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] != 2):
        raise ValueError(f"key must be a jax.random key, got an array of dtype {key.dtype} and shape {key.shape}")
    if batch_shape == ():
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch_size))
    if batch_shape == (batch_size,):
        return key
    raise ValueError(f"key must be one key or one per prompt ({batch_size}), got a batch of shape {batch_shape}")


def row_keys(keys: jax.Array, repeats: int) -> jax.Array:
    """``[batch]`` prompt keys -> ``[batch * repeats]`` row keys: ``fold_in(key_b, j)`` for the j-th return
    sequence of prompt b (traced inside the programs)."""
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    per_prompt = jax.vmap(lambda k: fold(k, jnp.arange(repeats)))(keys)  # [batch, repeats, ...]
    return per_prompt.reshape(-1, *per_prompt.shape[2:])


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What :func:`~gpt2_jax.generation.generate` returns (host numpy arrays).

    Attributes:
        sequences: ``[batch * num_return_sequences, prompt_width + steps]`` int32: each prompt left-padded with
            the pad id to the longest prompt, then the generated tokens (pad after a row has finished). Rows of
            the same prompt are adjacent, as in Hugging Face.
        prompt_width: columns of ``sequences`` that hold the prompt.
        num_new_tokens: ``[rows]`` tokens each row generated, its eos included.
        logprobs: ``[rows, steps]`` float32 log-probability of each generated token under the processed
            distribution (``return_logprobs=True``; 0 after a row finished), else None.
        sequences_scores: ``[rows]`` beam scores (length-penalised sum of log-probs) for beam search, else None.
        scores: ``[rows, steps, vocab]`` float32 processed scores of every step (``output_scores=True``; Hugging
            Face's ``scores``; for beam search the processed log-probs of the running beams, ``[batch * num_beams,
            steps, vocab]``), else None.
        logits: ``[rows, steps, vocab]`` float32 raw logits of every step (``output_logits=True``), else None.
        num_accepted: speculative / prompt-lookup decoding: ``[rows]`` draft tokens accepted, else None.
        num_drafted: speculative / prompt-lookup decoding: ``[rows]`` draft tokens proposed, else None.
        activations: ``generate(..., return_activations=[names])``: ``{name: [rows, steps, ...]}``, the
            activation at the position whose logits picked each generated token, else None.
    """

    sequences: np.ndarray
    prompt_width: int
    num_new_tokens: np.ndarray
    logprobs: np.ndarray | None = None
    sequences_scores: np.ndarray | None = None
    scores: np.ndarray | None = None
    logits: np.ndarray | None = None
    num_accepted: np.ndarray | None = None
    num_drafted: np.ndarray | None = None
    activations: dict | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over proposed draft tokens (speculative / prompt-lookup decoding), else None."""
        if self.num_drafted is None:
            return None
        drafted = int(np.sum(self.num_drafted))
        return float(np.sum(self.num_accepted)) / drafted if drafted else 0.0

    def new_tokens(self) -> list[list[int]]:
        """Each row's generated tokens, without the padding after it finished."""
        return [
            row[self.prompt_width : self.prompt_width + int(n)].tolist()
            for row, n in zip(self.sequences, self.num_new_tokens)
        ]
