"""``init_params`` compiles once per (config, model class, param dtype) and reuses the compiled initialiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import GPT2Config
import gpt2_jax.model as model_module
from gpt2_jax.model import GPT2LMHeadModel, init_params

CONFIG = GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
TRACES = []


class CountingModel(GPT2LMHeadModel):
    """The LM model, recording each trace of its ``__call__`` (a Python side effect runs at trace time only)."""

    def __call__(self, *args, **kwargs):
        TRACES.append(self.config)
        return super().__call__(*args, **kwargs)


def test_same_config_traces_once():
    TRACES.clear()
    a = init_params(jax.random.PRNGKey(0), CONFIG, CountingModel)
    b = init_params(jax.random.PRNGKey(1), CONFIG, CountingModel)  # another key: same program
    c = init_params(jax.random.PRNGKey(0), CONFIG.replace(), CountingModel, param_dtype="float32")  # equal config
    assert len(TRACES) == 1
    np.testing.assert_array_equal(np.asarray(a["wte"]["embedding"]), np.asarray(c["wte"]["embedding"]))
    assert not np.array_equal(np.asarray(a["wte"]["embedding"]), np.asarray(b["wte"]["embedding"]))
    # a new architecture or param dtype is a new program
    init_params(jax.random.PRNGKey(0), CONFIG.replace(n_layer=2), CountingModel)
    bf16 = init_params(jax.random.PRNGKey(0), CONFIG, CountingModel, param_dtype=jnp.bfloat16)
    assert len(TRACES) == 3
    assert bf16["wte"]["embedding"].dtype == jnp.bfloat16


def test_matches_a_plain_init():
    """Caching changes nothing: the params equal a freshly jitted ``model.init`` (the same program, so bitwise; an
    eager init would differ by round-off, as XLA fuses the scaling of the normal draws differently)."""
    params = init_params(jax.random.PRNGKey(3), CONFIG)
    model, ids = GPT2LMHeadModel(CONFIG), jnp.zeros((1, 1), jnp.int32)
    direct = jax.jit(lambda k: model.init(k, ids)["params"])(jax.random.PRNGKey(3))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, direct)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan_layers"])
def test_large_params_are_initialised_group_by_group_with_the_same_values(monkeypatch, scan_layers):
    """Above INIT_GROUP_BYTES, several programs each make a group of leaves (memory: the params plus one
    group's temporaries); every leaf is bit-equal to the single program's."""
    config = CONFIG.replace(n_layer=3, scan_layers=scan_layers)
    whole = init_params(jax.random.PRNGKey(7), config)
    programs = []
    real_jit = jax.jit
    monkeypatch.setattr(model_module, "INIT_GROUP_BYTES", 6 * 16 * 16 * 4)  # a few kernels per group
    monkeypatch.setattr(model_module.jax, "jit", lambda f, **kw: programs.append(f) or real_jit(f, **kw))
    grouped = init_params(jax.random.PRNGKey(7), config)
    assert len(programs) > 3
    assert jax.tree_util.tree_structure(grouped) == jax.tree_util.tree_structure(whole)
    for path, got in jax.tree_util.tree_leaves_with_path(grouped):
        want = whole
        for key in path:
            want = want[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
