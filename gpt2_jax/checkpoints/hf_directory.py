"""Hugging Face model directories: ``config.json`` + ``model.safetensors`` in and out.

This module owns the single-file safetensors layout both ways; :mod:`gpt2_jax.checkpoints` builds the other
formats (sharded, PyTorch ``.bin``, Flax msgpack, hub download) on top of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..atomic import atomic_directory
from ..config import GPT2Config
from .hf_mapping import params_to_state_dict, state_dict_to_params
from .safetensors_io import CheckpointError, read_safetensors, write_safetensors

CONFIG_NAME = "config.json"


def is_floating(dtype) -> bool:
    """True for float16/32/64 and bfloat16 (which numpy does not count as ``np.floating``)."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)

SAFETENSORS_NAME = "model.safetensors"
GPT2_VOCAB_SIZE = 50257  # the bundled tokenizer's vocabulary: 50000 merges + 256 bytes + <|endoftext|>


def cast_to(dtype: Any) -> Callable[[np.ndarray], jnp.ndarray]:
    """A converter for :func:`state_dict_to_params`: floating arrays to ``dtype`` (None keeps the file's)."""

    def convert(array: np.ndarray):
        array = np.asarray(array)
        if dtype is not None and is_floating(array.dtype):
            return jnp.asarray(array, dtype=dtype)
        return jnp.asarray(array)

    return convert


def load_hf_safetensors(path: str | os.PathLike, config: GPT2Config, dtype: Any = jnp.float32) -> dict:
    """Params from one ``model.safetensors`` file (memory-mapped: each tensor is copied once, to the device).

    Args:
        path: the ``.safetensors`` file.
        config: the architecture it must match.
        dtype: dtype of the floating params (None keeps the file's dtype).
    """
    tensors, _ = read_safetensors(path)
    try:
        return state_dict_to_params(tensors, config, cast_to(dtype))
    except CheckpointError as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from None


def load_hf_directory(directory: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[GPT2Config, dict]:
    """``(config, params)`` from a Hugging Face directory with ``config.json`` and ``model.safetensors``."""
    directory = Path(directory)
    config = GPT2Config.from_json_file(directory / CONFIG_NAME)
    return config, load_hf_safetensors(directory / SAFETENSORS_NAME, config, dtype)


def save_hf_directory(
    directory: str | os.PathLike,
    params: Mapping,
    config: GPT2Config,
    dtype: Any = None,
    tokenizer: Any = "gpt2",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``params`` as a Hugging Face directory that ``transformers`` ``from_pretrained`` loads.

    The directory is built beside its destination and renamed into place when complete, so an interrupted
    write never leaves a half-written checkpoint (an existing directory is replaced only on success).

    Args:
        directory: destination.
        params: our params pytree.
        config: its config (written as ``config.json``).
        dtype: cast floating tensors to this dtype (None keeps theirs).
        tokenizer: what to write as the tokenizer files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
            ``special_tokens_map.json``): ``"gpt2"`` (default) GPT-2's, from the BPE ranks bundled with the package,
            when ``config.vocab_size`` is at least GPT-2's 50257 (a smaller vocabulary gets none); an object with
            ``save_pretrained(directory)`` (e.g. a :class:`~gpt2_jax.tokenizer.GPT2Tokenizer`) writes its own;
            None writes none. A directory with tokenizer files loads without a ``TokenizerFallbackWarning``.
        progress: called with bytes written after each tensor.
    """
    def convert(leaf):
        array = np.asarray(leaf)
        return array.astype(dtype) if dtype is not None and is_floating(array.dtype) else array

    if isinstance(tokenizer, str):
        if tokenizer != "gpt2":
            raise ValueError(f"tokenizer must be 'gpt2', None or an object with save_pretrained, got {tokenizer!r}")
        from ..tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer() if config.vocab_size >= GPT2_VOCAB_SIZE else None
    state = params_to_state_dict(params, convert)
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        write_safetensors(tmp / SAFETENSORS_NAME, state, {"format": "pt"}, progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
