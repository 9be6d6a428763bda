"""Shared fixtures of the inspection-tool tests: a tiny GPT-2 that uses the real GPT-2 tokenizer, and a CLI runner."""

from __future__ import annotations

import contextlib
import io

import jax
import numpy as np

from gpt2_jax import cli
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params

# vocab_size 50257 so every id of the real tokenizer fits; tiny everywhere else.
TINY = GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2, n_head=2)
TOOLS = {
    "next": "gpt2_jax.inspect.next_token",
    "lens": "gpt2_jax.inspect.lens",
    "attention": "gpt2_jax.inspect.attention_view",
    "info": "gpt2_jax.inspect.info",
    "bench": "gpt2_jax.inspect.bench",
}


def peaked_params(config: GPT2Config = TINY, seed: int = 0):
    """Random params at a scale where activations are O(1), so attention and next-token distributions are peaked
    (GPT-2's own 0.02 init gives nearly uniform ones, which would hide mistakes)."""
    params = init_params(jax.random.PRNGKey(seed), config)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if "embedding" in name:
            return (0.8 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if "bias" in name:
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def run_cli(monkeypatch, *argv: str) -> tuple[int, str, str]:
    """``gpt2-jax ARGV`` through the real entry point (its error handling included), with only the tool commands
    registered (so the test does not depend on other commands); returns ``(exit code, stdout, stderr)``."""
    monkeypatch.setattr(cli, "COMMANDS", TOOLS)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()
