"""The tied LM head and its cross-entropy as one differentiable function, for the mixed-precision train step on the CPU.

A train step needs the logits only for the loss. Computed apart (``hidden @ wte^T``, then
:func:`gpt2_jax.losses.cross_entropy`), the backward pass writes the logits' float32 gradient, rounds it to bfloat16
and copies it transposed (``[tokens, vocab] -> [vocab, tokens]``, ~100 MB for gpt2 at 1024 tokens) for the weight
gradient's row-major product (:mod:`gpt2_jax.narrow_dots`). :func:`tied_head_cross_entropy` has its own gradient:

- forward: ``logits [N, V] = hidden [N, D] @ wte^T`` (float32 product of bfloat16 operands), the softmax's
  ``exp(logits - max)`` and its sum (kept for the backward pass) and the mean negative log-likelihood;
- backward: the logits' gradient ``(softmax - one_hot) * g / count`` in one pass, written once in bfloat16;
  ``d hidden = d_logits @ wte`` and ``d wte^T = hidden^T @ d_logits [D, V]``, both row-major as they stand (only
  ``hidden^T``, 1.5 MB, is copied), the latter transposed in float32 into ``d wte [V, D]``, where XLA then
  scatters the embedding's gradient in place (no zero-filled ``[V, D]`` array and no separate sum of the two).

``wte``'s gradient comes straight from the float32 product (not rounded to bfloat16 on its way to the float32
master weights). Same loss as ``cross_entropy(narrow_dots.matmul(hidden, wte_bf16, w_transposed=True), labels)``;
gpt2's LM head and loss with the embedding's gradient, forward + backward, 1024 tokens, 2-core Zen 4: 804 -> 779 ms
(median of 25 alternating calls). The train step uses it where :func:`gpt2_jax.narrow_dots.applies`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .losses import IGNORE_INDEX, kept_labels, mean_over_kept
from .narrow_dots import float32_product, transposed_copy


def tied_head_cross_entropy(hidden: jax.Array, wte: jax.Array, labels: jax.Array,
                            ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy of the tied LM head's logits ``hidden @ wte^T`` against ``labels``, skipping
    ``ignore_index``; 0 when every label is ignored (as :func:`gpt2_jax.losses.cross_entropy`).

    Args:
        hidden: ``[..., D]`` final hidden states in the compute dtype (bfloat16 is the case this exists for).
        wte: ``[V, D]`` token embedding (float32 master weights); the product reads it in ``hidden``'s dtype and
            its gradient is returned in ``wte``'s dtype.
        labels: int ``[...]``, ``hidden``'s leading shape.

    Returns:
        float32 ``[]``.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {list(labels.shape)}, expected {list(hidden.shape[:-1])}")
    if wte.ndim != 2 or wte.shape[1] != hidden.shape[-1]:
        raise ValueError(f"wte must be [vocab, {hidden.shape[-1]}], got {list(wte.shape)}")
    rows = hidden.reshape(-1, hidden.shape[-1])  # [..., D] -> [N, D]
    return _head_loss(rows, wte, labels.reshape(-1), ignore_index, jnp.dtype(wte.dtype))


def _forward(rows, wte, labels, ignore_index, wte_dtype):
    del wte_dtype  # read by _backward only
    weights = wte.astype(rows.dtype)  # [V, D]
    logits = float32_product(rows, transposed_copy(weights))  # [N, D] @ [D, V] -> float32 [N, V]
    keep, safe_labels = kept_labels(labels, ignore_index)
    peak = logits.max(axis=-1, keepdims=True)  # [N, 1]
    shifted_exp = jnp.exp(logits - peak)  # [N, V]
    total = shifted_exp.sum(axis=-1)  # [N]
    picked = jnp.take_along_axis(logits, safe_labels[:, None], axis=-1)[:, 0]  # [N]
    nll = peak[:, 0] + jnp.log(total) - picked  # [N]
    return mean_over_kept(nll, keep), (rows, weights, shifted_exp, total, safe_labels, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_loss(rows, wte, labels, ignore_index: int, wte_dtype):
    """``rows [N, D]``, ``wte [V, D]`` (of ``wte_dtype``), ``labels [N]`` -> float32 ``[]``."""
    return _forward(rows, wte, labels, ignore_index, wte_dtype)[0]


def _backward(ignore_index, wte_dtype, residuals, g):
    del ignore_index  # the kept rows are in the residuals
    rows, weights, shifted_exp, total, safe_labels, keep = residuals
    scale = jnp.where(keep, g / jnp.maximum(keep.sum(), 1), 0.0)  # [N]: d loss / d nll of each row
    one_hot = jax.lax.broadcasted_iota(jnp.int32, shifted_exp.shape, 1) == safe_labels[:, None]  # [N, V]
    d_logits = ((shifted_exp / total[:, None] - one_hot) * scale[:, None]).astype(rows.dtype)  # [N, V]
    d_rows = float32_product(d_logits, weights)  # [N, V] @ [V, D] -> [N, D]
    d_wte_t = float32_product(transposed_copy(rows), d_logits)  # [D, N] @ [N, V] -> [D, V]
    # [D, V] -> [V, D] as a copy: a plain transpose would be folded into the product, which then reads its
    # operands transposed and leaves XLA CPU's bfloat16 kernel
    d_wte = transposed_copy(d_wte_t)
    return d_rows.astype(rows.dtype), d_wte.astype(wte_dtype), None


_head_loss.defvjp(_forward, _backward)
