"""Optimizer and train step: torch AdamW parity, gradient parity, mask, schedule, accumulation, non-finite policy.

Tolerances (derived in tests/roundoff.py; nothing here is fitted to one CPU's kernels):

- Gradients computed two ways (JAX vs torch, micro-batches vs the full batch, with and without the block-gradient
  cut) agree to ``GRAD_ROUNDOFF * max|g_leaf|`` per leaf: round-off of sums of the same terms in other orders.
- Params after AdamW steps are compared per element with :class:`roundoff.AdamParamBound`: Adam turns a gradient
  difference ``delta`` into a direction difference ``~ delta / sqrt(v_hat)``, bounded by ``~2 lr`` per step where the
  gradient itself is round-off. That covers, e.g., the *key* third of ``c_attn``'s bias, whose gradient is exactly
  zero in exact arithmetic (adding one vector to every key shifts all of a query's scores by one constant, which
  softmax ignores): both frameworks return float32 noise (~1e-9) there, which Adam normalises to ~lr-sized updates.
- Gradient accumulation is checked on the gradients themselves (read back from the step through an optimizer that
  records them), not through Adam, which would amplify round-off in tiny gradients into update-sized differences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict, state_dict_to_params
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.training.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from gpt2_jax.training.step import TrainState, make_loss_fn, make_train_step
from hf_reference import hf_model
from roundoff import U, AdamParamBound, assert_grads_close, global_norm_rtol, leaf_grad_atol

CONFIG = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SMALL = CONFIG.replace(n_layer=1)  # for the tests that compare our own steps with each other (faster to compile)


def random_params(seed=0, config=CONFIG):
    """Init params with every leaf perturbed (biases and norms too, so each param's update is non-trivial)."""
    params = init_params(jax.random.PRNGKey(seed), config)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def batch(seed=0, rows=4, length=17, vocab=CONFIG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, length), dtype=np.int32)


def torch_loss(model, tokens):
    logits = model(input_ids=torch.from_numpy(tokens[:, :-1]).long()).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(tokens[:, 1:]).long().reshape(-1))


def torch_params(model):
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return state_dict_to_params(state, CONFIG)


def torch_optimizer(model, params, cfg: OptimizerConfig):
    """torch AdamW with param groups built from the same decay mask."""
    decay = params_to_state_dict(decay_mask(params), convert=lambda x: x)
    named = dict(model.named_parameters())  # lm_head.weight is tied to transformer.wte.weight: listed once
    assert set(named) == set(decay), set(named) ^ set(decay)
    groups = [
        {"params": [p for n, p in named.items() if decay[n]], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named.items() if not decay[n]], "weight_decay": 0.0},
    ]
    assert groups[0]["params"] and groups[1]["params"]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps)


def recording_optimizer() -> optax.GradientTransformation:
    """An optax transformation that applies no update and keeps the gradient it is given as its state, so the
    gradient a train step computed (accumulated or not) can be read back from ``state.opt_state``."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree_util.tree_map(jnp.zeros_like, grads), grads),
    )


def test_decay_mask_is_kernels_only():
    mask = decay_mask(init_params(jax.random.PRNGKey(0), CONFIG))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted(f"['h']['{i}']['{m}']['{l}']['kernel']" for i in range(CONFIG.n_layer)
                             for m, l in [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")])
    for name in ("['wte']['embedding']", "['wpe']['embedding']", "['ln_f']['scale']", "['h']['0']['ln_1']['bias']",
                 "['h']['0']['attn']['c_attn']['bias']"):
        assert flat[name] is False


def test_schedule_warmup_cosine_floor():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lr = make_schedule(cfg)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(float(lr(60)), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way through the cosine
    np.testing.assert_allclose([float(lr(110)), float(lr(500))], [0.1, 0.1], atol=1e-7)
    assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(10, 120))
    # all-warmup configuration still gives a valid schedule
    assert float(make_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=5, total_steps=5))(5)) == 2.0


def test_bad_optimizer_config():
    with pytest.raises(ValueError, match="grad_clip"):
        OptimizerConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(total_steps=0)


def test_gradients_match_pytorch():
    params = random_params()
    tokens = batch()
    loss, grads = jax.value_and_grad(make_loss_fn(CONFIG, dropout=False))(params, jnp.asarray(tokens), None)
    model = hf_model(params, CONFIG)
    ref = torch_loss(model, tokens)
    ref.backward()
    # the loss is a mean of 64 positive per-token NLLs: float32 summation in another order is off by <= log2(64) u
    # relative; rtol 16 u covers it with the log-softmax round-off of each term
    np.testing.assert_allclose(float(loss), ref.item(), rtol=16 * U)
    ref_grads = state_dict_to_params({n: p.grad.numpy() for n, p in model.named_parameters()}, CONFIG)
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("grad_clip", [None, 0.05], ids=["no-clip", "clip"])
def test_adamw_steps_match_torch(grad_clip):
    """Three steps (warmup 0 -> lr/2 -> lr, so lr=0 is covered too) from the same weights and batches."""
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, total_steps=10, b1=0.9, b2=0.95, eps=1e-8,
                          weight_decay=0.1, grad_clip=grad_clip)
    params = random_params()
    optimizer, schedule = make_optimizer(cfg)
    step = make_train_step(CONFIG, optimizer, schedule, dropout=False, donate=False)
    state = TrainState.create(params, optimizer)

    model = hf_model(params, CONFIG).train()  # dropout rates are 0
    torch_opt = torch_optimizer(model, params, cfg)
    named = dict(model.named_parameters())
    bounds = {name: AdamParamBound(cfg.b1, cfg.b2, cfg.eps) for name in named}
    tight = None
    for i in range(3):
        tokens = batch(seed=i)
        state, metrics = step(state, jnp.asarray(tokens), jax.random.PRNGKey(i))
        for group in torch_opt.param_groups:
            group["lr"] = float(schedule(i))
        torch_opt.zero_grad()
        loss = torch_loss(model, tokens)
        loss.backward()
        raw = {name: p.grad.numpy().copy() for name, p in named.items()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
        torch_opt.step()
        # the loss: float32 forward passes of two frameworks, a mean of 64 positive terms (see the gradient test)
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=16 * U)
        norm_rtol = global_norm_rtol(raw)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm.item(), rtol=norm_rtol)
        np.testing.assert_allclose(float(metrics["lr"]), schedule(i), rtol=4 * U)  # one float32 schedule evaluation
        # Per-element bound on the gradients Adam was given (after clipping). Clipping scales every gradient by
        # clip / norm: its round-off is the norm's (norm_rtol), plus torch's clip_coef = clip / (norm + 1e-6),
        # which optax does not have (a relative 1e-6 / norm).
        clipped = grad_clip is not None and norm.item() > grad_clip
        scale = grad_clip / norm.item() if clipped else 1.0
        rel = norm_rtol + 1e-6 / norm.item() if clipped else 0.0
        atol = {}
        for name, p in named.items():
            opt_state = torch_opt.state[p]
            v_hat = opt_state["exp_avg_sq"].numpy().astype(np.float64) / (1 - cfg.b2 ** int(opt_state["step"]))
            delta = scale * leaf_grad_atol(raw[name]) + rel * np.abs(p.grad.numpy())
            atol[name] = bounds[name].step(float(schedule(i)), np.sqrt(v_hat), delta, p.detach().numpy())
        ours, theirs = _flat(state.params), _flat(torch_params(model))
        limits = _flat(state_dict_to_params(atol, CONFIG))
        for name, limit in limits.items():
            np.testing.assert_array_less(np.abs(np.asarray(ours[name], np.float64) - theirs[name]), limit + 1e-30,
                                         err_msg=f"step {i}: {name}")
        tight = np.median(np.concatenate([x.ravel() for x in limits.values()]))
    # The bound is not vacuous: it is loose (up to ~2 lr per step) only where a gradient is comparable to its
    # round-off; half the elements are held to <= 1e-6 = lr / 1000 (measured: median 4e-7, and every difference
    # at most 0.13 of its bound).
    assert tight < 1e-6, tight
    if grad_clip:
        assert float(metrics["grad_norm"]) > grad_clip  # clipping was active
    assert int(state.step) == 3 and int(state.skipped) == 0
    # the update really moved the params (by about lr per element, more than the tolerance)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                                 jax.tree_util.tree_leaves(params)))
    assert moved > 1e-3


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_gradient_accumulation_equals_full_batch():
    """Micro-batches of 4 and 2 rows give the 8-row batch's loss and gradient, compared directly: the gradient the
    step hands to the optimizer is read back through :func:`recording_optimizer` (no Adam in between)."""
    params = random_params(config=SMALL)
    tokens = jnp.asarray(batch(rows=8))
    recorder = recording_optimizer()
    results = {}
    for accum in (1, 2, 4):
        step = make_train_step(SMALL, recorder, accum_steps=accum, dropout=False, donate=False)
        state, metrics = step(TrainState.create(params, recorder), tokens, jax.random.PRNGKey(0))
        assert int(metrics["finite"]) == 1
        results[accum] = (state.opt_state, metrics)
    full_grads, full_metrics = results[1]
    for accum in (2, 4):
        grads, metrics = results[accum]
        # a mean of 128 positive per-token NLLs, summed in another grouping: <= log2(128) u relative (+ the scale)
        np.testing.assert_allclose(float(metrics["loss"]), float(full_metrics["loss"]), rtol=16 * U)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(full_metrics["grad_norm"]),
                                   rtol=global_norm_rtol(full_grads))
        assert_grads_close(grads, full_grads, what=f"accum_steps={accum}: ")
    # a real accumulation bug (e.g. dropping the last micro-batch) is far outside the bound
    half = jax.tree_util.tree_map(lambda g: np.asarray(g) * 0.5, full_grads)
    with pytest.raises(AssertionError):
        assert_grads_close(half, full_grads)
    optimizer, _ = make_optimizer(OptimizerConfig(warmup_steps=0))
    with pytest.raises(ValueError, match="divisible by accum_steps"):
        make_train_step(SMALL, optimizer, accum_steps=3, dropout=False)(
            TrainState.create(params, optimizer), tokens, jax.random.PRNGKey(0))


def test_non_finite_step_is_skipped_and_counted():
    params = random_params(config=SMALL)
    tokens = batch()
    poisoned = jax.tree_util.tree_map(lambda x: x, params)
    poisoned["wte"]["embedding"] = params["wte"]["embedding"].at[int(tokens[0, 0])].set(jnp.nan)
    optimizer, schedule = make_optimizer(OptimizerConfig(warmup_steps=0))
    step = make_train_step(SMALL, optimizer, schedule, dropout=False, donate=False)
    state0 = TrainState.create(poisoned, optimizer)
    state1, metrics = step(state0, jnp.asarray(tokens), jax.random.PRNGKey(0))
    assert int(metrics["finite"]) == 0 and int(metrics["skipped"]) == 1
    assert int(state1.step) == 1 and int(state1.skipped) == 1
    for new, old in zip(jax.tree_util.tree_leaves(state1), jax.tree_util.tree_leaves(state0)):
        if new.ndim:  # params and optimizer moments kept exactly (NaN where they were NaN)
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    # optimizer count unchanged: the schedule counts applied updates only
    assert int(state1.opt_state[1][0].count) == 0
    # a clean state continues normally and the count is kept
    clean = state1.replace(params=params)
    state2, metrics = step(clean, jnp.asarray(tokens), jax.random.PRNGKey(0))
    assert int(metrics["finite"]) == 1 and int(state2.skipped) == 1 and int(state2.step) == 2


def test_dropout_uses_the_key():
    config = SMALL.replace(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    params = random_params(config=config)
    optimizer, schedule = make_optimizer(OptimizerConfig(warmup_steps=0))
    step = make_train_step(config, optimizer, schedule, donate=False)
    state = TrainState.create(params, optimizer)
    tokens = jnp.asarray(batch())
    loss = lambda key: float(step(state, tokens, key)[1]["loss"])
    assert loss(jax.random.PRNGKey(1)) == loss(jax.random.PRNGKey(1))
    assert loss(jax.random.PRNGKey(1)) != loss(jax.random.PRNGKey(2))
    no_dropout = make_train_step(config, optimizer, schedule, dropout=False, donate=False)
    assert float(no_dropout(state, tokens, jax.random.PRNGKey(1))[1]["loss"]) == \
        float(no_dropout(state, tokens, jax.random.PRNGKey(2))[1]["loss"])


def test_bfloat16_compute_keeps_float32_master_params():
    params = random_params(config=SMALL)
    tokens = jnp.asarray(batch())
    optimizer, schedule = make_optimizer(OptimizerConfig(warmup_steps=0))
    step32 = make_train_step(SMALL, optimizer, schedule, dropout=False, donate=False)
    step16 = make_train_step(SMALL, optimizer, schedule, compute_dtype=jnp.bfloat16, dropout=False, donate=False)
    state = TrainState.create(params, optimizer)
    s32, m32 = step32(state, tokens, jax.random.PRNGKey(0))
    s16, m16 = step16(state, tokens, jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(s16.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(s16.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert m16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=5e-2)


def test_block_gradient_cut_changes_nothing_but_the_program():
    """The CPU workaround (a conditional on each block's output gradient) is present and value-preserving."""
    params = random_params()
    tokens = jnp.asarray(batch())
    from gpt2_jax.backend import PLATFORM_DEFAULTS

    cpu = PLATFORM_DEFAULTS["cpu"]  # the two programs differ in the cut only
    with_cut = jax.value_and_grad(make_loss_fn(CONFIG, dropout=False, tuning=cpu.replace(cut_block_gradients=True)))
    without = jax.value_and_grad(make_loss_fn(CONFIG, dropout=False, tuning=cpu.replace(cut_block_gradients=False)))
    hlo_cut = jax.jit(with_cut).lower(params, tokens, None).as_text()
    hlo_plain = jax.jit(without).lower(params, tokens, None).as_text()
    assert hlo_cut.count("stablehlo.case") == CONFIG.n_layer + 1 and "stablehlo.case" not in hlo_plain  # + logits
    (l1, g1), (l2, g2) = with_cut(params, tokens, None), without(params, tokens, None)
    # Equal values, but from two different XLA programs (fusion and reduction tiling may differ), so round-off
    # bounds, not bitwise equality: the loss is one float32 mean of 64 terms (16 u), gradients per leaf.
    np.testing.assert_allclose(float(l1), float(l2), rtol=16 * U)
    assert_grads_close(g1, g2)


def test_clip_reuses_a_known_norm_only_for_its_own_input():
    """``known_norm=(tree, norm)``: the clip takes ``norm`` instead of reading the tree again only when its input
    is that very tree (first in the chain); the result is the same as computing it; any other tree is ignored."""
    from gpt2_jax.training.optim import clip_by_global_norm

    clip = clip_by_global_norm(1.0)
    grads = {"a": jnp.full((3,), 2.0), "b": jnp.full((2, 2), 3.0)}  # norm sqrt(12 + 36) ~ 6.93: clipped
    state = clip.init(grads)
    plain, _ = clip.update(grads, state)
    reused, _ = clip.update(grads, state, known_norm=(grads, optax.tree.norm(grads)))
    for name in grads:
        np.testing.assert_array_equal(np.asarray(reused[name]), np.asarray(plain[name]))
    # the norm handed over is the one used (a made-up norm shows it), for the same arrays only
    fake, _ = clip.update(grads, state, known_norm=(grads, jnp.float32(2.0)))
    np.testing.assert_allclose(np.asarray(fake["a"]), 1.0, rtol=1e-6)  # 2 * (1 / 2)
    copy = jax.tree_util.tree_map(lambda x: x + 0, grads)
    other, _ = clip.update(grads, state, known_norm=(copy, jnp.float32(2.0)))
    np.testing.assert_allclose(np.asarray(other["a"]), np.asarray(plain["a"]), rtol=0, atol=0)
    # traced: no reduction over the tree when the norm is known
    count_sums = lambda f: str(jax.make_jaxpr(f)(grads)).count("reduce_sum")
    assert count_sums(lambda g: clip.update(g, clip.init(g), known_norm=(g, jnp.float32(1.0)))[0]) == 0
    assert count_sums(lambda g: clip.update(g, clip.init(g))[0]) == 2


def test_train_step_reads_the_gradients_for_their_norm_once():
    """The step's norm (for its non-finite check and metrics) is handed to the clip inside the update branch: the
    step has one sum of squares per gradient leaf fewer than with an optimizer that takes no extra arguments (whose
    clip computes the norm again)."""
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    params = init_params(jax.random.PRNGKey(0), config)
    optimizer, schedule = make_optimizer(OptimizerConfig(grad_clip=1.0))
    plain = optax.GradientTransformation(optimizer.init, lambda u, s, p=None: optimizer.update(u, s, p))
    tokens = jnp.zeros((2, 9), jnp.int32)

    def reductions(opt) -> int:
        step = make_train_step(config, opt, schedule, dropout=False, donate=False, jit=False)
        return str(jax.make_jaxpr(step)(TrainState.create(params, opt), tokens, jax.random.PRNGKey(0))).count(
            "reduce_sum")

    assert reductions(plain) - reductions(optimizer) == len(jax.tree_util.tree_leaves(params))
