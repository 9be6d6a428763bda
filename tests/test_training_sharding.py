"""Sharding over 8 simulated CPU devices (in a subprocess: XLA_FLAGS must be set before JAX starts).

Data-parallel (8x1), FSDP (2x4), tensor-parallel (2x4) and FSDP with gradient accumulation give the single-device
losses (rtol 1e-5) and params after four AdamW steps; params and optimizer moments are really split (each device
holds a quarter of a sharded kernel). The reductions run in another order, so gradients differ by round-off, and
AdamW turns round-off in a tiny gradient into an update of up to ~lr: params are compared per element against
:class:`roundoff.AdamParamBound`, computed from the single-device run's optimizer moments (tests/roundoff.py). The CLI trains on the mesh, checkpoints the
sharded state (asynchronously), resumes it on a different mesh, and refuses a batch the data axes cannot split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from roundoff import AdamParamBound, global_norm_rtol, leaf_grad_atol

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from gpt2_jax.config import GPT2Config
    from gpt2_jax.lora import LoraConfig, init_lora
    from gpt2_jax.model import init_params
    from gpt2_jax.training import (OptimizerConfig, TrainState, WindowLoader, batch_sharding, global_batch,
                                   make_mesh, make_optimizer, make_train_step, state_shardings)

    assert jax.device_count() == 8, jax.devices()
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    params = init_params(jax.random.PRNGKey(0), config)
    tokens = np.random.default_rng(0).integers(0, 64, size=5000).astype(np.uint16)
    loader = WindowLoader(tokens, batch_size=16, seq_len=16, seed=1)
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=1, total_steps=10))

    def train_four_steps(create, inputs, mesh, strategy, accum=1, lora=None):
        # Four AdamW steps from the state create(*inputs) on mesh: (state, losses, last batch, trace of the lr,
        # grad norm and Adam moments of each step, for the per-element bound of the comparison).
        shardings = state_shardings(jax.eval_shape(create, *inputs), optimizer, mesh, strategy, lora=lora is not None)
        state = jax.jit(create, out_shardings=shardings)(*inputs)
        b_sharding = batch_sharding(mesh, strategy)
        step = make_train_step(config, optimizer, schedule, accum_steps=accum, dropout=False,
                               state_sharding=shardings, batch_sharding=b_sharding, lora=lora)
        tolist = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), tree)
        losses, trace = [], []
        for i in range(4):
            batch = global_batch(loader.batch(i), b_sharding, 16)
            state, metrics = step(state, batch, jax.random.PRNGKey(i))
            losses.append(float(metrics["loss"]))
            adam = state.opt_state[1][0]
            trace.append({"lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                          "count": int(adam.count), "mu": tolist(adam.mu), "nu": tolist(adam.nu)})
        return state, losses, batch, trace

    def run(mesh, strategy, accum=1):
        return train_four_steps(lambda p: TrainState.create(p, optimizer), (params,), mesh, strategy, accum)

    def info(x):
        return {"spec": [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec],
                "shard": list(x.addressable_shards[0].data.shape), "devices": len(x.sharding.device_set)}

    lora = LoraConfig(rank=4, alpha=8)
    adapters0 = init_lora(jax.random.PRNGKey(7), params, lora)
    adapters0 = jax.tree_util.tree_map_with_path(  # B starts at zero: give it values, so A has gradients at once
        lambda path, x: 0.02 * jax.random.normal(jax.random.PRNGKey(8), x.shape) if path[-1].key == "lora_B" else x,
        adapters0)

    def run_lora(mesh, strategy):
        state, losses, _, trace = train_four_steps(lambda p, a: TrainState.create_lora(p, a, optimizer),
                                                   (params, adapters0), mesh, strategy, lora=lora)
        base_kept = all(bool(np.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                                     jax.tree_util.tree_leaves(state.params["params"])))
        c_attn = state.params["params"]["h"]["0"]["attn"]["c_attn"]["kernel"]
        moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                    zip(jax.tree_util.tree_leaves(adapters0), jax.tree_util.tree_leaves(state.params["lora"])))
        return {"losses": losses, "trace": trace, "base_kept": base_kept, "base_c_attn": info(c_attn), "moved": moved,
                "adapters": jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), state.params["lora"])}

    out = {}
    out["lora_single"] = run_lora(make_mesh(1, 1, jax.devices()[:1]), "fsdp")
    out["lora_fsdp"] = run_lora(make_mesh(2, 4), "fsdp")
    runs = {"single": (make_mesh(1, 1, jax.devices()[:1]), "fsdp", 1), "dp": (make_mesh(8, 1), "fsdp", 1),
            "fsdp": (make_mesh(2, 4), "fsdp", 1), "tp": (make_mesh(2, 4), "tp", 1),
            "fsdp_accum": (make_mesh(2, 4), "fsdp", 2)}
    for name, (mesh, strategy, accum) in runs.items():
        state, losses, batch, trace = run(mesh, strategy, accum)
        p = state.params["h"]["0"]
        mu = state.opt_state[1][0].mu["h"]["0"]
        out[name] = {
            "losses": losses,
            "params": {k: np.asarray(v).tolist() for k, v in
                       [("c_fc", p["mlp"]["c_fc"]["kernel"]), ("c_proj", p["attn"]["c_proj"]["kernel"]),
                        ("wte", state.params["wte"]["embedding"]), ("ln", p["ln_1"]["scale"])]},
            "c_fc": info(p["mlp"]["c_fc"]["kernel"]), "c_proj": info(p["mlp"]["c_proj"]["kernel"]),
            "wte": info(state.params["wte"]["embedding"]), "ln": info(p["ln_1"]["scale"]),
            "mu_c_fc": info(mu["mlp"]["c_fc"]["kernel"]), "batch": info(batch),
        }
        if name == "single":
            out[name]["trace"] = trace
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "out.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text())


PATHS = {"c_fc": ("h", "0", "mlp", "c_fc", "kernel"), "c_proj": ("h", "0", "attn", "c_proj", "kernel"),
         "wte": ("wte", "embedding"), "ln": ("h", "0", "ln_1", "scale")}  # the params the script returns


def _arrays(tree):
    return {k: _arrays(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree, np.float64)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _adam_bounds(trace: list[dict], paths: dict, final: dict) -> dict:
    """Per-element bound on |params(mesh run) - params(single run)| after the four AdamW steps (b1 0.9, b2 0.95,
    eps 1e-8, clip 1.0: the script's OptimizerConfig), for the leaves ``paths`` (key -> path in the moments) whose
    single-run values are ``final[key]``. Each step's gradient is read back from the first moment,
    ``g_t = (mu_t - b1 mu_{t-1}) / (1 - b1)``; the gradients of two runs differ by round-off, at most
    ``leaf_grad_atol`` per leaf, plus the relative round-off of the global norm where clipping scaled them."""
    b1, b2, eps = 0.9, 0.95, 1e-8
    bounds = {key: AdamParamBound(b1, b2, eps) for key in paths}
    previous = None  # mu_0 = 0
    atol = {}
    for record in trace:
        mu, nu = _arrays(record["mu"]), _arrays(record["nu"])
        previous = _map(np.zeros_like, mu) if previous is None else previous
        grads = _map(lambda m, p: (m - b1 * p) / (1 - b1), mu, previous)
        previous = mu
        rel = global_norm_rtol(_leaves(grads)) if record["grad_norm"] > 1.0 else 0.0
        for key, path in paths.items():
            g = _leaf(grads, path)
            s = np.sqrt(_leaf(nu, path) / (1 - b2 ** record["count"]))
            atol[key] = bounds[key].step(record["lr"], s, leaf_grad_atol(g) + rel * np.abs(g),
                                         np.asarray(final[key]))
    return atol


@pytest.fixture(scope="module")
def param_bounds(sharded_runs):
    """:func:`_adam_bounds` of the params the script returns."""
    ref = sharded_runs["single"]
    return _adam_bounds(ref["trace"], PATHS, ref["params"])


def _map(fn, *trees):
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _leaves(tree):
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


@pytest.mark.parametrize("name", ["dp", "fsdp", "tp", "fsdp_accum"])
def test_mesh_runs_match_the_single_device_run(sharded_runs, param_bounds, name):
    ref, run = sharded_runs["single"], sharded_runs[name]
    # Losses: a float32 mean of 256 token losses reduced in another order (a few u), then of params that differ
    # by the bounds below, which move a loss by sum |g| |dp| ~ 1e-7 relative; rtol 1e-5 = 168 u.
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    for key in ref["params"]:
        diff = np.abs(np.array(run["params"][key], np.float64) - np.array(ref["params"][key], np.float64))
        np.testing.assert_array_less(diff, param_bounds[key] + 1e-30, err_msg=key)
    # not vacuous: most elements are held to a small fraction of one step's lr (3e-3)
    assert np.median(np.concatenate([b.ravel() for b in param_bounds.values()])) < 3e-6


def test_params_are_actually_sharded(sharded_runs):
    fsdp, tp, dp = sharded_runs["fsdp"], sharded_runs["tp"], sharded_runs["dp"]
    # FSDP: largest dimension over the 4-way "model" axis; vectors replicated; moments like their params
    assert fsdp["c_fc"] == {"spec": [None, "model"], "shard": [32, 32], "devices": 8}
    assert fsdp["c_proj"] == {"spec": ["model", None], "shard": [32, 32], "devices": 8}
    assert fsdp["wte"] == {"spec": ["model", None], "shard": [16, 32], "devices": 8}
    assert fsdp["mu_c_fc"] == fsdp["c_fc"]
    assert fsdp["ln"]["spec"] == [] and fsdp["ln"]["shard"] == [32]
    assert fsdp["batch"] == {"spec": [["data", "model"]], "shard": [2, 17], "devices": 8}  # 16 rows / 8 devices
    # tensor parallel: c_fc column-wise, c_proj row-wise, embeddings along n_embd; batch over "data" only
    assert tp["c_fc"]["spec"] == [None, "model"] and tp["c_proj"]["spec"] == ["model", None]
    assert tp["wte"] == {"spec": [None, "model"], "shard": [64, 8], "devices": 8}
    assert tp["batch"] == {"spec": ["data"], "shard": [8, 17], "devices": 8}
    # data parallel: params whole on every device, batch split 8 ways
    assert dp["c_fc"]["shard"] == [32, 128] and dp["batch"]["shard"] == [2, 17]


CLI_SCRIPT = textwrap.dedent(r"""
    import sys
    import numpy as np
    from gpt2_jax.cli import main
    from gpt2_jax.training import read_metrics
    data, out = sys.argv[1], sys.argv[2]
    np.random.default_rng(0).integers(0, 64, size=3000).astype(np.uint16).tofile(data)
    base = ["train", "--config-preset", "tiny", "--config", "vocab_size=64", "--config", "n_embd=32",
            "--config", "n_layer=1", "--config", "n_head=4", "--config", "n_positions=16", "--data", data,
            "--seq-len", "16", "--no-progress", "--no-plot", "--mesh-model", "4", "--save-every", "2"]
    code = main(base + ["--out", out + "/bad", "--batch-size", "6"])
    print("BAD", code, flush=True)
    assert main(base + ["--out", out + "/run", "--batch-size", "8", "--steps", "3", "--async-checkpointing",
                        "--eval-data", data, "--eval-windows", "2"]) == 0
    # resume on another mesh (FSDP over 2 instead of 4): the checkpoint is resharded on restore
    assert main(["train", "--out", out + "/run", "--resume", "--steps", "5", "--no-progress", "--mesh-model", "2"]) == 0
    print("STEPS", [m["step"] for m in read_metrics(out + "/run/metrics.jsonl") if "loss" in m], flush=True)
""")


def test_cli_on_a_mesh_resumes_and_checks_the_batch(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(tmp_path / "d.bin"), str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BAD 2" in proc.stdout
    assert "batch size 6 is not divisible by the 8 batch shards of the mesh (data=2 x model=4)" in proc.stderr
    assert "STEPS [1, 2, 3, 4, 5]" in proc.stdout
    assert "from step 3" in proc.stderr
    assert "step 5: eval loss" in proc.stderr  # evaluation with FSDP-sharded params
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (k,))
    else:
        yield "/".join(prefix), tree


def test_lora_on_the_mesh_matches_one_device(sharded_runs):
    """LoRA adapters trained on the 2 x 4 FSDP mesh (base sharded, adapters replicated) equal the single-device
    LoRA run: losses to rtol 1e-5, adapters per element within the AdamW round-off bound; the frozen base is
    bit-identical after training on both, and really sharded on the mesh."""
    ref, run = sharded_runs["lora_single"], sharded_runs["lora_fsdp"]
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5)
    assert ref["moved"] > 1e-3  # the adapters train (4 AdamW steps of up to lr = 3e-3 each)
    assert ref["base_kept"] and run["base_kept"]
    assert run["base_c_attn"] == {"spec": [None, "model"], "shard": [32, 24], "devices": 8}
    adapters = dict(_flat(ref["adapters"]))
    bounds = _adam_bounds(ref["trace"], {key: tuple(key.split("/")) for key in adapters}, adapters)
    ours = dict(_flat(run["adapters"]))
    for key, expected in _flat(ref["adapters"]):
        diff = np.abs(np.asarray(ours[key], np.float64) - np.asarray(expected, np.float64))
        np.testing.assert_array_less(diff, bounds[key] + 1e-30, err_msg=key)
    assert np.median(np.concatenate([b.ravel() for b in bounds.values()])) < 3e-6  # not vacuous


REMAT_SCRIPT = textwrap.dedent(r"""
    import jax, numpy as np
    from gpt2_jax.config import GPT2Config
    from gpt2_jax.model import init_params
    from gpt2_jax.training import (OptimizerConfig, TrainState, batch_sharding, global_batch, make_mesh,
                                   make_optimizer, make_train_step, state_shardings)

    # GPT-2's vocabulary: 50257 rows split over no axis, so FSDP splits wte along n_embd (the case that made the
    # partitioner re-split the residual stream's gradient before the model constrained its activations)
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4)
    params = init_params(jax.random.PRNGKey(0), config)
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(16, 33)).astype(np.int32)
    for model, accum in ((4, 1), (2, 2)):
        mesh = make_mesh(None, model)
        shape = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params)
        shardings = state_shardings(shape, optimizer, mesh, "fsdp")
        state = jax.jit(lambda p: TrainState.create(p, optimizer), out_shardings=shardings)(params)
        b_sharding = batch_sharding(mesh, "fsdp")
        step = make_train_step(config, optimizer, schedule, accum_steps=accum, state_sharding=shardings,
                               batch_sharding=b_sharding)
        state, metrics = step(state, global_batch(tokens, b_sharding, 16), jax.random.PRNGKey(0))
        print("STEP", model, accum, float(metrics["loss"]), flush=True)
""")


def test_fsdp_step_compiles_without_involuntary_rematerialization():
    """Under FSDP the model splits every activation by rows and gathers the embedding table where it is used, so XLA's
    SPMD partitioner never falls back to replicating an activation and re-splitting it ("Involuntary full
    rematerialization" in its log; 6 of them on a data=2 x model=4 mesh before, 4 with gradient accumulation)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", REMAT_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("STEP") == 2
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]
