"""Command-line plumbing shared by ``next``, ``lens``, ``attention``, ``info`` and ``bench``: which model, which
weights, which dtype."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ..checkpoints.random_weights import (add_adapter_argument, add_random_weights_argument, architecture,
                                         load_or_random, random_params)
from ..config import GPT2Config
from ._common import DTYPES, resolve_dtype

__all__ = ["LoadedModel", "add_model_arguments", "architecture", "load_model", "random_params"]


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
    add_random_weights_argument(group)
    group.add_argument("--seed", type=int, default=0, help="PRNG seed of --random-weights (default 0)")
    add_adapter_argument(group)


def load_model(args: argparse.Namespace, abstract: bool = False) -> LoadedModel:
    """The model the arguments of :func:`add_model_arguments` name (``abstract``: with random weights, shapes
    only)."""
    dtype = resolve_dtype(args.dtype)
    adapter = getattr(args, "adapter", None)
    if args.random_weights:
        model = load_or_random(args.model, True, seed=args.seed, dtype=dtype, abstract=abstract, adapter=adapter)
        if not abstract:  # shapes only (info) are true of any weights; anything computed from random ones is noise
            print(f"note: {model.notes[0]}", file=sys.stderr)
        if adapter is not None:
            print(f"note: {model.notes[-1]}", file=sys.stderr)
        return LoadedModel(model.config, model.params, model.tokenizer, model.source, dtype, True)
    from ..checkpoints.pretrained import from_pretrained

    loaded = from_pretrained(args.model, revision=args.revision, dtype=dtype, local_files_only=args.local_files_only,
                             adapter=adapter)
    if adapter is not None:
        print(f"note: {loaded.notes[-1]}", file=sys.stderr)
    return LoadedModel(loaded.config, loaded.params, loaded.tokenizer, str(loaded.source), dtype, False)
