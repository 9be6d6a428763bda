"""The compiled core of generation: prompt preparation and bucketing, ``prefill`` and ``decode_step``.

Shapes that change per request are bucketed so a run of varied requests compiles a handful of programs:

* prompts are left-padded to a power of two (:func:`prompt_bucket`, at least 16 slots);
* the new-token budget is a traced value below a static cap, the next power of two (:func:`new_token_cap`).

The cache then holds ``bucket + cap`` slots. Slots are not positions: positions are counted over each row's real
tokens (the model derives them from the mask), so a cache may hold more slots than ``n_positions`` while every
position stays below it.

``prefill`` and ``decode_step`` are jitted with the cache donated, so XLA updates it in place. The
``while_loop`` sampler and beam search call the same (unjitted) :func:`forward` inside their own programs.

Backend tuning (:mod:`gpt2_jax.backend`) is resolved once per request from the params
(:func:`~gpt2_jax.backend.tuning_for`) and passed to every jitted program as a static argument, so it is part of
each compiled program's identity. It never changes a public shape: :func:`init_cache`, :func:`prefill` and
:func:`decode_step` take and return the documented :class:`~gpt2_jax.kv_cache.KVCache` (``[batch, n_head, S,
head_dim]`` per layer, or one stacked ``[n_layer, batch, ...]`` array for a ``scan_layers`` model); the one-row
``[n_head, S, head_dim]`` view of :attr:`~gpt2_jax.backend.Tuning.single_row_cache_view` lives only inside the
compiled loops' carries.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import backend
from ..backend import Tuning
from ..config import GPT2Config
from ..kv_cache import KVCache
from ..model import GPT2LMHeadModel
from ..precision import compute_dtype
from .weight_layout import DecodeWeights, decode_weights

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKEN_CAP = 16

#: How many times each jitted generation function has been traced (= compiled, unless the persistent cache
#: served it). Tests use it to check that knobs and in-bucket shapes do not recompile.
TRACE_COUNTS: collections.Counter = collections.Counter()


def count_trace(name: str) -> None:
    """Record one trace of the jitted function ``name`` (called from inside the traced Python function)."""
    TRACE_COUNTS[name] += 1


def next_power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def prompt_bucket(length: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """Slots a prompt of ``length`` real tokens is left-padded to: the next power of two, at least ``minimum``."""
    return max(next_power_of_two(length), minimum)


def new_token_cap(max_new_tokens: int, minimum: int = MIN_NEW_TOKEN_CAP) -> int:
    """Static cap of the traced new-token budget: the next power of two, at least ``minimum``."""
    return max(next_power_of_two(max_new_tokens), minimum)


def canonical_dtype(dtype: Any) -> str:
    """A dtype's name (``'float32'``, ``'bfloat16'``...), hashable and usable as a static jit argument."""
    return jnp.dtype(dtype).name


def params_dtype(params) -> str:
    """The dtype of the token embedding, taken as the compute dtype when none is given."""
    if isinstance(params, DecodeWeights):
        params = params.params
    return canonical_dtype(params["wte"]["embedding"].dtype)


@functools.lru_cache(maxsize=None)
def lm_model(config: GPT2Config, dtype: str, tuning: Tuning | None = None) -> GPT2LMHeadModel:
    """The (stateless) Flax module for ``config`` computing in ``dtype`` under ``tuning`` (cached per triple)."""
    return GPT2LMHeadModel(config, dtype=jnp.dtype(dtype), tuning=tuning)


def hooked_model(config: GPT2Config, dtype: str, tuning: Tuning | None, hooks=None) -> GPT2LMHeadModel:
    """:func:`lm_model`, or with ``hooks`` (a :class:`~gpt2_jax.interp.runner.HookRunner`) the model running them."""
    if hooks is None:
        return lm_model(config, dtype, tuning)
    return GPT2LMHeadModel(config, dtype=jnp.dtype(dtype), tuning=tuning, hooks=hooks)


def hook_runner_for(hook_spec, hook_data, activations: tuple[str, ...] = ()):
    """The :class:`~gpt2_jax.interp.runner.HookRunner` of one forward pass inside a generation program (hook code
    from ``hook_spec``, data traced, recording ``activations``), or None when there is nothing to run (the interp
    package is then not imported)."""
    if hook_spec is None and not activations:
        return None
    from ..interp.generation import hook_runner

    return hook_runner(hook_spec, hook_data, activations)


def init_cache(config: GPT2Config, batch_size: int, slots: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of ``slots`` slots for :func:`prefill` / :func:`decode_step`: the documented
    :class:`~gpt2_jax.kv_cache.KVCache` layout, keys/values ``[batch, n_head, slots, head_dim]`` per layer (one
    stacked ``[n_layer, batch, n_head, slots, head_dim]`` array each for a ``scan_layers`` model), whatever the
    batch size and the backend."""
    return KVCache.zeros(config, batch_size, slots, dtype)


def repeat_cache(cache: KVCache, repeats: int) -> KVCache:
    """Every row repeated ``repeats`` times in place (row ``b`` -> rows ``b*repeats .. b*repeats+repeats-1``), in
    either layer layout (per-layer or stacked)."""
    if repeats == 1:
        return cache
    return cache.map_rows(lambda x, axis: jnp.repeat(x, repeats, axis=axis))


def flatten_cache(cache: KVCache) -> KVCache:
    """The one-row view compiled loops carry under :attr:`~gpt2_jax.backend.Tuning.single_row_cache_view`:
    keys/values ``[n_head, S, head_dim]`` for a single-row per-layer cache; any other cache (several rows, a
    stacked ``scan_layers`` cache, one already flattened) is returned unchanged. A free reshape either way.

    That is the layout attention's batched matmul reads (XLA drops a unit batch dimension), so XLA (CPU) updates
    the carried buffers in place instead of copying the whole cache every step. Only for use inside a compiled
    program: the public functions always take and return the 4-D cache (:func:`unflatten_cache` restores it).
    """
    if cache.stacked or cache.valid.shape[0] != 1 or cache.keys[0].ndim != 4:
        return cache
    return cache.map_kv(lambda x, axis: x[0])  # [1, n_head, S, head_dim] -> [n_head, S, head_dim]


def unflatten_cache(cache: KVCache) -> KVCache:
    """Inverse of :func:`flatten_cache`: keys/values back to ``[batch, n_head, S, head_dim]`` (a cache in the
    documented layout is returned unchanged)."""
    if cache.stacked or cache.keys[0].ndim == 4:
        return cache
    return cache.map_kv(lambda x, axis: x[None])  # [n_head, S, head_dim] -> [1, n_head, S, head_dim]


def carry_cache(cache: KVCache, tuning: Tuning) -> KVCache:
    """The cache in the layout a compiled loop carries under ``tuning`` (:func:`flatten_cache` when
    :attr:`~gpt2_jax.backend.Tuning.single_row_cache_view` is set, else the cache as it is)."""
    return flatten_cache(cache) if tuning.single_row_cache_view else cache


def forward(params, input_ids: jax.Array, attention_mask: jax.Array | None, cache: KVCache, config: GPT2Config,
            dtype: str, tuning: Tuning | None = None, hooks=None) -> tuple[jax.Array, KVCache]:
    """One cached forward pass returning the logits of the last position only.

    Args:
        params: the model params, or :class:`~gpt2_jax.generation.weight_layout.DecodeWeights`.
        input_ids: ``[batch, T]`` int32, written at slots ``[cache.index, cache.index + T)``.
        attention_mask: ``[batch, T]`` (None: all real tokens).
        cache: the cache before the write, in the documented 4-D (or stacked) layout.
        config, dtype: the architecture and compute dtype.
        tuning: the backend settings (static); None: :func:`~gpt2_jax.backend.tuning_for` of ``params`` (JAX's
            default backend when they are tracers). The compiled programs always pass the request's.
        hooks: a :class:`~gpt2_jax.interp.runner.HookRunner` built inside the calling program (its hook code is
            part of that program's static identity, its data traced), or None: the plain model.

    Returns:
        ``(logits [batch, vocab] float32, the advanced cache)``.
    """
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    variables = params.variables if isinstance(params, DecodeWeights) else {"params": params}
    out = hooked_model(config, dtype, tuning, hooks).apply(
        variables, input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1
    )
    return out.logits[:, -1].astype(jnp.float32), out.cache  # [batch, 1, vocab] -> [batch, vocab]


@functools.partial(jax.jit, static_argnames=("config", "dtype", "tuning"), donate_argnames=("cache",))
def _prefill(params, input_ids, attention_mask, cache, *, config, dtype, tuning):
    count_trace("prefill")
    return forward(params, input_ids, attention_mask, cache, config, dtype, tuning)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "tuning"), donate_argnames=("cache",))
def _decode_step(params, tokens, cache, *, config, dtype, tuning):
    count_trace("decode_step")
    return forward(params, tokens[:, None], None, cache, config, dtype, tuning)  # tokens [batch] -> [batch, 1]


def program_weights(params, tuning: Tuning, rows: int) -> DecodeWeights:
    """What the compiled programs take for ``params`` under ``tuning`` when each of their decode steps computes
    ``rows`` rows (:func:`~gpt2_jax.generation.weight_layout.decode_weights`: kernels transposed under
    :attr:`~gpt2_jax.backend.Tuning.transposed_kernels` for one row, narrow weights widened where
    :attr:`~gpt2_jax.backend.Tuning.low_precision_compute` is off); prepared ``DecodeWeights`` as they are."""
    if isinstance(params, DecodeWeights):
        return params
    return decode_weights(params, tuning=tuning, rows=rows)  # transposed for one row, upcast where needed


def _check_public_cache(cache: KVCache, what: str) -> None:
    """Reject a cache in the loops' internal one-row view (the public functions take the documented layout)."""
    if not cache.stacked and cache.keys and cache.keys[0].ndim != 4:
        raise ValueError(
            f"{what} takes the cache in the KVCache layout, keys [batch, n_head, slots, head_dim] per layer; got "
            f"keys of shape {list(cache.keys[0].shape)} (use init_cache, or unflatten_cache on a loop's view)"
        )


def prefill(params, input_ids, attention_mask, cache: KVCache, *, config: GPT2Config,
            dtype: Any = None, tuning: Tuning | None = None) -> tuple[jax.Array, KVCache]:
    """Run a (left-padded) prompt through the model, filling the cache; the cache is donated.

    Args:
        params: the model params (on the CPU computed with transposed kernels,
            :func:`~gpt2_jax.generation.weight_layout.decode_weights`).
        input_ids: ``[batch, T]`` int token ids.
        attention_mask: ``[batch, T]``, 1 for real tokens, 0 for padding.
        cache: a cache with room for ``T`` more slots (:func:`init_cache`, or any ``KVCache``); donated (do not
            reuse it).
        config: the model's :class:`GPT2Config`.
        dtype: compute dtype (default: the params' dtype).
        tuning: backend settings (default: :func:`~gpt2_jax.backend.tuning_for` the params).

    Returns:
        ``(logits [batch, vocab] float32 of the last slot, cache advanced by T slots)``, the cache in the
        :class:`~gpt2_jax.kv_cache.KVCache` layout (:func:`init_cache`).
    """
    _check_public_cache(cache, "prefill")
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    dtype = compute_dtype(dtype, params, tuning)  # bfloat16 computes in float32 where low_precision_compute is off
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    input_ids = jnp.asarray(input_ids, jnp.int32)  # [batch, T]: the rows the decode steps after it compute
    return _prefill(program_weights(params, tuning, rows=input_ids.shape[0]), input_ids, mask, cache, config=config,
                    dtype=dtype, tuning=tuning)


def decode_step(params, tokens, cache: KVCache, *, config: GPT2Config, dtype: Any = None,
                tuning: Tuning | None = None) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (``tokens [batch]``) and return ``(logits [batch, vocab], cache)``; the cache is
    donated and returned in the :class:`~gpt2_jax.kv_cache.KVCache` layout (:func:`init_cache`), which XLA
    updates in place.

    ``params`` may be plain params (looked up in :func:`~gpt2_jax.generation.weight_layout.decode_weights`'s cache
    on every call) or, in a loop, ``decode_weights(params)`` prepared once. ``tuning``: backend settings (default:
    :func:`~gpt2_jax.backend.tuning_for` the params)."""
    _check_public_cache(cache, "decode_step")
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    dtype = compute_dtype(dtype, params, tuning)  # bfloat16 computes in float32 where low_precision_compute is off
    tokens = jnp.asarray(tokens, jnp.int32)  # [batch]
    return _decode_step(program_weights(params, tuning, rows=tokens.shape[0]), tokens, cache, config=config,
                        dtype=dtype, tuning=tuning)


# Prompt preparation (host side, concrete values: every check here runs before anything compiles) --------------
@dataclasses.dataclass(frozen=True)
class PreparedPrompts:
    """Prompts normalised for the compiled programs.

    Attributes:
        input_ids: ``[batch, bucket]`` int32, each row's real tokens right-aligned (left padding = ``pad_id``).
        attention_mask: ``[batch, bucket]`` int32.
        lengths: ``[batch]`` real tokens per row (an empty prompt became the single bos token).
        width: the longest prompt (the prompt width of the returned sequences).
        bucket: the padded length (a power of two >= width).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray
    width: int
    bucket: int


def _as_rows(input_ids, attention_mask) -> list[np.ndarray]:
    """The real tokens of every row, as a list of 1-D int64 arrays."""
    if isinstance(input_ids, (list, tuple)) and (len(input_ids) == 0 or not np.isscalar(input_ids[0])):
        if attention_mask is not None:
            raise ValueError("attention_mask cannot be combined with a list of token lists (they are ragged already)")
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in input_ids]
        if not rows:
            raise ValueError("input_ids holds no prompts (batch of 0)")
        return rows
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask).reshape(1, -1)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq] (or one [seq] prompt), got shape {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("input_ids holds no prompts (batch of 0)")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if attention_mask is None:
        return [row.astype(np.int64) for row in ids]
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)} like input_ids")
    return [row[m.astype(bool)].astype(np.int64) for row, m in zip(ids, mask)]


def prepare_prompts(
    input_ids,
    attention_mask,
    *,
    vocab_size: int,
    n_positions: int,
    max_new_tokens: int,
    bos_id: int | None,
    pad_id: int,
    min_bucket: int = MIN_PROMPT_BUCKET,
) -> PreparedPrompts:
    """Check prompts and left-pad them to their bucket.

    Accepts ``[batch, seq]`` (or ``[seq]``) ids with an optional mask (any padding side: each row's real tokens
    are re-aligned to the right), or a list of token lists. An empty prompt (a row with no real token, or a
    ``[batch, 0]`` input) becomes ``[bos_id]``: GPT-2 was trained with ``<|endoftext|>`` between documents, so
    that is what it continues from, as in OpenAI's and Hugging Face's unconditional generation.

    Raises:
        ValueError: ids (or the bos id of an empty prompt) outside ``[0, vocab_size)``, or a prompt plus ``max_new_tokens`` beyond ``n_positions``.
    """
    rows = _as_rows(input_ids, attention_mask)
    if bos_id is None and any(row.size == 0 for row in rows):
        raise ValueError("a prompt is empty and there is no bos_token_id (nor eos_token_id) to start from")
    if any(row.size == 0 for row in rows) and not 0 <= bos_id < vocab_size:
        raise ValueError(f"bos_token_id {bos_id} (the prompt of an empty prompt) is outside the vocabulary [0, {vocab_size})")
    rows = [row if row.size else np.asarray([bos_id], np.int64) for row in rows]
    for b, row in enumerate(rows):
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt {b} contains token id {bad}, outside the vocabulary [0, {vocab_size})")
    lengths = np.asarray([row.size for row in rows], np.int32)
    width = int(lengths.max())
    if width + max_new_tokens > n_positions:
        raise ValueError(
            f"the longest prompt ({width} tokens) plus max_new_tokens ({max_new_tokens}) is {width + max_new_tokens}, "
            f"beyond the model's n_positions ({n_positions}); shorten the prompt or lower max_new_tokens"
        )
    bucket = prompt_bucket(width, min_bucket)
    ids = np.full((len(rows), bucket), pad_id, np.int32)
    mask = np.zeros((len(rows), bucket), np.int32)
    for b, row in enumerate(rows):
        ids[b, bucket - row.size:] = row
        mask[b, bucket - row.size:] = 1
    return PreparedPrompts(ids, mask, lengths, width, bucket)


def resolve_special_ids(gen_eos: Sequence[int] | None, gen_pad: int | None, gen_bos: int | None,
                        model_config: GPT2Config, vocab_size: int) -> tuple[tuple[int, ...], int, int]:
    """``(eos ids, pad id, bos id)`` from the generation config, falling back to the model config.

    Raises:
        ValueError: an eos or pad id outside the vocabulary (the pad id is fed to the model for padding).
    """
    if gen_eos is None:
        gen_eos = () if model_config.eos_token_id is None else (model_config.eos_token_id,)
    eos = tuple(int(i) for i in gen_eos)
    pad = gen_pad if gen_pad is not None else model_config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    bos = gen_bos if gen_bos is not None else model_config.bos_token_id
    if bos is None:
        bos = eos[0] if eos else None
    for name, ids in (("eos_token_id", eos), ("pad_token_id", (pad,))):
        for i in ids:
            if not 0 <= i < vocab_size:
                raise ValueError(f"{name} {i} is outside the vocabulary [0, {vocab_size})")
    return eos, int(pad), (None if bos is None else int(bos))  # bos is checked where an empty prompt uses it
