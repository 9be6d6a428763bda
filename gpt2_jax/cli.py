"""The ``gpt2-jax`` command line: one subcommand per module, each owning its own arguments.

Every command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to the function
that runs it (taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import heap
from .errors import CLIError  # re-exported: it lives below every CLI
from .helptext import clean_parser_help

__all__ = ["CLIError", "COMMANDS", "build_parser", "main"]

# subcommand -> module with register(subparsers)
COMMANDS = {
    "generate": "gpt2_jax.generation.cli",
    "convert": "gpt2_jax.checkpoints.cli",
    "train": "gpt2_jax.training.cli",
    "eval": "gpt2_jax.training.eval_cli",
    "next": "gpt2_jax.inspect.next_token",
    "lens": "gpt2_jax.inspect.lens",
    "attention": "gpt2_jax.inspect.attention_view",
    "info": "gpt2_jax.inspect.info",
    "bench": "gpt2_jax.inspect.bench",
}
#: Commands whose process restarts once with glibc keeping freed memory (:mod:`gpt2_jax.heap`): training's steps
#: re-fault a gigabyte-sized XLA temporary block every call otherwise.
KEEPS_HEAP = ("train",)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="gpt2-jax", description="GPT-2 in JAX/Flax: generate, convert, train, inspect, benchmark.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    clean_parser_help(parser)  # the modules' reST docstrings, as plain text
    return parser


def _warn_undecodable_text(args: argparse.Namespace) -> None:
    """Warn when a prompt / text argument held bytes that are not UTF-8: Python keeps them as lone surrogates
    (``surrogateescape``) and the tokenizer would silently turn each into U+FFFD."""
    for name in ("prompt", "text"):
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        bad = [c for v in values if isinstance(v, str) for c in v if "\udc80" <= c <= "\udcff"]
        if bad:
            shown = "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in bad[:8]) + ("..." if len(bad) > 8 else "")
            print(f"gpt2-jax {args.command}: warning: the {name.upper()} argument holds {len(bad)} byte(s) that are "
                  f"not valid UTF-8 ({shown}); each is read as U+FFFD, the replacement character", file=sys.stderr)


def _checkpoint_write_failed() -> bool:
    """Whether a training checkpoint write failed in this process (without importing orbax when none ran)."""
    module = sys.modules.get("gpt2_jax.training.checkpointing")
    return bool(module is not None and module.checkpoint_write_failed())


def _exit_now(code: int) -> None:
    """Flush and end the process at once: after a failed checkpoint write, tensorstore's callbacks print "Event loop
    is closed" tracebacks while the interpreter shuts down; the one-line error is the last word."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpt2-jax`` console script."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in KEEPS_HEAP:  # the command's own process (not a caller's main(argv))
        heap.restart_with_kept_heap(["-m", "gpt2_jax.cli", *sys.argv[1:]])
    _warn_undecodable_text(args)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (``gpt2-jax ... | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ValueError, OSError) as e:
        print(f"gpt2-jax {args.command}: error: {e}", file=sys.stderr)
        if argv is None and _checkpoint_write_failed():  # the command's own process: end before late noise
            _exit_now(2)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
