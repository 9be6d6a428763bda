"""``gpt2-jax convert SRC DST [--dtype D] [--revision R] [--overwrite] [--local-files-only] [--quiet]``."""

from __future__ import annotations

import argparse
import sys
import warnings

from .formats import LOAD_DTYPES


def register(subparsers) -> None:
    """Add the ``convert`` command to the ``gpt2-jax`` parser."""
    parser = subparsers.add_parser(
        "convert",
        help="convert any GPT-2 checkpoint to a Hugging Face safetensors directory",
        description=(
            "Read SRC -- a hub id (gpt2, openai-community/gpt2-medium, user/repo; downloaded once into the Hugging "
            "Face cache, which needs the network) or a local directory holding Hugging Face safetensors (single or "
            "sharded), pytorch_model.bin, flax_model.msgpack, or OpenAI's TensorFlow release -- and write DST: "
            "config.json, model.safetensors and tokenizer files, atomically."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="hub id or checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="output directory (written atomically)")
    parser.add_argument("--dtype", choices=LOAD_DTYPES, default=None,
                        help="cast floating weights to this dtype (default: keep the source's)")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit of SRC (default: main)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--local-files-only", action="store_true",
                        help="never use the network; a hub SRC must be in the Hugging Face cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``gpt2-jax convert``; returns the exit code."""
    from .convert import convert_checkpoint
    from ..errors import CLIError
    from .hub import HubUnavailableError
    from .pretrained import TokenizerFallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenizerFallbackWarning)  # printed below as a note instead
        try:
            loaded = convert_checkpoint(args.src, args.dst, dtype=args.dtype, revision=args.revision,
                                        overwrite=args.overwrite, local_files_only=args.local_files_only,
                                        progress=not args.quiet)
        except HubUnavailableError as e:  # its advice names --model, which convert does not have
            problem = getattr(e, "problem", str(e))
            raise CLIError(f"{problem}: give a local checkpoint directory as SRC, or run once with network access "
                           "to fill the cache (afterwards --local-files-only works offline)") from None
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    import jax

    from ..model import count_params

    revision = f" @ {loaded.revision}" if loaded.revision else ""
    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(loaded.params)})
    print(f"wrote {args.dst}: {count_params(loaded.params):,} params ({', '.join(dtypes)}) from {loaded.format} "
          f"checkpoint {loaded.source}{revision}")
    return 0
