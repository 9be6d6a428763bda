"""KVCache: the static-shape key/value cache that prefill and decode pass through the model.

The cache is an ordinary pytree argument: ``model.apply(params, ids, cache=cache)`` returns a new cache and the
old one can be donated to ``jit`` so XLA updates it in place. Every row of a batch writes the same slots (slot =
time step), so a left-padded batch stays aligned; ``valid`` marks which slots hold real (non-pad) tokens and
``next_position`` tracks each row's own position count, so padding never shifts positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import GPT2Config


@struct.dataclass
class KVCache:
    """Keys and values of every layer for ``max_length`` slots.

    Attributes:
        keys: one array per layer, ``[batch, n_head, max_length, head_dim]``; for a model with
            ``config.scan_layers`` one stacked array ``[n_layer, batch, n_head, max_length, head_dim]``.
        values: like ``keys``.
        valid: ``[batch, max_length]`` bool; True where the slot holds a real token.
        index: ``[]`` int32; the next slot to write (shared by all rows).
        next_position: ``[batch]`` int32; the position id the row's next real token gets.
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    valid: jax.Array
    index: jax.Array
    next_position: jax.Array

    @classmethod
    def init(cls, config: GPT2Config, batch_size: int, max_length: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache for ``batch_size`` rows and ``max_length`` slots (at most ``config.n_positions``)."""
        if not 0 < max_length <= config.n_positions:
            raise ValueError(
                f"cache max_length must be in [1, n_positions={config.n_positions}], got {max_length}"
            )
        return cls.zeros(config, batch_size, max_length, dtype)

    @classmethod
    def zeros(cls, config: GPT2Config, batch_size: int, slots: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache of ``slots`` slots with no cap at ``n_positions``: generation's bucketed caches count
        left padding as slots too, while every position stays below the limit (checked when prompts are prepared)."""
        if batch_size <= 0:
            raise ValueError(f"cache batch_size must be positive, got {batch_size}")
        if slots <= 0:
            raise ValueError(f"cache slots must be positive, got {slots}")
        shape = (batch_size, config.n_head, slots, config.head_dim)  # [batch, n_head, slots, head_dim]
        if config.scan_layers:  # one stacked array [n_layer, batch, n_head, slots, head_dim]
            keys, values = jnp.zeros((config.n_layer, *shape), dtype), jnp.zeros((config.n_layer, *shape), dtype)
        else:
            keys = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
            values = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
        return cls(
            keys=keys,
            values=values,
            valid=jnp.zeros((batch_size, slots), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    @property
    def stacked(self) -> bool:
        """True when keys/values are one ``[n_layer, batch, ...]`` array each (a ``scan_layers`` model)."""
        return not isinstance(self.keys, (tuple, list))

    def map_kv(self, fn) -> "KVCache":
        """The cache with ``fn(array, batch_axis)`` applied to every key/value array (``batch_axis`` is 1 for a
        stacked cache, else 0)."""
        if self.stacked:
            return self.replace(keys=fn(self.keys, 1), values=fn(self.values, 1))
        return self.replace(keys=tuple(fn(x, 0) for x in self.keys), values=tuple(fn(x, 0) for x in self.values))

    def map_rows(self, fn) -> "KVCache":
        """The cache with ``fn(array, batch_axis)`` applied to every per-row array (keys, values, ``valid``,
        ``next_position``), e.g. to gather, repeat or slice rows whatever the layer layout."""
        cache = self.map_kv(fn)
        return cache.replace(valid=fn(self.valid, 0), next_position=fn(self.next_position, 0))

    def reorder(self, rows: jax.Array) -> "KVCache":
        """The cache with its rows gathered by ``rows`` (``[new_batch]`` int), e.g. to follow beam parents."""
        return self.map_rows(lambda x, axis: jnp.take(x, rows, axis=axis))


def write_slots(cache_array: jax.Array, new: jax.Array, index: jax.Array, single_row_view: bool = False) -> jax.Array:
    """Write ``new`` ``[batch, n_head, T, head_dim]`` into slots ``[index, index + T)`` of a cache array.

    With ``single_row_view`` (:attr:`gpt2_jax.backend.Tuning.single_row_cache_view`) and one row, the update runs on
    the ``[n_head, S, head_dim]`` view, the layout attention's batched matmul reads then: XLA (CPU) updates a
    loop-carried cache in place, where a 4-D update read through a reshape was duplicated into two fusions, each
    copying the whole cache every decode step. With several rows the matmul reads the 4-D array, and so does the
    update.
    """
    new = new.astype(cache_array.dtype)
    if single_row_view and cache_array.shape[0] == 1:
        return jax.lax.dynamic_update_slice(cache_array[0], new[0], (0, index, 0))[None]
    return jax.lax.dynamic_update_slice(cache_array, new, (0, 0, index, 0))


def advance(cache: KVCache, keys, values, token_mask: jax.Array) -> KVCache:
    """The cache after writing ``T`` new slots: new per-layer keys/values, validity and position counters.

    Args:
        cache: the cache before the write.
        keys, values: the updated per-layer arrays (already written with :func:`write_slots`).
        token_mask: ``[batch, T]`` bool, True for the real tokens among the ``T`` just written.
    """
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
    stacked = not isinstance(keys, (tuple, list))  # one [n_layer, ...] array (scan_layers) or one per layer
    return KVCache(
        keys=keys if stacked else tuple(keys),
        values=values if stacked else tuple(values),
        valid=valid,
        index=cache.index + token_mask.shape[1],
        next_position=cache.next_position + token_mask.sum(axis=1, dtype=jnp.int32),
    )
