"""``gpt2-jax eval``: loss and perplexity of a model on held-out text, optionally with a sliding window.

Examples::

    gpt2-jax eval --model run/final --data valid.txt
    gpt2-jax eval --model gpt2 --data wiki.test.txt --seq-len 1024 --stride 512     # HF's perplexity recipe
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile


def register(subparsers) -> None:
    """Add the ``eval`` command."""
    p = subparsers.add_parser(
        "eval", help="loss and perplexity on held-out text (sliding-window --stride for long texts)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="hub id or local checkpoint directory (e.g. a run's final/)")
    p.add_argument("--random-weights", action="store_true",
                   help="evaluate random weights with the architecture --model names (a preset such as gpt2, or a "
                        "config.json): offline, a baseline (the loss of an untrained model is about ln(vocab))")
    from ..checkpoints.random_weights import add_adapter_argument

    add_adapter_argument(p)
    p.add_argument("--data", nargs="+", required=True, help=".txt / .jsonl / token .bin files")
    p.add_argument("--text-field", default="text", help="JSONL field with the text (default: text)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's n_positions)")
    p.add_argument("--stride", type=int, help="distance between window starts; each window scores only the tokens "
                                               "past the previous window (default: --seq-len, disjoint windows)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``gpt2-jax eval``; prints one JSON line ``{"loss", "perplexity", "n_tokens", "n_windows"}``."""
    import jax.numpy as jnp
    import numpy as np

    from ..checkpoints.random_weights import is_random, load_or_random
    from .data import load_or_tokenize
    from .evaluate import evaluate
    from .evaluate import check_eval_settings
    from .loop import _check_vocab

    check_eval_settings(args.seq_len, args.stride, args.batch_size, args.max_windows)  # before loading anything
    try:
        loaded = load_or_random(args.model, getattr(args, "random_weights", False), adapter=args.adapter)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {args.model!r}: {e}") from None
    if is_random(loaded):
        print(f"note: {loaded.notes[0]}", file=sys.stderr)
    if args.adapter is not None:
        print(f"note: {loaded.notes[-1]}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gpt2-jax-eval-") as tmp:
        tokens = np.array(load_or_tokenize(args.data, tmp, loaded.tokenizer, args.text_field, args.progress))
    _check_vocab(tokens, loaded.config, "evaluation")
    result = evaluate(
        loaded.params, loaded.config, tokens, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
        compute_dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, max_windows=args.max_windows,
        progress=args.progress,
    )
    print(json.dumps(result.to_dict()))
    return 0
