"""The layers of GPT-2: activations, float32 layer norm, causal attention over an optional KV cache, MLP, block.

Each module's params mirror Hugging Face's names (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``, ``ln_2``); Dense
kernels are ``[in, out]`` like Hugging Face's ``Conv1D``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import GPT2Config
from .kv_cache import write_slots

Dtype = Any


# Activations ---------------------------------------------------------------------------------------------------
def _gelu_fast(x):
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


# Layers --------------------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """Layer norm computed in float32 whatever the param and activation dtypes (``scale``/``bias`` params)."""

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


#: Variable collection that may carry every Dense kernel transposed, ``[out, in]``: the layout XLA's CPU
#: matrix-vector products read fastest. Generation on the CPU passes it
#: (:mod:`gpt2_jax.generation.weight_layout`); everything else uses the ``params`` kernels ``[in, out]``.
KERNELS_OUT_IN = "kernels_out_in"


class Dense(nn.Module):
    """``x @ kernel + bias`` with ``kernel [in, out]`` (Hugging Face's ``Conv1D``), params ``kernel`` and ``bias``.

    Computes like ``flax.linen.Dense``. When the variables carry the kernel transposed in the
    :data:`KERNELS_OUT_IN` collection, it reads that one instead (the ``params`` kernel is then not needed).
    """

    features: int
    std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.has_variable(KERNELS_OUT_IN, "kernel"):
            kernel_t = self.get_variable(KERNELS_OUT_IN, "kernel")  # [out, in]
            y = jnp.einsum("...i,oi->...o", x, kernel_t.astype(self.dtype))
        else:
            kernel = self.param("kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features),
                                self.param_dtype)
            y = jax.lax.dot_general(x, kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return y + bias.astype(self.dtype)


def dense(features: int, std: float, dtype, param_dtype, name: str) -> Dense:
    """A :class:`Dense` layer (``kernel [in, out]``, ``bias``) initialised with normal(std) weights, zero bias."""
    return Dense(features, std, dtype, param_dtype, name=name)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention (``c_attn`` -> heads -> ``c_proj``), optionally over a KV cache."""

    config: GPT2Config
    layer_idx: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, visible, layer_cache=None, cache_index=None, head_mask=None, deterministic=True):
        """
        Args:
            x: ``[batch, T, n_embd]``.
            visible: ``[batch, 1, T, S]`` bool, which key slot each query may attend to.
            layer_cache: ``(keys, values)`` of this layer, each ``[batch, n_head, S, head_dim]``, or None.
            cache_index: ``[]`` int32 slot where the T new keys are written (with ``layer_cache``).
            head_mask: ``[n_head]`` multipliers of the attention probabilities, or None.

        Returns:
            ``(out [batch, T, n_embd], probs [batch, n_head, T, S], new layer_cache or None)``.
        """
        cfg = self.config
        batch, length, _ = x.shape
        resid_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        qkv = dense(3 * cfg.n_embd, cfg.initializer_range, self.dtype, self.param_dtype, "c_attn")(x)
        # [batch, T, 3 * n_embd] -> 3 x [batch, n_head, T, head_dim]
        q, k, v = (
            t.reshape(batch, length, cfg.n_head, cfg.head_dim).transpose(0, 2, 1, 3)
            for t in jnp.split(qkv, 3, axis=-1)
        )
        if layer_cache is not None:
            k = write_slots(layer_cache[0], k, cache_index)  # [batch, n_head, S, head_dim]
            v = write_slots(layer_cache[1], v, cache_index)
            new_cache = (k, v)
        else:
            new_cache = None

        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= math.sqrt(cfg.head_dim)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        score_dtype = jnp.float32 if cfg.reorder_and_upcast_attn else q.dtype
        scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(score_dtype), k.astype(score_dtype)) * scale
        scores = scores.astype(jnp.float32)  # [batch, n_head, T, S]; softmax always in float32
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=deterministic)
        if head_mask is not None:
            probs = probs * head_mask.astype(probs.dtype)[None, :, None, None]
        out = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(batch, length, cfg.n_embd)
        out = dense(cfg.n_embd, resid_std, self.dtype, self.param_dtype, "c_proj")(out)
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return out, probs, new_cache


class GPT2MLP(nn.Module):
    """``c_fc`` -> activation -> ``c_proj`` -> dropout."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.config
        resid_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        h = dense(cfg.inner_dim, cfg.initializer_range, self.dtype, self.param_dtype, "c_fc")(x)
        h = ACTIVATION_FNS[cfg.activation_function](h)  # [batch, T, n_inner]
        h = dense(cfg.n_embd, resid_std, self.dtype, self.param_dtype, "c_proj")(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    config: GPT2Config
    layer_idx: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, visible, layer_cache=None, cache_index=None, head_mask=None, deterministic=True):
        cfg = self.config
        norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name=name)
        attn = GPT2Attention(cfg, self.layer_idx, self.dtype, self.param_dtype, name="attn")
        attn_out, probs, layer_cache = attn(norm("ln_1")(x), visible, layer_cache, cache_index, head_mask, deterministic)
        x = x + attn_out
        x = x + GPT2MLP(cfg, self.dtype, self.param_dtype, name="mlp")(norm("ln_2")(x), deterministic)
        return x, probs, layer_cache


class GPT2BlockStack(nn.Module):
    """The ``n_layer`` blocks, named ``0 .. n_layer-1`` so params read ``h/<i>/...``."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, visible, cache=None, head_mask=None, deterministic=True):
        """Returns ``(x, per-block outputs, per-layer attention probs, (keys, values) or None)``."""
        block_outputs, attentions, keys, values = [], [], [], []
        for i in range(self.config.n_layer):
            layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
            layer_head_mask = head_mask[i] if head_mask is not None else None
            block = GPT2Block(self.config, i, self.dtype, self.param_dtype, name=str(i))
            x, probs, layer_cache = block(
                x, visible, layer_cache, cache.index if cache is not None else None, layer_head_mask, deterministic
            )
            block_outputs.append(x)
            attentions.append(probs)
            if layer_cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
        return x, block_outputs, attentions, ((keys, values) if cache is not None else None)
