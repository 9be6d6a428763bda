"""The train step under backend tuning: the CPU's formulation (per-block gradient cut, explicit attention) and the
plain one every other backend gets compute the same loss and gradients, and the default follows the platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax import backend
from gpt2_jax.backend import PLATFORM_DEFAULTS, Tuning
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.training.step import TrainState, make_train_step
from roundoff import U, assert_grads_close, global_norm_rtol

CONFIG = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


class _Recorder:
    """An optax transformation that stores the gradients it is given (and applies no update)."""

    def __init__(self):
        self.grads = None

    def transformation(self) -> optax.GradientTransformation:
        def update(grads, state, params=None):
            jax.debug.callback(self._store, grads)
            return jax.tree_util.tree_map(jnp.zeros_like, grads), state

        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

    def _store(self, grads) -> None:
        self.grads = jax.tree_util.tree_map(np.asarray, grads)


def _run(tuning: Tuning | None):
    """``(metrics, gradients)`` of one deterministic step under ``tuning`` (None: the default)."""
    params = init_params(jax.random.PRNGKey(0), CONFIG)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, CONFIG.vocab_size, (4, 17)))
    recorder = _Recorder()
    optimizer = recorder.transformation()
    step = make_train_step(CONFIG, optimizer, dropout=False, donate=False, tuning=tuning)
    _, metrics = step(TrainState.create(params, optimizer), tokens, jax.random.PRNGKey(2))
    jax.effects_barrier()
    return {k: float(v) for k, v in metrics.items()}, recorder.grads


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the default is the CPU's formulation on the CPU only")
def test_plain_tuning_and_the_cpu_default_give_the_same_loss_and_gradients():
    default_metrics, default_grads = _run(None)  # on the CPU: PLATFORM_DEFAULTS["cpu"]
    plain_metrics, plain_grads = _run(Tuning())
    # Two XLA programs (the cut's conditionals, explicit vs jax.nn attention): equal up to float32 round-off. The
    # loss is one float32 mean of 64 per-token terms (16 u); gradients and their norm per roundoff.py's bounds.
    np.testing.assert_allclose(plain_metrics["loss"], default_metrics["loss"], rtol=16 * U)
    assert_grads_close(plain_grads, default_grads, "plain vs cpu tuning: ")
    np.testing.assert_allclose(plain_metrics["grad_norm"], default_metrics["grad_norm"],
                               rtol=global_norm_rtol(default_grads))


def test_the_default_tuning_follows_the_platform_and_the_overrides(monkeypatch):
    """make_train_step(tuning=None) builds its model under tuning_for(the step's platform), overrides included."""
    built = []
    from gpt2_jax.training import step as step_module

    real = step_module.make_loss_fn

    def recording(config, dtype, dropout, tuning, *rest, **kwargs):
        built.append(tuning)
        return real(config, dtype, dropout, tuning, *rest, **kwargs)

    monkeypatch.setattr(step_module, "make_loss_fn", recording)
    optimizer = optax.sgd(0.1)
    make_train_step(CONFIG, optimizer, jit=False)
    with backend.overrides(cut_block_gradients=False):
        make_train_step(CONFIG, optimizer, jit=False)
    make_train_step(CONFIG, optimizer, jit=False, tuning=PLATFORM_DEFAULTS["tpu"])
    platform_default = backend.tuning_for()
    assert built == [platform_default, platform_default.replace(cut_block_gradients=False), PLATFORM_DEFAULTS["tpu"]]
