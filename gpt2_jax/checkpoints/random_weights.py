"""Random weights with a real architecture: the offline stand-in for a checkpoint, shared by every command.

Every command that loads a model (``generate``, ``eval``, ``train``, ``next``, ``lens``, ``attention``, ``info``,
``bench``) takes ``--random-weights``: the weights are GPT-2-initialised from a seed instead of loaded, with the
architecture ``--model`` names (a preset such as ``gpt2``, a ``config.json``, or a checkpoint directory holding
one). Nothing touches the network. The outputs mean nothing (generated text is noise), so the commands say so with
:func:`random_weights_note`.

:func:`load_or_random` is the one switch between the two: it returns a :class:`~gpt2_jax.checkpoints.pretrained.
Pretrained` either way, with ``format == "random"`` for random weights.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PRESETS, GPT2Config

__all__ = ["RANDOM_FORMAT", "add_adapter_argument", "add_random_weights_argument", "architecture", "is_random", "load_or_random",
           "random_params", "random_pretrained", "random_weights_note"]

#: ``Pretrained.format`` of a model made by :func:`random_pretrained`.
RANDOM_FORMAT = "random"

RANDOM_WEIGHTS_HELP = (
    "do not load weights: GPT-2-initialised random ones (seed --seed) with the architecture --model names (a "
    "preset such as gpt2 or gpt2-xl, a config.json, or a directory holding one); offline, for trying the command "
    "out: the outputs mean nothing"
)


def add_random_weights_argument(parser: argparse.ArgumentParser | Any, help: str = RANDOM_WEIGHTS_HELP) -> None:
    """Add ``--random-weights`` (a flag, default off) to a parser or argument group."""
    parser.add_argument("--random-weights", action="store_true", help=help)


ADAPTER_HELP = (
    "a LoRA adapter directory in PEFT's format (adapter_config.json + adapter_model.safetensors; written by "
    "gpt2-jax or by peft) to merge into the weights of --model"
)


def add_adapter_argument(parser: argparse.ArgumentParser | Any, help: str = ADAPTER_HELP) -> None:
    """Add ``--adapter DIR`` (default none) to a parser or argument group."""
    parser.add_argument("--adapter", default=None, metavar="DIR", help=help)


def architecture(name_or_path: str | os.PathLike) -> GPT2Config:
    """The config named by a preset (``gpt2``, ``openai-community/gpt2-xl`` ...), a ``config.json`` file, or a
    directory holding one (or an OpenAI TensorFlow checkpoint's ``hparams.json``).

    Raises:
        ValueError: ``name_or_path`` is none of these (the message lists the presets).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        from .pretrained import read_config

        return read_config(path)
    if path.is_file():
        return GPT2Config.from_json_file(path)
    if text.split("/")[-1] in PRESETS:
        return GPT2Config.from_preset(text)
    raise ValueError(
        f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file nor a directory holding one"
    )


def random_params(config: GPT2Config, seed: int = 0, dtype: Any = "float32", abstract: bool = False) -> Any:
    """GPT-2-initialised params of ``config`` (``abstract``: shapes and dtypes only, nothing allocated)."""
    import jax

    from ..model import init_params

    init = lambda: init_params(jax.random.PRNGKey(seed), config, param_dtype=dtype)
    return jax.eval_shape(init) if abstract else init()


def _tokenizer_for(name_or_path: str | os.PathLike):
    """The tokenizer of a checkpoint directory if it has one, else the bundled GPT-2 tokenizer."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from .pretrained import load_tokenizer

        return load_tokenizer(path)
    from ..tokenizer import GPT2Tokenizer

    return GPT2Tokenizer()


def random_pretrained(name_or_path: str | os.PathLike = "gpt2", seed: int = 0, dtype: Any = "float32",
                      abstract: bool = False):
    """A :class:`~gpt2_jax.checkpoints.pretrained.Pretrained` with random weights and the architecture of
    ``name_or_path`` (see :func:`architecture`); ``format`` is ``"random"`` and ``source`` says so."""
    from .formats import resolve_dtype
    from .pretrained import Pretrained

    dtype = resolve_dtype(dtype) or np.float32
    config = architecture(name_or_path)
    params = random_params(config, seed, dtype, abstract)
    source = f"random weights (seed {seed}), architecture of {os.fspath(name_or_path)}"
    note = random_weights_note(source)
    return Pretrained(config, params, _tokenizer_for(name_or_path), source, RANDOM_FORMAT, None, (note,))


def is_random(model: Any) -> bool:
    """True for a model made by :func:`random_pretrained`."""
    return getattr(model, "format", None) == RANDOM_FORMAT


def random_weights_note(source: str = "random weights") -> str:
    """The one-line label the commands print for random weights."""
    return f"RANDOM WEIGHTS: {source}; nothing was loaded and the output is noise, not GPT-2"


def load_or_random(name_or_path: str | os.PathLike, random_weights: bool = False, *, seed: int = 0,
                   dtype: Any = "float32", revision: str | None = None, local_files_only: bool = False,
                   abstract: bool = False, adapter: str | os.PathLike | None = None):
    """``from_pretrained(name_or_path, ...)``, or with ``random_weights`` :func:`random_pretrained` (offline);
    ``adapter``: a PEFT LoRA adapter directory merged into either (its note is the last of ``notes``).

    Returns:
        A :class:`~gpt2_jax.checkpoints.pretrained.Pretrained`; :func:`is_random` tells which it is.
    """
    if random_weights:
        model = random_pretrained(name_or_path, seed, dtype, abstract and adapter is None)
        if adapter is not None:
            from .adapters import check_adapter_directory, with_adapter

            check_adapter_directory(adapter)
            model = with_adapter(model, adapter)
        return model
    from .pretrained import from_pretrained

    return from_pretrained(name_or_path, revision=revision, dtype=dtype, local_files_only=local_files_only,
                           adapter=adapter)
