"""from_pretrained: config, params and tokenizer from a local directory (other sources: see the module README).

This first version resolves a local Hugging Face directory with ``config.json`` + ``model.safetensors``; hub ids,
sharded / PyTorch / Flax files and OpenAI TensorFlow checkpoints are added on top of the same entry point.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ..config import GPT2Config
from ..tokenizer import GPT2Tokenizer
from .hf_directory import CONFIG_NAME, SAFETENSORS_NAME, load_hf_safetensors
from .safetensors_io import CheckpointError


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: ``config``, ``params`` (our pytree) and ``tokenizer``; ``source`` says where from."""

    config: GPT2Config
    params: dict
    tokenizer: GPT2Tokenizer
    source: str


def load_tokenizer(directory: Path) -> GPT2Tokenizer:
    """The directory's own tokenizer files if it has them, else the bundled GPT-2 BPE."""
    has_files = (directory / "vocab.json").exists() or (directory / "encoder.json").exists()
    return GPT2Tokenizer.from_directory(directory) if has_files else GPT2Tokenizer()


def from_pretrained(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    local_files_only: bool = False,
) -> Pretrained:
    """Load a GPT-2 checkpoint.

    Args:
        name_or_path: a local Hugging Face directory.
        revision: a hub revision (branch, tag or commit) for hub ids.
        dtype: dtype of the floating params (``float32``, ``bfloat16``, ``float16``; None keeps the file's).
        local_files_only: never touch the network.
    """
    directory = Path(name_or_path)
    if not directory.is_dir():
        raise CheckpointError(f"{os.fspath(name_or_path)!r} is not a directory")
    config = GPT2Config.from_json_file(directory / CONFIG_NAME)
    weights = directory / SAFETENSORS_NAME
    if not weights.exists():
        raise CheckpointError(f"{directory} holds no weights ({SAFETENSORS_NAME})")
    params = load_hf_safetensors(weights, config, dtype)
    return Pretrained(config, params, load_tokenizer(directory), str(directory))
