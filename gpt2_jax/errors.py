"""Error types shared across layers.

:class:`CLIError` lives here, below every command-line module, so that a subcommand (``gpt2_jax.training.cli``,
``gpt2_jax.generation.cli``, ...) can raise it without importing the top-level ``gpt2_jax.cli`` that dispatches to
it. ``gpt2_jax.cli`` re-exports it for compatibility.
"""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user error the CLI reports in one line (no traceback) with exit code 2."""
