"""The optimizer: AdamW with GPT-2's weight-decay mask, linear warmup + cosine decay, global-norm clipping.

Weight decay applies to the matrices of the matmuls only (every ``kernel``: ``c_attn``, ``c_proj``, ``c_fc`` and
head projections). Biases, layer-norm scales/biases and the token and position embeddings (``wte`` is also the
tied LM head) are not decayed. This is the mask of the GPT-2 / GPT-3 recipes (nanoGPT decays ``wte``/``wpe`` too,
as they are 2-D; we follow the stated convention of not decaying embeddings).

``optax.adamw`` is the decoupled form of Loshchilov & Hutter, identical to ``torch.optim.AdamW``:
``p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``, with the bias corrections of Adam.

Gradient accumulation is done by the train step (a ``lax.scan`` over micro-batches, see
:mod:`gpt2_jax.training.step`), so one optimizer update is one step and schedules count optimizer steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from .validation import check_float, check_int


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of :func:`make_optimizer` (defaults: a typical GPT-2 fine-tuning setup)."""

    learning_rate: float = 3e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 100  # linear warmup from 0 to learning_rate
    total_steps: int = 1000  # warmup + cosine decay length; after it the rate stays at the minimum
    min_lr_ratio: float = 0.1  # final learning rate = min_lr_ratio * learning_rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled, on matmul kernels only (see decay_mask)
    grad_clip: float | None = 1.0  # clip the global gradient norm to this (None: no clipping)

    def __repr__(self) -> str:
        """Only the settings that differ from the defaults."""
        from ..reprs import short_dataclass_repr

        return short_dataclass_repr(self)

    def __post_init__(self):
        check_optimizer_settings(self)
        check_int("total_steps", self.total_steps, "warmup + cosine decay length", low=1)


def check_optimizer_settings(cfg) -> None:
    """Raise ``ValueError`` (one line naming the option and its meaning) unless every optimizer setting of ``cfg``
    (an :class:`OptimizerConfig` or a ``TrainConfig``) is a finite number in its range."""
    check_float("learning_rate", cfg.learning_rate, "peak learning rate", low=0, low_open=True)
    check_int("warmup_steps", cfg.warmup_steps, "linear warmup steps", low=0)
    check_float("min_lr_ratio", cfg.min_lr_ratio, "final lr / peak lr", low=0, high=1, low_open=True)
    check_float("b1", cfg.b1, "Adam beta1, the first-moment decay", low=0, high=1, high_open=True)
    check_float("b2", cfg.b2, "Adam beta2, the second-moment decay", low=0, high=1, high_open=True)
    check_float("eps", cfg.eps, "Adam epsilon; 0 divides 0 by 0 for a parameter with no gradient", low=0,
                low_open=True)
    check_float("weight_decay", cfg.weight_decay, "decoupled weight decay", low=0)
    check_float("grad_clip", cfg.grad_clip, "global gradient-norm clip; None/0 disables it", low=0, low_open=True,
                optional=True)


def decay_mask(params) -> dict:
    """A pytree of bools like ``params``: True where weight decay applies (leaves named ``kernel``).

    Embeddings (``wte``/``wpe`` ``embedding``), biases and layer-norm ``scale``/``bias`` are False.
    """
    def decays(path, _leaf) -> bool:
        return getattr(path[-1], "key", None) == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate per optimizer step: linear 0 -> peak over ``warmup_steps``, then cosine to
    ``min_lr_ratio * peak`` at ``total_steps``, then constant."""
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    if warmup == cfg.total_steps:  # all warmup: no decay phase
        return optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=cfg.total_steps,  # optax counts the warmup inside decay_steps
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig = OptimizerConfig()) -> tuple[optax.GradientTransformation, Callable]:
    """``(optimizer, schedule)``: global-norm clipping, then AdamW with :func:`decay_mask` and the schedule.

    Args:
        cfg: the hyper-parameters.

    Returns:
        The ``optax`` transformation and the learning-rate schedule (step -> lr) it uses.
    """
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip is not None:
        parts.append(clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` with the clip written as a multiplication by one scalar factor.

    Updates are scaled by ``min(1, max_norm / norm)`` (exactly 1, so unchanged, when ``norm <= max_norm``; this is
    also how ``torch.nn.utils.clip_grad_norm_`` scales). optax divides every element by the norm instead, and XLA
    treats an elementwise division as expensive: it will not recompute it inside both Adam moment updates, so it
    writes the clipped gradient out and reads it back (measured on gpt2, a 498 MB tree: the AdamW update took
    0.47 s with optax's clip and 0.27 s with this one on a 2-core CPU). The state is optax's ``EmptyState``, as
    for ``optax.clip_by_global_norm``, so optimizer states (and checkpoints) keep their structure.

    A caller that has the norm already passes it as extra arguments, ``known_norm=(tree, norm)``: when the updates
    this transformation receives are that very tree (the same arrays: it comes first in its chain), ``norm`` is used
    instead of reading the whole tree again (the train step computes the norm for its non-finite check and its
    metrics; gpt2: one 498 MB pass fewer a step). Otherwise the norm of the updates is computed as usual.
    """
    def update_fn(updates, state, params=None, *, known_norm=None, **extra_args):
        del params, extra_args
        norm = None
        if known_norm is not None:
            tree, tree_norm = known_norm
            leaves, known_leaves = jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(tree)
            if len(leaves) == len(known_leaves) and all(a is b for a, b in zip(leaves, known_leaves)):
                norm = tree_norm
        if norm is None:
            norm = global_norm(updates)
        factor = jnp.minimum(1.0, max_norm / norm)  # a scalar: fused into every consumer
        return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def global_norm(tree) -> jax.Array:
    """L2 norm of all leaves together: ``optax.tree.norm``, the very computation :func:`clip_by_global_norm` does (a
    caller that has it already hands it over: see ``known_norm`` there)."""
    return optax.tree.norm(tree)
