"""Helpers shared by the inspection tools: dtype names, text -> ids with clear errors, token labels, output paths."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from ..model import CausalLMOutput, GPT2LMHeadModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or the jnp dtype itself) -> the jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Any) -> str:
    """The short numpy name of a dtype (``float32``, ``bfloat16``...)."""
    return jnp.dtype(dtype).name


def as_ids(ids: Any, config: GPT2Config) -> np.ndarray:
    """Token ids as a 1-D int32 array ``[seq]``, checked against the vocabulary and the context length.

    Accepts a list, a 1-D array or a ``[1, seq]`` array.
    """
    arr = np.asarray(ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"expected one sequence of token ids ([seq] or [1, seq]), got shape {list(arr.shape)}")
    if arr.size == 0:
        raise ValueError("the input is empty: give at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size > config.n_positions:
        raise ValueError(
            f"the input is {arr.size} tokens, longer than the model's context of n_positions={config.n_positions}"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {config.vocab_size})")
    return arr.astype(np.int32)


def is_traced(x: Any) -> bool:
    """True inside ``jax.jit`` (or another transformation) for an abstract value whose numbers are unknown."""
    return isinstance(x, jax.core.Tracer)


def ids_array(ids: Any, config: GPT2Config) -> Any:
    """:func:`as_ids`, or inside ``jax.jit`` a traced ``[seq]`` / ``[1, seq]`` int array checked by shape and dtype
    only (its values are unknown while tracing): ``[seq]`` int32 either way."""
    if not is_traced(ids):
        return as_ids(ids, config)
    arr = ids[0] if ids.ndim == 2 and ids.shape[0] == 1 else ids
    if arr.ndim != 1:
        raise ValueError(f"expected one sequence of token ids ([seq] or [1, seq]), got shape {list(ids.shape)}")
    if arr.shape[0] == 0 or arr.shape[0] > config.n_positions:
        raise ValueError(f"the input is {arr.shape[0]} tokens; it must be 1..n_positions={config.n_positions}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.astype(jnp.int32)


def to_host(x: Any) -> Any:
    """``np.asarray(x)``, except for a traced value (inside ``jax.jit``), which is returned as it is."""
    return x if x is None or is_traced(x) else np.asarray(x)


def encode(tokenizer: Any, text: str, config: GPT2Config) -> np.ndarray:
    """``text`` -> ids ``[seq]``; a clear error when it is empty or longer than the model's context."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the text is empty: give at least one token")
    if len(ids) > config.n_positions:
        raise ValueError(
            f"the text is {len(ids)} tokens, longer than the model's context of n_positions={config.n_positions}"
        )
    return as_ids(ids, config)


def token_label(tokenizer: Any, token_id: int) -> str:
    """A readable label for one token: its text, with bytes that are not whole UTF-8 characters as ``\\xNN``.

    Ids beyond the tokenizer's vocabulary (a padded model vocabulary) read ``<id N>``.
    """
    token_id = int(token_id)
    if tokenizer is None or token_id >= getattr(tokenizer, "vocab_size", 0):
        return f"<id {token_id}>"
    data = tokenizer.decode_bytes([token_id])
    return data.decode("utf-8", errors="backslashreplace")


def token_labels(tokenizer: Any, ids: Any) -> list[str]:
    """:func:`token_label` of every id in ``ids``."""
    return [token_label(tokenizer, i) for i in np.asarray(ids).reshape(-1)]


@functools.lru_cache(maxsize=16)
def _jitted_forward(config: GPT2Config, dtype_key: str, attentions: bool, hidden_states: bool, logits_to_keep: int):
    model = GPT2LMHeadModel(config, dtype=DTYPES[dtype_key])

    def forward(params, ids):
        return model.apply(
            {"params": params}, ids, output_attentions=attentions, output_hidden_states=hidden_states,
            logits_to_keep=logits_to_keep,
        )

    return jax.jit(forward)


def forward(params: Any, config: GPT2Config, ids: np.ndarray, *, attentions: bool = False,
            hidden_states: bool = False, logits_to_keep: int = 0, dtype: Any = jnp.float32) -> CausalLMOutput:
    """One jitted forward pass of ``GPT2LMHeadModel`` on ids ``[seq]`` (batch 1), computing in ``dtype``.

    ``logits_to_keep`` > 0 computes the logits of the last positions only (``[1, logits_to_keep, vocab]``).
    """
    ids = ids_array(ids, config)
    fn = _jitted_forward(config, dtype_name(resolve_dtype(dtype)), attentions, hidden_states, int(logits_to_keep))
    return fn(params, jnp.asarray(ids)[None, :])  # logits [1, seq or logits_to_keep, vocab]


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early, with a clear message, when ``path`` cannot be written (before any model work is done).

    The parent directory may be missing (it is created) but not a file; ``path`` must not be a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot write the {what} to {str(path)!r}: it is a directory")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(f"cannot write the {what} to {str(path)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot write the {what} to {str(path)!r}: directory {str(parent)!r} is not writable")
    if parent == path.parent:  # access() says yes to root everywhere (and /proc refuses new files): try one
        import tempfile

        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        except OSError as e:
            raise OSError(f"cannot write the {what} to {str(path)!r}: cannot create files in {str(parent)!r} "
                          f"({e.strerror or e})") from None
        os.close(fd)
        os.unlink(probe)
    return path
