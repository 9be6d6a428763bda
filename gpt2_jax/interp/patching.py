"""Activation patching in one compiled call, and attribution patching from one forward + backward per input.

``activation_patching`` runs the corrupted input once per patch, each with the clean run's activation patched in
at one (layer, position / head) of one hook kind, and returns ``metric(logits)`` for each patch. Every patch is
the same program with a different traced (layer, index), mapped with ``jax.vmap`` (or ``lax.map`` in chunks of
``batch_size`` to bound memory): one compiled call, no Python iteration per patch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from .. import backend
from ..config import GPT2Config
from .names import check_name
from .run import TRACE_COUNTS, hooked_apply
from .runner import HookRunner

#: What each ``over`` indexes: the activation axes (after batch) a patch selects, by axis role.
OVERS = ("layer", "layer_pos", "layer_head", "layer_pos_head")
_HEAD_FIRST = ("hook_attn_scores", "hook_pattern")


def _axes(name: str, over: str, ndim: int) -> tuple[int, ...]:
    """The activation axes indexed by ``over`` for the hook kind ``name`` (rank ``ndim``)."""
    if over not in OVERS:
        raise ValueError(f"over must be one of {', '.join(OVERS)}, got {over!r}")
    head_axis = 1 if name.endswith(_HEAD_FIRST) else (2 if ndim == 4 else None)
    pos_axis = 2 if name.endswith(_HEAD_FIRST) else 1  # query position for scores/pattern
    axes = {"layer": (), "layer_pos": (pos_axis,), "layer_head": (head_axis,),
            "layer_pos_head": (pos_axis, head_axis)}[over]
    if None in axes:
        raise ValueError(f"over={over!r} needs a head axis; {name} has shape rank {ndim}")
    return axes


def _kind(name: str, config: GPT2Config) -> str:
    """``hook_resid_pre`` / ``attn.hook_z`` (relative to ``blocks.{l}``), checked."""
    name = name.removeprefix("blocks.")
    if not name.startswith(("hook_", "attn.", "mlp.", "ln1.", "ln2.")):
        raise ValueError(f"name must be a block hook relative to blocks.{{l}} (e.g. 'hook_resid_pre', "
                         f"'attn.hook_z'), got {name!r}")
    check_name(f"blocks.0.{name}", config)
    return name


@functools.partial(jax.jit, static_argnames=("config", "kind", "over", "metric", "batch_size", "tuning",
                                            "logits_to_keep"))
def _activation_patching(params, clean, corrupted, clean_mask, corrupted_mask, *, config, kind, over, metric,
                         batch_size, tuning, logits_to_keep):
    TRACE_COUNTS["activation_patching"] += 1
    names = [f"blocks.{l}.{kind}" for l in range(config.n_layer)]
    runner = HookRunner(record=names)
    hooked_apply(params, config, runner, clean, clean_mask, tuning=tuning)
    sources = runner.store  # the clean activations, one per layer
    shape = sources[names[0]].shape
    axes = _axes(kind, over, len(shape))
    sizes = tuple(shape[a] for a in axes)
    grid = jnp.meshgrid(jnp.arange(config.n_layer), *(jnp.arange(s) for s in sizes), indexing="ij")
    flat = [g.reshape(-1) for g in grid]  # each [n_patches]

    def one(index):
        layer, *where = index
        mask = jnp.ones((1,) * len(shape), bool)
        for axis, i in zip(axes, where):
            size = shape[axis]
            mask = mask & (jnp.arange(size) == i).reshape([size if d == axis else 1 for d in range(len(shape))])

        def hook_for(l):
            def patch(a, ctx):
                return jnp.where(mask & (layer == l), sources[names[l]].astype(a.dtype), a)
            return patch

        hooks = [(names[l], hook_for(l)) for l in range(config.n_layer)]
        logits = hooked_apply(params, config, HookRunner(hooks), corrupted, corrupted_mask, tuning=tuning,
                              logits_to_keep=logits_to_keep)
        return metric(logits)

    if batch_size is None:
        values = jax.vmap(one)(flat)
    else:
        values = jax.lax.map(one, flat, batch_size=batch_size)
    return values.reshape((config.n_layer, *sizes))


def activation_patching(params, config: GPT2Config, clean, corrupted, metric: Callable[[jax.Array], jax.Array], *,
                        name: str = "hook_resid_pre", over: str = "layer_pos", clean_mask=None, corrupted_mask=None,
                        batch_size: int | None = None, logits_to_keep: int = 0, tuning=None) -> jax.Array:
    """``metric`` of the corrupted run with the clean activation of one (layer, index) patched in, for every one.

    Args:
        params, config: per-layer params and their architecture.
        clean, corrupted: ``[batch, seq]`` token ids of the same shape.
        metric: ``metric(logits [batch, seq, vocab]) -> scalar`` (static: the same function object reuses the
            compiled program).
        name: the hook kind relative to ``blocks.{l}``: ``hook_resid_pre``, ``attn.hook_z``, ``hook_mlp_out``...
        over: ``"layer"`` (the whole activation), ``"layer_pos"``, ``"layer_head"`` or ``"layer_pos_head"``.
        clean_mask, corrupted_mask: optional ``[batch, seq]`` attention masks.
        batch_size: None: every patch in one ``vmap``; else ``lax.map`` over chunks of this many patches.
        logits_to_keep: when positive, only the last ``logits_to_keep`` positions get logits and ``metric``
            receives ``[batch, logits_to_keep, vocab]``: a metric of the final token needs 1, and skips the LM
            head (a third of gpt2's FLOPs) at every other position of every patched run.

    Returns:
        ``[n_layer]``, ``[n_layer, seq]``, ``[n_layer, n_head]`` or ``[n_layer, seq, n_head]`` metric values.
    """
    kind = _kind(name, config)
    clean, corrupted = _checked_pair(clean, corrupted, logits_to_keep)
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    return _activation_patching(params, clean, corrupted, clean_mask, corrupted_mask, config=config, kind=kind,
                                over=over, metric=metric, batch_size=batch_size, tuning=tuning,
                                logits_to_keep=logits_to_keep)


def _checked_pair(clean, corrupted, logits_to_keep: int) -> tuple[jax.Array, jax.Array]:
    """The clean and corrupted ids as arrays, checked for equal shapes and a valid ``logits_to_keep``."""
    clean, corrupted = jnp.asarray(clean), jnp.asarray(corrupted)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {list(clean.shape)} and corrupted {list(corrupted.shape)} must have the same shape")
    if not isinstance(logits_to_keep, int) or not 0 <= logits_to_keep <= clean.shape[-1]:
        raise ValueError(f"logits_to_keep must be an int in [0, {clean.shape[-1]}] (0: every position), got "
                         f"{logits_to_keep!r}")
    return clean, corrupted


@functools.partial(jax.jit, static_argnames=("config", "kind", "over", "metric", "tuning", "logits_to_keep"))
def _attribution_patching(params, clean, corrupted, clean_mask, corrupted_mask, *, config, kind, over, metric,
                          tuning, logits_to_keep):
    TRACE_COUNTS["attribution_patching"] += 1
    names = [f"blocks.{l}.{kind}" for l in range(config.n_layer)]
    clean_runner = HookRunner(record=names)
    hooked_apply(params, config, clean_runner, clean, clean_mask, tuning=tuning)

    def shapes():
        runner = HookRunner(record=names)
        hooked_apply(params, config, runner, corrupted, corrupted_mask, tuning=tuning)
        return runner.store

    zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in jax.eval_shape(shapes).items()}

    def run(perturbations):
        runner = HookRunner(record=names, perturbations=perturbations)
        logits = hooked_apply(params, config, runner, corrupted, corrupted_mask, tuning=tuning,
                              logits_to_keep=logits_to_keep)
        return metric(logits), runner.store

    grads, corrupted_acts = jax.grad(run, has_aux=True)(zeros)
    shape = zeros[names[0]].shape
    keep = _axes(kind, over, len(shape))
    summed = tuple(a for a in range(len(shape)) if a not in keep)
    per_layer = [((clean_runner.store[n] - corrupted_acts[n]) * grads[n]).sum(axis=summed) for n in names]
    return jnp.stack(per_layer)  # [n_layer, *kept axes]


def attribution_patching(params, config: GPT2Config, clean, corrupted, metric: Callable[[jax.Array], jax.Array], *,
                         name: str = "hook_resid_pre", over: str = "layer_pos", clean_mask=None, corrupted_mask=None,
                         logits_to_keep: int = 0, tuning=None) -> jax.Array:
    """The linear estimate of :func:`activation_patching`'s effect: ``(clean_act - corrupted_act) . d metric /
    d act`` at the corrupted run, summed over batch and the axes ``over`` does not index.

    One forward of the clean input and one forward + backward of the corrupted one. Arguments and result shape as
    :func:`activation_patching`; the estimate approximates ``patched metric - corrupted metric``.
    """
    kind = _kind(name, config)
    clean, corrupted = _checked_pair(clean, corrupted, logits_to_keep)
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    return _attribution_patching(params, clean, corrupted, clean_mask, corrupted_mask, config=config, kind=kind,
                                 over=over, metric=metric, tuning=tuning, logits_to_keep=logits_to_keep)
