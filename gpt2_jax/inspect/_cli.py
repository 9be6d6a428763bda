"""Command-line plumbing shared by ``next``, ``lens``, ``attention``, ``info`` and ``bench``: which model, which
weights, which dtype."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ..config import PRESETS, GPT2Config
from ..model import init_params
from ._common import DTYPES, resolve_dtype


@dataclasses.dataclass
class LoadedModel:
    """What a command works on: ``params`` (arrays, or ``jax.ShapeDtypeStruct`` leaves when only shapes were
    asked for), their ``config``, a ``tokenizer``, a human-readable ``source`` and the ``compute_dtype``."""

    config: GPT2Config
    params: Any
    tokenizer: Any
    source: str
    compute_dtype: Any
    random: bool


def add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str = "float32") -> None:
    """``--model``, ``--revision``, ``--local-files-only``, ``--dtype``, ``--random-weights``, ``--seed``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default="gpt2",
        help="a hub id (gpt2, gpt2-medium, openai-community/gpt2-large, ...; downloaded once, needs the network "
             "then) or a local checkpoint directory (default: gpt2)",
    )
    group.add_argument("--revision", default=None, help="hub branch, tag or commit")
    group.add_argument("--local-files-only", action="store_true", help="never touch the network")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                       help=f"params and computation dtype (default {default_dtype})")
    group.add_argument(
        "--random-weights", action="store_true",
        help="do not load weights: random ones with the architecture of --model (a preset name, a config.json or "
             "a directory holding one); offline, for trying the tools out (the outputs mean nothing)",
    )
    group.add_argument("--seed", type=int, default=0, help="PRNG seed of --random-weights (default 0)")


def architecture(name_or_path: str | os.PathLike) -> GPT2Config:
    """The config named by a preset (``gpt2``, ``openai-community/gpt2-xl`` ...), a ``config.json`` file, or a
    directory holding one."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        from ..checkpoints.pretrained import read_config

        return read_config(path)
    if path.is_file():
        return GPT2Config.from_json_file(path)
    if text.split("/")[-1] in PRESETS:
        return GPT2Config.from_preset(text)
    raise ValueError(
        f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file nor a directory holding one"
    )


def random_params(config: GPT2Config, seed: int = 0, dtype: Any = jnp.float32, abstract: bool = False) -> Any:
    """GPT-2-initialised params of ``config`` (``abstract``: shapes and dtypes only, nothing allocated)."""
    init = lambda: init_params(jax.random.PRNGKey(seed), config, param_dtype=dtype)
    return jax.eval_shape(init) if abstract else init()


def _tokenizer_for(name_or_path: str):
    from ..tokenizer import GPT2Tokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from ..checkpoints.pretrained import load_tokenizer

        return load_tokenizer(path)
    return GPT2Tokenizer()


def load_model(args: argparse.Namespace, abstract: bool = False) -> LoadedModel:
    """The model the arguments of :func:`add_model_arguments` name (``abstract``: with random weights, shapes
    only)."""
    dtype = resolve_dtype(args.dtype)
    if args.random_weights:
        config = architecture(args.model)
        params = random_params(config, args.seed, dtype, abstract)
        source = f"random weights (seed {args.seed}), architecture of {args.model}"
        return LoadedModel(config, params, _tokenizer_for(args.model), source, dtype, True)
    from ..checkpoints.pretrained import from_pretrained

    loaded = from_pretrained(args.model, revision=args.revision, dtype=dtype, local_files_only=args.local_files_only)
    return LoadedModel(loaded.config, loaded.params, loaded.tokenizer, str(loaded.source), dtype, False)
