"""The next-token probability table: what the model expects right after a text.

    >>> rows = next_token_table(params, config, tokenizer, "The theory of relativity is", top=10)
    >>> print(format_next_token_table(rows))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from ._common import encode, forward, is_traced, to_host, token_label


@dataclasses.dataclass(frozen=True)
class NextTokenRow:
    """One candidate next token: its readable text, its id and its probability under the model."""

    token: str
    id: int
    prob: float


def next_token_probs(params: Any, config: GPT2Config, ids: Any, dtype: Any = jnp.float32) -> np.ndarray:
    """The model's distribution over the token that follows ``ids``.

    Args:
        params: GPT-2 params.
        config: their architecture.
        ids: token ids ``[seq]`` (or ``[1, seq]``), at most ``n_positions`` of them.
        dtype: the computation dtype (the softmax is taken in float32).

    Returns:
        float32 probabilities ``[vocab_size]`` summing to 1 (numpy; a jax array inside ``jax.jit``).
    """
    logits = forward(params, config, ids, logits_to_keep=1, dtype=dtype).logits[0, -1]  # [vocab]
    return to_host(jax.nn.softmax(logits.astype(jnp.float32)))


def next_token_top(params: Any, config: GPT2Config, ids: Any, top: int = 10, dtype: Any = jnp.float32):
    """The array part of :func:`next_token_table`, usable inside ``jax.jit``: ``(ids [top], probs [top])`` of the
    ``top`` most likely next tokens after ``ids``, most likely first (ties: lower id first).

    Args:
        params, config, ids, dtype: as :func:`next_token_probs`; ``ids`` may be traced.
        top: how many (a Python int: it fixes the output shape).
    """
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or not 1 <= top <= config.vocab_size:
        raise ValueError(f"top must be an integer in [1, vocab_size={config.vocab_size}], got {top!r}")
    probs = jnp.asarray(next_token_probs(params, config, ids, dtype))  # [vocab]
    top_probs, top_ids = jax.lax.top_k(probs, int(top))  # [top] each
    if is_traced(top_probs):
        return top_ids, top_probs
    return np.asarray(top_ids), np.asarray(top_probs)


def top_tokens(probs: np.ndarray, top: int) -> np.ndarray:
    """Ids of the ``top`` largest probabilities, most likely first (ties: lower id first)."""
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    return np.argsort(-np.asarray(probs), kind="stable")[: int(top)]


def next_token_table(params: Any, config: GPT2Config, tokenizer: Any, text: str, top: int = 10,
                     dtype: Any = jnp.float32) -> list[NextTokenRow]:
    """The ``top`` most likely next tokens after ``text``, most likely first.

    Args:
        params: GPT-2 params.
        config: their architecture.
        tokenizer: a :class:`~gpt2_jax.tokenizer.GPT2Tokenizer` (encodes ``text`` and labels the rows).
        text: the prompt; it must encode to between 1 and ``n_positions`` tokens.
        top: how many rows (at most the vocabulary size).
        dtype: the computation dtype.

    Returns:
        ``top`` :class:`NextTokenRow` ``(token, id, prob)``.
    """
    if isinstance(top, (int, np.integer)) and not isinstance(top, bool) and top > config.vocab_size:
        raise ValueError(f"top={top} exceeds the vocabulary size {config.vocab_size}")
    ids = encode(tokenizer, text, config)
    top_ids, top_probs = next_token_top(params, config, ids, top, dtype)
    return [NextTokenRow(token_label(tokenizer, i), int(i), float(p)) for i, p in zip(top_ids, top_probs)]


def format_next_token_table(rows: list[NextTokenRow]) -> str:
    """A plain-text table: rank, token (quoted, so spaces show), id and probability."""
    shown = [repr(r.token) for r in rows]
    width = max([len("token"), *map(len, shown)])
    lines = [f"{'rank':>4}  {'token':<{width}}  {'id':>6}  {'prob':>8}"]
    for rank, (row, token) in enumerate(zip(rows, shown), 1):
        lines.append(f"{rank:>4}  {token:<{width}}  {row.id:>6}  {row.prob:>8.4f}")
    return "\n".join(lines)


# CLI -----------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """``gpt2-jax next TEXT [--top N]``."""
    from ._cli import add_model_arguments

    parser = subparsers.add_parser(
        "next", help="the next-token probability table after a text",
        description="Print the model's most likely next tokens after TEXT, with their probabilities.",
    )
    parser.add_argument("text", help="the prompt")
    parser.add_argument("--top", type=int, default=10, help="how many tokens to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run ``gpt2-jax next``."""
    import json

    from ._cli import load_model

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    model = load_model(args)
    rows = next_token_table(model.params, model.config, model.tokenizer, args.text, args.top, model.compute_dtype)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], ensure_ascii=False, indent=1))
    else:
        print(format_next_token_table(rows))
    return 0
