"""Shared fixtures for the interpretability tests: random O(1) weights, the Hugging Face twin and a
TransformerLens bridge booted offline from it (tests only)."""

from __future__ import annotations

import os

import numpy as np

from gpt2_jax.config import GPT2Config

#: A tiny GPT-2 whose vocabulary a word-level tokenizer can cover (t0..t{V-3}, [UNK], <|endoftext|>).
TINY = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=None,
                  bos_token_id=99, eos_token_id=99, pad_token_id=99,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def boot_bridge(model, config: GPT2Config, directory: str):
    """A TransformerLens ``TransformerBridge`` over the transformers ``model``, booted offline: the model and a
    word-level tokenizer are saved to ``directory`` first. Returns the bridge."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config.vocab_size - 2)}
    vocab["[UNK]"], vocab["<|endoftext|>"] = config.vocab_size - 2, config.vocab_size - 1
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    tok = PreTrainedTokenizerFast.from_pretrained(directory)  # a tokenizer with a name_or_path, as the bridge needs
    return TransformerBridge.boot_transformers(directory, hf_model=model, tokenizer=tok, device="cpu")


def max_dev(ours, ref, where=None) -> float:
    """Largest absolute difference (over the positions where ``where`` is True)."""
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    if where is not None:
        diff = diff[np.broadcast_to(where, diff.shape)]
    return float(diff.max()) if diff.size else 0.0
