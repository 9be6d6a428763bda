"""Held-out loss and perplexity, including Hugging Face's sliding-window (``stride``) evaluation.

The token stream is cut into windows of at most ``seq_len`` tokens whose starts are ``stride`` apart (see
:func:`~gpt2_jax.training.data.iter_eval_windows`); each window scores only the tokens no earlier window scored,
its overlap with the previous window serving as context (its labels are -100, as in
https://huggingface.co/docs/transformers/perplexity). ``stride == seq_len`` gives disjoint windows (the first
token of each window is then context only); a smaller stride gives every scored token more context and a lower,
more faithful perplexity at the cost of more compute.

One deliberate difference from the documentation's loop: it weights each window's mean loss by
``(labels != -100).sum() - batch_size``, which undercounts every window after the first by one token. We sum the
exact per-token negative log-likelihoods instead, so ``loss`` is exactly the mean over scored tokens and every
token after the first is scored once when ``stride < seq_len``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from ..model import GPT2LMHeadModel
from .data import iter_eval_windows
from .validation import check_int


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """``loss`` (mean NLL per scored token, nats), ``perplexity`` (``exp(loss)``), ``n_tokens`` scored,
    ``n_windows`` evaluated."""

    loss: float
    perplexity: float
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_eval_settings(seq_len: int | None, stride: int | None, batch_size: int, max_windows: int | None,
                        n_positions: int | None = None) -> None:
    """Raise ``ValueError`` (one line naming the option) unless the evaluation settings are in range:
    ``seq_len`` in [2, n_positions] (a window scores ``seq_len - 1`` next tokens), ``stride`` in [1, seq_len],
    ``batch_size`` >= 1, ``max_windows`` >= 1; None means the default. ``n_positions`` None skips the upper
    bound (the CLI checks before loading the model)."""
    check_int("seq_len", seq_len, "tokens per evaluation window", low=2, high=n_positions, optional=True)
    check_int("stride", stride, "distance between window starts", low=1, high=seq_len, optional=True)
    check_int("batch_size", batch_size, "windows per forward pass", low=1)
    check_int("max_windows", max_windows, "evaluate only the first N windows", low=1, optional=True)


def make_nll_fn(config: GPT2Config, compute_dtype=jnp.float32) -> Callable:
    """Jitted ``(params, windows [B, L], weights [B, L - 1]) -> (nll_sum [B], count [B])``: per-row sum of the
    next-token NLL of ``windows[:, 1:]`` where ``weights`` is 1."""
    model = GPT2LMHeadModel(config, dtype=compute_dtype)

    @jax.jit
    def nll(params, windows, weights):
        logits = model.apply({"params": params}, windows).logits[:, :-1].astype(jnp.float32)  # [B, L-1, vocab]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_lp = jnp.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]  # [B, L-1]
        w = weights.astype(jnp.float32)
        return -(token_lp * w).sum(-1), w.sum(-1)

    return nll


def evaluate(
    params,
    config: GPT2Config,
    tokens: np.ndarray,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    compute_dtype=jnp.float32,
    max_windows: int | None = None,
    progress: bool = True,
    nll_fn: Callable | None = None,
) -> EvalResult:
    """Loss and perplexity of ``params`` on a token stream.

    Args:
        params: model params.
        config: their config.
        tokens: 1-D token ids (e.g. :func:`~gpt2_jax.training.data.load_tokens`), at least 2.
        seq_len: window length (default and maximum: ``config.n_positions``).
        stride: distance between window starts (default ``seq_len``); see the module docstring.
        batch_size: windows per forward pass.
        compute_dtype: ``float32`` or ``bfloat16``.
        max_windows: evaluate only the first this many windows (a quick estimate during training).
        progress: tqdm bar over windows.
        nll_fn: a cached :func:`make_nll_fn` (avoids re-tracing when called repeatedly).

    Returns:
        An :class:`EvalResult`.
    """
    from tqdm.auto import tqdm

    check_eval_settings(seq_len, stride, batch_size, max_windows, n_positions=config.n_positions)
    seq_len = config.n_positions if seq_len is None else int(seq_len)
    windows = list(iter_eval_windows(tokens, seq_len, stride))
    if max_windows is not None:
        windows = windows[:max_windows]
    seq_len = min(seq_len, max(end - begin for begin, end, _ in windows))  # a short text: one shorter window
    nll_fn = nll_fn or make_nll_fn(config, compute_dtype)
    total_nll, total_count = 0.0, 0.0
    for first in tqdm(range(0, len(windows), batch_size), desc="evaluating", unit="batch", disable=not progress):
        chunk = windows[first:first + batch_size]
        ids = np.zeros((batch_size, seq_len), np.int32)  # padded rows/positions are never scored
        weights = np.zeros((batch_size, seq_len - 1), np.float32)
        for row, (begin, end, n_new) in enumerate(chunk):
            length = end - begin
            ids[row, :length] = tokens[begin:end]
            # label j (1 <= j < length) is scored iff it is one of the window's n_new new tokens
            weights[row, max(length - n_new, 1) - 1:length - 1] = 1.0
        nll, count = nll_fn(params, jnp.asarray(ids), jnp.asarray(weights))
        total_nll += float(jnp.sum(nll))
        total_count += float(jnp.sum(count))
    loss = total_nll / max(total_count, 1.0)
    return EvalResult(loss, math.exp(loss) if loss < 700 else math.inf, int(total_count), len(windows))
