"""The attention switch: ``jax.nn.dot_product_attention`` (XLA, or cuDNN on GPUs) equals the explicit path.

Both compute softmax(q k^T * scale + mask) v in float32; they differ only in the order of the reductions, so the
outputs agree to float32 round-off (logits O(10): atol/rtol 1e-5, as in the Hugging Face parity suite).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gpt2_jax import GPT2Config, GPT2LMHeadModel, KVCache, init_params
from gpt2_jax.backend import Tuning
from gpt2_jax.stacking import params_for

TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    "plain": GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2),
    "inverse_layer_idx_scan": GPT2Config(vocab_size=97, n_positions=32, n_embd=30, n_layer=3, n_head=5,
                                         scale_attn_by_inverse_layer_idx=True, initializer_range=0.2,
                                         scan_layers=True),
}


def logits(config, params, impl, ids, **kwargs):
    return np.asarray(GPT2LMHeadModel(config, tuning=Tuning(attention=impl)).apply({"params": params}, ids,
                                                                                   **kwargs).logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["xla", "cudnn"])  # cudnn off a GPU falls back to the XLA implementation
def test_fused_attention_equals_explicit(name, impl):
    config = CONFIGS[name]
    params = params_for(config, init_params(jax.random.PRNGKey(0), config.replace(scan_layers=False)))
    ids = np.random.default_rng(0).integers(0, 97, (3, 12)).astype(np.int32)
    ref = logits(config, params, "explicit", ids)
    assert np.abs(ref).max() > 1.0  # weights large enough for a sensitive comparison
    np.testing.assert_allclose(logits(config, params, impl, ids), ref, **TOL)  # causal only: no mask array
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    np.testing.assert_allclose(logits(config, params, impl, ids, attention_mask=mask),
                               logits(config, params, "explicit", ids, attention_mask=mask), **TOL)
    # Through the cache: prefill then one decode step.
    model = GPT2LMHeadModel(config, tuning=Tuning(attention=impl))
    out = model.apply({"params": params}, ids[:, :8], cache=KVCache.init(config, 3, 16))
    out = model.apply({"params": params}, ids[:, 8:9], cache=out.cache)
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), ref[:, 8], **TOL)


def test_probabilities_requested_take_the_explicit_path():
    config = CONFIGS["plain"]
    params = init_params(jax.random.PRNGKey(1), config)
    ids = np.arange(10, dtype=np.int32)[None]
    out = GPT2LMHeadModel(config, tuning=Tuning(attention="xla")).apply({"params": params}, ids, output_attentions=True)
    assert len(out.attentions) == config.n_layer and out.attentions[0].shape == (1, 4, 10, 10)
    np.testing.assert_allclose(np.asarray(out.attentions[0]).sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="Tuning.attention must be one of"):
        Tuning(attention="flash")


def test_several_queries_multiply_values_heads_first():
    """P @ V of a pass with several queries is written heads first (``[b, h, T, d]``, then the heads move), so
    XLA computes it as a row-major GEMM that reads the values in place; written straight into ``[b, T, h, d]``,
    XLA CPU computes ``(V^T P^T)`` with a transposed left operand at ~half the speed (a 6-token speculative
    verification pass over gpt2's cache: 0.41 vs 0.19 ms a layer). One query keeps the direct form (a
    matrix-vector product either way, the direct one faster at batch 8)."""
    config = CONFIGS["plain"]
    params = init_params(jax.random.PRNGKey(2), config)
    model = GPT2LMHeadModel(config, tuning=Tuning(attention="explicit"))

    def pv_dots(length):
        cache = KVCache.init(config, 2, 16)
        ids = np.ones((2, length), np.int32)
        hlo = jax.jit(lambda p, i, c: model.apply({"params": p}, i, cache=c).logits).lower(
            params, ids, cache).compile().as_text()
        return [line for line in hlo.splitlines() if " dot(" in line and "bhqk,bhkd->" in line]

    several = pv_dots(4)
    assert several and all("bhqk,bhkd->bhqd" in line for line in several)
    for line in several:  # the product's shape ends in [T, head_dim]: the GEMM is P @ V, not (V^T P^T)^T
        assert f"4,{config.head_dim}]" in line.split(" dot(")[0], line
    assert all("bhqk,bhkd->bqhd" in line for line in pv_dots(1))
