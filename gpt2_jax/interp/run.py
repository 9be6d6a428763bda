"""``run_with_hooks`` and ``run_with_cache``: the model's forward pass with hooks, compiled once per hook set.

Both run the one model (:class:`gpt2_jax.model.GPT2LMHeadModel` with a hook runner) inside a jitted program whose
static identity is the config, the hooks' code (:class:`~gpt2_jax.interp.runner.HookSpec`), the recorded names
and the backend tuning; the hooks' array data, the params and the inputs are traced. They work under ``jax.jit``,
``jax.vmap`` and ``jax.grad`` (the inner program is then inlined into the outer one).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from .. import backend
from ..backend import Tuning
from ..config import GPT2Config
from ..model import GPT2LMHeadModel
from .cache import ActivationCache
from .names import NameSelector, select_names
from .runner import HookRunner, HookSpec, split_hooks

#: Traces (= compilations) of the hooked forward program, keyed by program kind. Tests count them.
TRACE_COUNTS: collections.Counter = collections.Counter()


def hooked_apply(params, config: GPT2Config, runner: HookRunner, input_ids, attention_mask=None, position_ids=None,
                 *, dtype=None, tuning: Tuning | None = None, logits_to_keep: int = 0) -> jax.Array:
    """One forward pass of the LM with ``runner`` at every hook point: ``logits [batch, T, vocab]`` (``[batch,
    logits_to_keep, vocab]``, the last positions only, when it is positive)."""
    dtype = jnp.dtype(dtype) if dtype is not None else params["wte"]["embedding"].dtype
    model = GPT2LMHeadModel(config, dtype=dtype, tuning=tuning, hooks=runner)
    return model.apply({"params": params}, input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, logits_to_keep=logits_to_keep).logits


@functools.partial(jax.jit, static_argnames=("config", "spec", "record", "tuning", "loss_fn", "grad_names"))
def _program(params, input_ids, attention_mask, position_ids, data, *, config, spec, record, tuning, loss_fn,
             grad_names):
    TRACE_COUNTS["run_with_grads" if loss_fn is not None else "run"] += 1
    hooks = spec.build(data)
    if loss_fn is None:
        runner = HookRunner(hooks, record)
        logits = hooked_apply(params, config, runner, input_ids, attention_mask, position_ids, tuning=tuning)
        return logits, runner.store, {}

    def shapes():
        runner = HookRunner(hooks, grad_names)
        hooked_apply(params, config, runner, input_ids, attention_mask, position_ids, tuning=tuning)
        return runner.store

    zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in jax.eval_shape(shapes).items()}

    def loss(perturbations):
        runner = HookRunner(hooks, record, perturbations)
        logits = hooked_apply(params, config, runner, input_ids, attention_mask, position_ids, tuning=tuning)
        return loss_fn(logits), (logits, runner.store)

    (_, (logits, store)), grads = jax.value_and_grad(loss, has_aux=True)(zeros)
    return logits, store, grads


def _inputs(input_ids, attention_mask, position_ids):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    pos = None if position_ids is None else jnp.broadcast_to(jnp.asarray(position_ids), input_ids.shape)
    return input_ids, mask, pos


def _tuning(params, tuning):
    return tuning if tuning is not None else backend.tuning_for(params)


def run_with_hooks(params, config: GPT2Config, input_ids, hooks: Iterable = (), *, attention_mask=None,
                   position_ids=None, tuning: Tuning | None = None) -> jax.Array:
    """The model's logits with ``hooks`` applied.

    Args:
        params: per-layer params (``scan_layers=False``).
        config: the architecture.
        input_ids: ``[batch, seq]`` token ids.
        hooks: ``[(name, fn), ...]`` (or ``{name: fn}``); ``fn(activation, ctx) -> activation`` of the same shape
            and dtype (:class:`~gpt2_jax.interp.runner.HookContext`). Several hooks on one name run in order.
            Array leaves of ``fn`` (a :class:`jax.tree_util.Partial`, a ready-made intervention) are traced: new
            values reuse the compiled program; new code compiles a new one.
        attention_mask: ``[batch, seq]``, 1 at real tokens (left padding: positions are counted over them).
        position_ids: ``[batch, seq]`` explicit positions.
        tuning: backend settings (default: from the params' devices). Hooks on ``hook_attn_scores`` or
            ``hook_pattern`` make their layer use the explicit attention whatever ``tuning.attention`` says.

    Returns:
        ``logits [batch, seq, vocab]``.

    Raises:
        ValueError: an unknown hook name (with the closest valid ones), a layer out of range, a hook returning
            another shape or dtype (naming the hook and both shapes), a ``scan_layers`` config.
    """
    spec, data = split_hooks(hooks, config)
    ids, mask, pos = _inputs(input_ids, attention_mask, position_ids)
    logits, _, _ = _program(params, ids, mask, pos, data, config=config, spec=spec, record=(),
                            tuning=_tuning(params, tuning), loss_fn=None, grad_names=())
    return logits


def run_with_cache(params, config: GPT2Config, input_ids, *, names: NameSelector = None, hooks: Iterable = (),
                   attention_mask=None, position_ids=None, loss_fn: Callable[[jax.Array], jax.Array] | None = None,
                   grad_names: NameSelector = None, tuning: Tuning | None = None) -> tuple[jax.Array,
                                                                                          ActivationCache]:
    """The logits and the activations at the selected hook points (only those are kept).

    Args:
        params, config, input_ids, hooks, attention_mask, position_ids, tuning: as :func:`run_with_hooks`
            (activations are recorded after the hooks of their name).
        names: which activations to keep: None (every hook point except the on-request ``attn.hook_result``),
            one name, a list of names, a compiled regex (searched in each name) or a predicate on names.
        loss_fn: ``loss_fn(logits) -> scalar``; when given, the cache also holds ``cache.grads``: d loss / d
            activation at ``grad_names`` (default: the same names), from the same forward plus one backward pass.
            It is part of the compiled program's identity (pass the same function object to reuse it).
        grad_names: which gradients to keep (as ``names``).

    Returns:
        ``(logits [batch, seq, vocab], ActivationCache)``.
    """
    record = select_names(names, config)
    grads_for = (select_names(grad_names, config) if grad_names is not None else record) if loss_fn else ()
    spec, data = split_hooks(hooks, config)
    ids, mask, pos = _inputs(input_ids, attention_mask, position_ids)
    logits, store, grads = _program(params, ids, mask, pos, data, config=config, spec=spec, record=record,
                                    tuning=_tuning(params, tuning), loss_fn=loss_fn, grad_names=grads_for)
    return logits, ActivationCache(dict(store), config, params, grads=dict(grads))
