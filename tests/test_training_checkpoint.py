"""Training checkpoints: exact round trip of the state, retention, and a write killed midway (kill -9) never
replacing the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.training.checkpointing import CheckpointManager, abstract_state
from gpt2_jax.training.optim import OptimizerConfig, make_optimizer
from gpt2_jax.training.step import TrainState, make_train_step

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)


def trained_state(steps=2):
    optimizer, schedule = make_optimizer(OptimizerConfig(warmup_steps=0))
    state = TrainState.create(init_params(jax.random.PRNGKey(0), CONFIG), optimizer)
    step = make_train_step(CONFIG, optimizer, schedule, donate=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 9)), jnp.int32)
    for i in range(steps):
        state, _ = step(state, tokens, jax.random.PRNGKey(i))
    return state, optimizer


def test_round_trip_is_exact_and_keeps_the_newest(tmp_path):
    state, optimizer = trained_state()
    with CheckpointManager(tmp_path / "ck", max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore(state)
        assert ckpt.save(state, {"data_position": {"step": 2}, "dropout_key": [0, 1]})
        assert not ckpt.save(state)  # same step again: nothing to do
        restored, meta = ckpt.restore(abstract_state(state))
    assert meta == {"step": 2, "data_position": {"step": 2}, "dropout_key": [0, 1]}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with CheckpointManager(tmp_path / "ck", max_to_keep=2) as ckpt:  # a new manager sees the same checkpoint
        for s in (3, 4, 5):
            ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)))
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
        assert int(ckpt.restore(state, step=4)[0].step) == 4


WRITER = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from gpt2_jax.training.checkpointing import CheckpointManager
    from gpt2_jax.training.step import TrainState
    def state(step, value, n):
        z = jnp.zeros((), jnp.int32)
        return TrainState(jnp.asarray(step, jnp.int32), {"w": jnp.full((n,), value, jnp.float32)}, (), z)
    ckpt = CheckpointManager(sys.argv[1], max_to_keep=5)
    ckpt.save(state(1, 1.0, int(sys.argv[2])))
    print("saved-1", flush=True)
    for step in range(2, 100):  # keep writing until killed
        ckpt.save(state(step, float(step), int(sys.argv[2])))
""")


def test_write_killed_midway_never_replaces_the_last_good_checkpoint(tmp_path):
    directory = tmp_path / "ck"
    n = 16_000_000  # 64 MB per checkpoint: each write takes a while, so the kill lands inside one
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(n)], stdout=subprocess.PIPE,
                            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == b"saved-1"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a later write is in progress: a temporary directory exists
        if any("tmp" in p.name for p in directory.iterdir()):
            break
        time.sleep(0.001)
    else:
        pytest.fail("no checkpoint write started")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in directory.iterdir() if "tmp" in p.name]
    complete = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    assert leftovers, "the kill should have interrupted a write"
    target = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros((n,), jnp.float32)}, (), jnp.zeros((), jnp.int32))
    ckpt = CheckpointManager(directory, max_to_keep=5)
    latest = ckpt.latest_step()
    assert latest == complete[-1] >= 1
    restored, _ = ckpt.restore(target)
    assert int(restored.step) == latest
    w = np.asarray(restored.params["w"])
    assert w[0] == w[-1] == float(latest)  # complete, consistent contents
    ckpt.save(target.replace(step=jnp.asarray(latest + 1, jnp.int32)))  # writing goes on normally afterwards
    ckpt.close()
    assert CheckpointManager(directory).latest_step() == latest + 1
    assert not [p for p in directory.iterdir() if "tmp" in p.name]  # the partial write was cleaned up
