"""Stop strings, matched across token boundaries inside the compiled loop, with Hugging Face's
``StopStringCriteria`` semantics.

A row stops once the text of its tokens contains a stop string whose last character lies in the newest token (the
newest token may run past the end of the string). As in Hugging Face, the vocabulary is preprocessed once on the
host into a table: for every token, the positions (counted from the end of each stop string) at which it can sit
wholly inside the string, the "end overlaps" it can have with the string's end, and its length; the in-loop check
is then a gather and a cumulative sum over the last ``max_len`` tokens. Matching is on bytes (GPT-2's byte-level
vocabulary, Hugging Face's ``byte_level`` mode).

Difference from Hugging Face, on purpose: only a row's real tokens take part (left padding never matches).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ..tokenizer import bytes_to_unicode


def vocab_token_bytes(tokenizer: Any, vocab_size: int) -> tuple[bytes, ...]:
    """The bytes of every token id below ``vocab_size`` (ids the tokenizer lacks get ``b""``).

    Works for :class:`~gpt2_jax.tokenizer.GPT2Tokenizer` and Hugging Face byte-level tokenizers alike (both expose
    ``get_vocab()`` with byte-level token strings).
    """
    if not hasattr(tokenizer, "get_vocab"):
        raise ValueError(f"stop_strings need a tokenizer with get_vocab(), got {type(tokenizer).__name__}")
    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    out = [b""] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if 0 <= index < vocab_size:
            out[index] = (bytes(decoder[c] for c in token) if all(c in decoder for c in token)
                          else token.encode("utf-8"))
    return tuple(out)


def _positions(token: bytes, stop: bytes) -> tuple[list[int], list[int]]:
    """Hugging Face's ``(valid positions, end overlaps)`` of ``token`` in ``stop``.

    Valid position ``i >= 1``: the token ends ``i`` characters before the end of ``stop`` and agrees with it there
    (it may run past the start). End overlap ``n``: a prefix of the token ends with the last ``n`` characters of
    ``stop`` (``n = len(stop)`` when that prefix holds all of it).
    """
    m, rev_stop, rev_tok = len(stop), stop[::-1], token[::-1]
    valid = [i for i in range(1, m) if rev_tok.startswith(rev_stop[i : i + len(token)]) and token]
    ends = []
    for i in range(len(token)):
        if token[i] == stop[-1]:
            overlap = min(i + 1, m)
            if token[i + 1 - overlap : i + 1] == stop[-overlap:]:
                ends.append(overlap)
    return valid, ends


@struct.dataclass
class StopStrings:
    """The preprocessed stop strings (traced tables, static sizes).

    Attributes:
        table: ``[vocab + 1, S * (P + E) + 1]`` int32: per token, the valid positions (``P`` per string), the end
            overlaps (``E`` per string) and its length; the last row is the entry of a non-real slot.
        target_lens: ``[S]`` int32, each string's length in bytes.
    """

    table: jax.Array
    target_lens: jax.Array
    num_strings: int = struct.field(pytree_node=False)
    max_positions: int = struct.field(pytree_node=False)
    max_ends: int = struct.field(pytree_node=False)
    max_len: int = struct.field(pytree_node=False)

    def matches(self, tokens: jax.Array, start: jax.Array, end) -> jax.Array:
        """``[rows]`` bool: a stop string ends in the token at slot ``end - 1``.

        Args:
            tokens: ``[rows, L]`` the token buffer; start: ``[rows]`` first real slot; end: ``[]`` or ``[rows]``,
                one past the newest token.
        """
        s, p, e, m = self.num_strings, self.max_positions, self.max_ends, self.max_len
        rows, length = tokens.shape
        end = jnp.broadcast_to(jnp.asarray(end).reshape(-1, 1), (rows, 1))
        slots = end - 1 - jnp.arange(m)[None, :]  # [rows, M], newest first
        ids = jnp.take_along_axis(tokens, jnp.clip(slots, 0, length - 1), axis=1)
        ids = jnp.where(slots >= start[:, None], ids, self.table.shape[0] - 1)
        emb = self.table[ids]  # [rows, M, vec]
        valid_positions = emb[:, 1:, : p * s].reshape(rows, m - 1, s, p)
        end_lengths = emb[:, :1, p * s : -1].reshape(rows, 1, s, e)
        lengths = jnp.broadcast_to(emb[:, 1:, None, -1:], (rows, m - 1, s, e))
        cumsum = jnp.cumsum(jnp.concatenate([end_lengths, lengths], axis=1), axis=1)  # [rows, M, S, E]
        initial = end_lengths > 0
        later = jnp.any(cumsum[:, :-1, :, None, :] == valid_positions[:, :, :, :, None], axis=-2)
        match = jnp.concatenate([initial, later], axis=1)
        unbroken = jnp.cumsum(~match, axis=1) == 0
        reached = jnp.max(cumsum * unbroken, axis=(1, 3)) >= self.target_lens[None, :]  # [rows, S]
        return jnp.any(reached, axis=-1)


@functools.lru_cache(maxsize=8)
def _tables(token_bytes: tuple[bytes, ...], stops: tuple[bytes, ...]):
    per_string = [[_positions(tok, stop) for tok in token_bytes] for stop in stops]
    p = max([len(v) for rows in per_string for v, _ in rows] + [1])
    e = max([len(x) for rows in per_string for _, x in rows] + [0])
    for stop, rows in zip(stops, per_string):
        if not any(x for _, x in rows):
            raise ValueError(f"no token of the vocabulary can end the stop string {stop!r}")
    vocab, s = len(token_bytes), len(stops)
    table = np.full((vocab + 1, s * (p + e) + 1), -1, np.int32)
    for i, rows in enumerate(per_string):
        for t, (valid, ends) in enumerate(rows):
            table[t, p * i : p * i + len(valid)] = valid
            table[t, p * s + e * i : p * s + e * i + len(ends)] = ends
    table[:vocab, -1] = [len(t) for t in token_bytes]
    table[vocab, -1] = 0
    return table, p, e


def stop_string_tables(tokenizer: Any, stop_strings: Sequence[str], vocab_size: int) -> StopStrings:
    """Preprocess ``stop_strings`` against the tokenizer's vocabulary (cached per vocabulary and strings).

    Raises:
        ValueError: a tokenizer without a vocabulary, or a stop string no token can end.
    """
    stops = tuple(s.encode("utf-8") for s in stop_strings)
    table, p, e = _tables(vocab_token_bytes(tokenizer, vocab_size), stops)
    return StopStrings(jnp.asarray(table), jnp.asarray([len(s) for s in stops], jnp.int32), len(stops), p, e,
                       max(len(s) for s in stops))
