"""Ready-made hooks: zero / mean ablation of a head or a neuron, patching from a cached run, adding a vector.

Each is a small pytree dataclass, callable as ``hook(activation, ctx)``: its arrays (head index, neuron index,
patch source, vector, mask) are the traced data of the compiled program, so sweeping a head or a steering scale
reuses one program. Use them as ``run_with_hooks(params, config, ids, [(name, zero_ablate_head(3))])``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .runner import HookContext

_HEAD_FIRST = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]; the others are [batch, pos, head, .]


def _head_axis(ctx: HookContext, ndim: int) -> int:
    if ctx.name.endswith(_HEAD_FIRST):
        return 1
    if ndim != 4:
        raise ValueError(f"{ctx.name} has no head axis (shape rank {ndim}); head ablation needs attn.hook_q/k/v/z/"
                         "result/pattern/attn_scores")
    return 2


def _one_hot_axis(index, size: int, axis: int, ndim: int) -> jax.Array:
    """``[1, ..., size, ..., 1]`` bool, True at ``index`` along ``axis``."""
    shape = [1] * ndim
    shape[axis] = size
    return (jnp.arange(size) == index).reshape(shape)


@struct.dataclass
class AblateHead:
    """Replace head ``head`` (a traced int) by zero, or by its mean over batch and positions (``mean=True``)."""

    head: jax.Array
    mean: bool = struct.field(pytree_node=False, default=False)

    def __call__(self, a: jax.Array, ctx: HookContext) -> jax.Array:
        axis = _head_axis(ctx, a.ndim)
        where = _one_hot_axis(self.head, a.shape[axis], axis, a.ndim)
        if self.mean:
            fill = a.mean(axis=(0, 2) if axis == 1 else (0, 1), keepdims=True)
        else:
            fill = jnp.zeros((), a.dtype)
        return jnp.where(where, fill, a).astype(a.dtype)


@struct.dataclass
class AblateNeuron:
    """Replace neuron ``neuron`` (last axis, e.g. of ``mlp.hook_post``) by zero, or by its mean over batch and
    positions (``mean=True``)."""

    neuron: jax.Array
    mean: bool = struct.field(pytree_node=False, default=False)

    def __call__(self, a: jax.Array, ctx: HookContext) -> jax.Array:
        where = _one_hot_axis(self.neuron, a.shape[-1], a.ndim - 1, a.ndim)
        fill = a.mean(axis=tuple(range(a.ndim - 1)), keepdims=True) if self.mean else jnp.zeros((), a.dtype)
        return jnp.where(where, fill, a).astype(a.dtype)


@struct.dataclass
class Patch:
    """Replace the activation by ``source`` (e.g. the clean run's cached activation) where ``mask`` is True
    (``mask`` broadcasts against the activation; None: everywhere)."""

    source: jax.Array
    mask: jax.Array | None = None

    def __call__(self, a: jax.Array, ctx: HookContext) -> jax.Array:
        source = jnp.broadcast_to(self.source.astype(a.dtype), a.shape)
        return source if self.mask is None else jnp.where(self.mask, source, a)


@struct.dataclass
class AddVector:
    """Add ``scale * vector`` (``vector`` broadcasts against the activation, e.g. ``[d_model]`` to a residual
    hook), optionally only where ``mask`` is True (e.g. ``[batch, pos, 1]``)."""

    vector: jax.Array
    scale: jax.Array = struct.field(default_factory=lambda: jnp.ones((), jnp.float32))
    mask: jax.Array | None = None

    def __call__(self, a: jax.Array, ctx: HookContext) -> jax.Array:
        added = (self.scale * self.vector).astype(a.dtype)
        if self.mask is not None:
            added = jnp.where(self.mask, added, jnp.zeros((), a.dtype))
        return a + added


def zero_ablate_head(head) -> AblateHead:
    """Hook that zeroes one head (a traced index) of ``attn.hook_z`` / ``hook_q|k|v|result|pattern``."""
    return AblateHead(jnp.asarray(head, jnp.int32))


def mean_ablate_head(head) -> AblateHead:
    """Hook that replaces one head by its mean over batch and positions."""
    return AblateHead(jnp.asarray(head, jnp.int32), mean=True)


def zero_ablate_neuron(neuron) -> AblateNeuron:
    """Hook that zeroes one neuron (last axis) of ``mlp.hook_pre`` / ``mlp.hook_post``."""
    return AblateNeuron(jnp.asarray(neuron, jnp.int32))


def mean_ablate_neuron(neuron) -> AblateNeuron:
    """Hook that replaces one neuron by its mean over batch and positions."""
    return AblateNeuron(jnp.asarray(neuron, jnp.int32), mean=True)


def patch_from(source, mask=None) -> Patch:
    """Hook that patches in ``source`` (where ``mask``), e.g. ``patch_from(clean_cache[name])``."""
    return Patch(jnp.asarray(source), None if mask is None else jnp.asarray(mask, bool))


def add_vector(vector, scale=1.0, mask=None) -> AddVector:
    """Hook that adds ``scale * vector`` (a steering vector) to the activation (where ``mask``)."""
    return AddVector(jnp.asarray(vector), jnp.asarray(scale, jnp.float32),
                     None if mask is None else jnp.asarray(mask, bool))
