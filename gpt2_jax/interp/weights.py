"""Weight processing as pure functions on the params pytree (TransformerLens's, where the tied LM head allows).

Each returns new params computing the same function:

* :func:`fold_layer_norm`: each block's ``ln_1`` / ``ln_2`` scale and bias folded into the matmul that reads it
  (``c_attn``, ``c_fc``), the folded kernels centred over their input (the normalised input has zero mean), the
  norms left as pure normalisation (scale 1, bias 0). Logits preserved.
* :func:`center_writing_weights`: every matrix and bias writing to the residual stream (``wpe``, attention and MLP
  ``c_proj``) centred over ``d_model``; each block's reader is a layer norm, which removes the mean. Logits
  preserved.
* :func:`center_unembed`: the unembedding centred over the vocabulary. The LM head is tied to ``wte``, so the
  embeddings shift by the same vector, which ``wpe`` takes back: every residual stream is unchanged and each
  position's logits move by one constant. Log-probs preserved.
* :func:`fold_value_biases`: the value bias moved into the attention output bias (each position's attention
  probabilities sum to 1). Logits preserved.

Where TransformerLens differs: its unembedding is untied, so it also folds ``ln_final`` into ``W_U`` (adding an
unembedding bias) and centres ``W_E``; with gpt2-jax's tied ``wte`` neither is representable without changing the
logits, so ``ln_final`` keeps its weights and ``wte`` is not centred over ``d_model``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import GPT2Config


def _blocks(params, config: GPT2Config):
    if config.scan_layers:
        raise ValueError("weight processing takes per-layer params (scan_layers=False); see with_scan_layers")
    return [params["h"][str(l)] for l in range(config.n_layer)]


def _copy(params):
    return jax.tree_util.tree_map(lambda x: x, params)


def fold_layer_norm(params, config: GPT2Config, center_weights: bool = True) -> dict:
    """Fold ``ln_1`` into ``c_attn`` and ``ln_2`` into ``c_fc`` (``W' = diag(scale) W``, ``b' = b + bias W``),
    centring the folded kernels over their input dimension when ``center_weights``; the norms become scale 1,
    bias 0 (``ln_final`` is left as it is: the LM head is tied)."""
    params = _copy(params)
    for block in _blocks(params, config):
        for norm, reader in (("ln_1", block["attn"]["c_attn"]), ("ln_2", block["mlp"]["c_fc"])):
            scale, bias = block[norm]["scale"], block[norm]["bias"]
            kernel = reader["kernel"]  # [d_model, out]
            reader["bias"] = reader["bias"] + bias @ kernel
            kernel = scale[:, None] * kernel
            if center_weights:
                kernel = kernel - kernel.mean(axis=0, keepdims=True)
            reader["kernel"] = kernel
            block[norm] = {"scale": jnp.ones_like(scale), "bias": jnp.zeros_like(bias)}
    return params


def center_writing_weights(params, config: GPT2Config) -> dict:
    """Centre ``wpe`` and every block's ``c_proj`` kernel and bias over ``d_model`` (``wte`` is tied to the LM
    head and stays as it is)."""
    params = _copy(params)
    center = lambda x: x - x.mean(axis=-1, keepdims=True)
    if "wpe" in params:
        params["wpe"]["embedding"] = center(params["wpe"]["embedding"])
    for block in _blocks(params, config):
        for proj in (block["attn"]["c_proj"], block["mlp"]["c_proj"]):
            proj["kernel"], proj["bias"] = center(proj["kernel"]), center(proj["bias"])
    return params


def center_unembed(params, config: GPT2Config) -> dict:
    """Centre the (tied) unembedding over the vocabulary: ``wte -= mean_v wte``, and ``wpe += mean_v wte`` so the
    embeddings are unchanged; logits shift by a constant per position (log-probs preserved)."""
    if "wpe" not in params:
        raise ValueError("center_unembed needs the learned position table wpe to keep the embeddings unchanged")
    params = _copy(params)
    mean = params["wte"]["embedding"].mean(axis=0)  # [d_model]
    params["wte"]["embedding"] = params["wte"]["embedding"] - mean
    params["wpe"]["embedding"] = params["wpe"]["embedding"] + mean
    return params


def fold_value_biases(params, config: GPT2Config) -> dict:
    """Move the value bias into the attention output bias: ``b_O' = b_O + b_V W_O`` and ``b_V = 0`` (attention
    probabilities of a position sum to 1, so every head's output gains exactly ``b_V`` per head)."""
    params = _copy(params)
    d = config.n_embd
    for block in _blocks(params, config):
        c_attn, c_proj = block["attn"]["c_attn"], block["attn"]["c_proj"]
        b_v = c_attn["bias"][2 * d:]  # [d_model] = [n_head * d_head]
        c_proj["bias"] = c_proj["bias"] + b_v @ c_proj["kernel"]
        c_attn["bias"] = c_attn["bias"].at[2 * d:].set(0.0)
    return params


def process_weights(params, config: GPT2Config) -> dict:
    """All four, in TransformerLens's order: fold layer norms, centre writing weights, centre the unembedding,
    fold value biases."""
    params = fold_layer_norm(params, config)
    params = center_writing_weights(params, config)
    params = center_unembed(params, config)
    return fold_value_biases(params, config)
