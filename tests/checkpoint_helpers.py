"""Shared helpers of the checkpoint tests: tiny configs, random params, tree comparison, tiny tokenizer files."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from gpt2_jax.checkpoints.hf_mapping import expected_shapes
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import GPT2LMHeadModel
from gpt2_jax.tokenizer import GPT2Tokenizer

TINY = GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def random_params(config: GPT2Config = TINY, seed: int = 0, model_cls=GPT2LMHeadModel) -> dict:
    """Params with every value random (biases and norms too), as numpy float32, so a mix-up shows."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, shape in expected_shapes(config, model_cls).items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = rng.standard_normal(shape).astype(np.float32) * 0.5
    return params


def flat(params) -> dict[str, np.ndarray]:
    """``{"h/0/attn/c_attn/kernel": array}``."""
    return {"/".join(k.key for k in path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_params(a, b, exact: bool = True) -> None:
    """Same names, shapes, dtypes and (bit-)identical values."""
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name].shape == fb[name].shape, name
        assert fa[name].dtype == fb[name].dtype, (name, fa[name].dtype, fb[name].dtype)
        if exact:
            np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)
        else:
            np.testing.assert_allclose(fa[name].astype(np.float32), fb[name].astype(np.float32), rtol=1e-6, atol=1e-6)


def byte_tokenizer() -> GPT2Tokenizer:
    """A byte-level BPE with no merges (256 tokens + <|endoftext|> = 257): small vocab.json/merges.txt files."""
    return GPT2Tokenizer({bytes([i]): i for i in range(256)})


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of a directory (non-recursive) as ``{name: bytes}``."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
