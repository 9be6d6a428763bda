"""Shared pieces of the generation tests: a tiny GPT-2 with special ids inside its vocabulary, its Hugging Face twin,
and helpers to call ``transformers`` ``generate`` the way our engine is called."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from hf_reference import hf_model

BOS, EOS, PAD = 1, 2, 3
# initializer_range 0.3 gives logits spread enough for varied (non-repeating) greedy and beam outputs.
TINY = GPT2Config(
    vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS, eos_token_id=EOS,
    pad_token_id=PAD, initializer_range=0.3,
)


@functools.lru_cache(maxsize=None)
def tiny_params(seed: int = 0, config: GPT2Config = TINY):
    """Random params of ``config`` (cached: the tests share them)."""
    return init_params(jax.random.PRNGKey(seed), config)


@functools.lru_cache(maxsize=None)
def tiny_hf(seed: int = 0, config: GPT2Config = TINY):
    """The transformers twin of :func:`tiny_params` (float32, eager attention)."""
    return hf_model(tiny_params(seed, config), config)


def prompts(batch: int, length: int, seed: int = 0, low: int = 4, vocab: int = TINY.vocab_size) -> np.ndarray:
    """``[batch, length]`` random prompt ids avoiding the special ids."""
    return np.random.RandomState(seed).randint(low, vocab, (batch, length))


def left_pad(rows: list, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token lists -> ``(ids, mask)`` left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


def hf_generate(ids, mask=None, seed: int = 0, **kwargs):
    """``transformers`` ``generate`` on the tiny twin (greedy unless told), returning the dict output."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", PAD)
    kwargs.setdefault("eos_token_id", EOS)
    with torch.no_grad():
        return tiny_hf(seed).generate(
            ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs
        )


def frequent_token(seed: int = 0, step: int = 3, batch: int = 3, length: int = 6) -> int:
    """A token greedy decoding emits at ``step`` for row 0 (used as an eos id that is actually produced)."""
    from gpt2_jax.generation import generate

    out = generate(tiny_params(seed), prompts(batch, length, seed), model_config=TINY, max_new_tokens=step + 1,
                   eos_token_id=())
    return int(out.sequences[0, length + step])
