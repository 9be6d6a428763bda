"""The jitted, pure train step: ``(state, batch, key) -> (state, metrics)``.

- Loss: mean next-token cross-entropy over a batch of windows ``[batch, seq_len + 1]`` (inputs ``[:, :-1]``,
  labels ``[:, 1:]``), computed in float32 whatever the compute dtype.
- Dropout draws from ``key`` (per micro-batch ``fold_in(key, i)``); with every dropout rate 0, or
  ``dropout=False``, the step is deterministic.
- Mixed precision: ``compute_dtype=jnp.bfloat16`` runs matmuls and activations in bfloat16 while the params
  (the "master weights"), gradients and optimizer state stay float32; layer norms, softmax and the loss are
  float32 anyway.
- Gradient accumulation: ``accum_steps > 1`` splits the batch into micro-batches (row ``r`` goes to micro-batch
  ``r % accum_steps``, so each device keeps its own rows) and scans over them, summing gradients; the result is
  the gradient of the whole batch's mean loss, with the activation memory of one micro-batch.
- Non-finite policy: when the loss or the global gradient norm is not finite (NaN/inf, including a norm that
  overflows float32), the update is skipped: params and optimizer state are kept as they were, ``state.skipped``
  is incremented and ``metrics['finite']`` is 0. The step counter still advances (the batch is consumed), while
  the learning-rate schedule, which counts applied updates, does not. The training loop stops with an error
  after too many consecutive skips (see :mod:`gpt2_jax.training.loop`).
- Backend tuning (:class:`gpt2_jax.backend.Tuning`, default: the platform the step runs on): with
  ``cut_block_gradients`` (the CPU default) the model cuts each block's output gradient and the step cuts the
  logits' gradient (:func:`gpt2_jax.layers.cut_gradient`, an identity whose backward is a fusion boundary: XLA's
  CPU fusion otherwise recomputes the backward residual chain quadratically). Values are unchanged.
- LoRA (``lora=`` a :class:`~gpt2_jax.lora.LoraConfig`): ``state.params`` is ``{"params": base, "lora":
  adapters}`` (:func:`lora_train_params`); only the adapters are differentiated, clipped, counted in the gradient
  norm and updated (the optimizer and its state cover them alone); the frozen base is read, never written.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import backend, narrow_dots, precision
from ..backend import Tuning
from ..config import GPT2Config
from ..head_loss import tied_head_cross_entropy
from ..layers import LORA_COLLECTION, LORA_DROPOUT_RNG, check_remat_policy, cut_gradient, gathered, rows_sharded
from ..lora import LoraConfig, lora_variables
from ..losses import cross_entropy
from ..model import GPT2LMHeadModel
from .optim import global_norm


@struct.dataclass
class TrainState:
    """Everything a train step updates: ``step`` (int32 ``[]``, batches consumed), ``params`` (float32 master
    weights), ``opt_state`` (optax state) and ``skipped`` (int32 ``[]``, non-finite steps skipped so far)."""

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
        """A state at step 0 with a fresh optimizer state."""
        return cls(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((), jnp.int32))

    @classmethod
    def create_lora(cls, base, adapters, optimizer: optax.GradientTransformation) -> "TrainState":
        """A LoRA run's state at step 0: params ``{"params": base, "lora": adapters}``, an optimizer state for the
        adapters only (the frozen base has none)."""
        return cls(jnp.zeros((), jnp.int32), lora_train_params(base, adapters), optimizer.init(adapters),
                   jnp.zeros((), jnp.int32))

    def __repr__(self) -> str:
        """``TrainState(step=10, skipped=0, params=<N params in K float32 arrays>, opt_state=<...>)``."""
        from ..reprs import tree_summary

        def scalar(x):
            try:
                return str(int(x))
            except Exception:  # a tracer
                return f"<{getattr(x, 'dtype', '?')}{list(getattr(x, 'shape', ()))}>"

        return (f"TrainState(step={scalar(self.step)}, skipped={scalar(self.skipped)}, "
                f"params={tree_summary(self.params)}, opt_state={tree_summary(self.opt_state, 'numbers')})")

    def to_dict(self) -> dict:
        """The state as a plain dict (what checkpoints store)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """Inverse of :meth:`to_dict`."""
        return cls(d["step"], d["params"], d["opt_state"], d["skipped"])


def _has_dropout(config: GPT2Config) -> bool:
    return max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) > 0


def _sharding_platform(*shardings) -> str | None:
    """The platform (``'cpu'``, ``'gpu'``, ``'tpu'``) of the devices of the first sharding found in ``shardings``
    (pytrees of :class:`jax.sharding.Sharding`), or None when there is none."""
    for tree in shardings:
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        for leaf in leaves:
            if isinstance(leaf, jax.sharding.Sharding):
                platform = next(iter(leaf.device_set)).platform
                return "gpu" if platform in ("cuda", "rocm") else platform
    return None


def _splits_rows_only(batch_sharding: NamedSharding | None) -> bool:
    """Whether the batch is split over every mesh axis of more than one device (data parallelism, FSDP): then
    every activation is split by rows too. Tensor parallelism splits activations along features instead."""
    if batch_sharding is None:
        return False
    spec = batch_sharding.spec[0] if len(batch_sharding.spec) else None
    axes = set(spec) if isinstance(spec, tuple) else {spec} - {None}
    return all(name in axes for name, size in batch_sharding.mesh.shape.items() if size > 1)


def lora_train_params(base: Any, adapters: Any) -> dict:
    """The ``state.params`` of a LoRA run: ``{"params": base, "lora": adapters}`` (see the module docstring)."""
    return {"params": base, "lora": adapters}


def _trainable(params: Any, lora: LoraConfig | None) -> Any:
    """What a step differentiates and updates: the adapters of a LoRA run, else every param."""
    return params["lora"] if lora is not None else params


def _with_trainable(params: Any, trainable: Any, lora: LoraConfig | None) -> Any:
    return {**params, "lora": trainable} if lora is not None else trainable


def make_loss_fn(config: GPT2Config, compute_dtype=jnp.float32, dropout: bool = True,
                 tuning: Tuning | None = None, remat: str = "none", lora: LoraConfig | None = None) -> Callable:
    """``loss(params, tokens [B, T + 1], key) -> []`` float32 mean next-token cross-entropy.

    ``tuning`` (default: :func:`~gpt2_jax.backend.tuning_for` JAX's default backend) is the model's backend
    settings; with ``cut_block_gradients`` the model materialises each block's residual gradient once in the
    backward pass, and so does the loss for the logits' gradient (else XLA's CPU fusion recomputes the softmax
    gradient inside both LM-head matmuls' operands; ~4% of a gpt2 float32 step). Values are unchanged. Where the
    head's matmuls are :mod:`~gpt2_jax.narrow_dots`' (bfloat16 on the CPU), the LM head and the loss are one
    function with its own gradient, :func:`gpt2_jax.head_loss.tied_head_cross_entropy`. ``remat`` is the blocks'
    rematerialisation policy (:data:`gpt2_jax.layers.REMAT_POLICIES`). With ``lora``, ``params`` is ``{"params":
    base, "lora": adapters}`` and the adapters' input dropout draws from ``key`` too.
    """
    tuning = tuning if tuning is not None else backend.tuning_for()
    # bfloat16 compute where the backend runs it well; on the CPU (low_precision_compute off) float32, which
    # measured faster there (a gpt2 step in bfloat16 ran at 0.88-0.90x float32's speed).
    compute_dtype = jnp.dtype(precision.compute_dtype(compute_dtype, tuning=tuning))
    # Where the LM head's matmuls are narrow_dots' (bfloat16 on XLA CPU), the head and the loss are one function
    # with its own gradient (gpt2_jax.head_loss: the loss reads the float32 product unrounded, and the logits'
    # gradient is written once, in bfloat16, with no transposed copy). The logits' gradient cut below, for XLA
    # CPU's float32 fusion, is for the separate head and loss.
    fused_head = narrow_dots.applies(compute_dtype, tuning)
    model = GPT2LMHeadModel(config, dtype=compute_dtype, tuning=tuning, remat_policy=check_remat_policy(remat))
    train = dropout and _has_dropout(config)
    lora_dropout = dropout and lora is not None and lora.dropout > 0

    def loss_fn(params, tokens, key):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [B, T] each
        variables = {"params": params}
        if lora is not None:
            variables = {"params": params["params"], LORA_COLLECTION: lora_variables(params["lora"], lora)}
        rngs = {"dropout": key} if train else {}
        if lora_dropout:
            rngs[LORA_DROPOUT_RNG] = jax.random.fold_in(key, 0x10A)
        if fused_head:
            hidden = model.apply(variables, inputs, deterministic=not train, rngs=rngs or None,
                                 method=GPT2LMHeadModel.transformer).last_hidden_state  # [B, T, n_embd]
            wte = gathered(variables["params"]["wte"]["embedding"])  # [vocab, n_embd]
            return tied_head_cross_entropy(hidden, wte, labels)  # -> []
        out = model.apply(variables, inputs, deterministic=not train, rngs=rngs or None)
        logits = cut_gradient(out.logits) if tuning.cut_block_gradients else out.logits  # [B, T, vocab]
        return cross_entropy(logits, labels)  # logits [B, T, vocab] -> []

    return loss_fn


def make_train_step(
    config: GPT2Config,
    optimizer: optax.GradientTransformation,
    schedule: Callable | None = None,
    *,
    accum_steps: int = 1,
    compute_dtype=jnp.float32,
    dropout: bool = True,
    state_sharding=None,
    batch_sharding: NamedSharding | None = None,
    donate: bool = True,
    jit: bool = True,
    tuning: Tuning | None = None,
    remat: str = "none",
    lora: LoraConfig | None = None,
) -> Callable:
    """Build the train step ``(state, batch, key) -> (state, metrics)``.

    Args:
        config: the model architecture.
        optimizer: an optax transformation (e.g. from :func:`~gpt2_jax.training.optim.make_optimizer`).
        schedule: the learning-rate schedule, only to report ``metrics['lr']``.
        accum_steps: micro-batches per step; the batch size must be divisible by it.
        compute_dtype: ``jnp.float32`` or ``jnp.bfloat16`` (params stay float32); bfloat16 is computed in float32
            where ``tuning.low_precision_compute`` is off (the CPU's default: XLA CPU's bfloat16 step is slower).
        dropout: apply the config's dropout rates (drawn from ``key``); False for a deterministic step.
        state_sharding: a pytree of shardings like the :class:`TrainState` (from
            :func:`~gpt2_jax.training.sharding.state_shardings`), or None for one device.
        batch_sharding: the batch's sharding (rows over the data axes); required with ``state_sharding``.
        donate: donate the input state's buffers (update in place); do not reuse the old state after the call.
        jit: return the jitted function (False: the plain function, e.g. to wrap yourself).
        tuning: backend settings (:class:`~gpt2_jax.backend.Tuning`); None: :func:`~gpt2_jax.backend.tuning_for`
            the platform of the shardings' devices when given, else of JAX's default backend.
        remat: what each block keeps for the backward pass (:data:`gpt2_jax.layers.REMAT_POLICIES`): ``none``
            (everything), ``full`` (only its input: least memory, one more forward pass), ``dots_saveable`` (matmul
            outputs) or ``minimal`` (weight-matmul outputs; attention and elementwise ops recomputed).
        lora: train LoRA adapters only: ``state.params`` is :func:`lora_train_params` and the optimizer state
            is ``optimizer.init(adapters)``.

    Returns:
        ``step(state, batch, key)`` with ``batch`` int ``[batch, seq_len + 1]`` and ``key`` a ``jax.random``
        key; metrics are float32/int32 scalars ``loss``, ``grad_norm`` (before clipping), ``lr``, ``finite``
        (1 if the update was applied) and ``skipped`` (total).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    platform = _sharding_platform(state_sharding, batch_sharding)
    if tuning is None:
        tuning = backend.tuning_for(platform=platform)
    if remat != "none" and not config.scan_layers and (platform or backend.platform_of()) == "cpu":
        warnings.warn(
            f"remat={remat!r} saves no memory on XLA CPU without scan_layers: XLA CPU drops the optimization "
            "barriers that keep the recomputation in the backward pass of an unrolled model (it still costs the "
            "recomputation); use scan_layers=True (gpt2-jax train --scan-layers)", stacklevel=2)
    loss_fn = make_loss_fn(config, compute_dtype, dropout, tuning, remat, lora)
    # d loss / d trainable params (the adapters of a LoRA run: the frozen base gets no gradient at all)
    grad_of_trainable = jax.value_and_grad(
        lambda trainable, params, tokens, key: loss_fn(_with_trainable(params, trainable, lora), tokens, key))

    def grad_fn(params, tokens, key):
        return grad_of_trainable(_trainable(params, lora), params, tokens, key)

    micro_sharding = None
    if batch_sharding is not None and accum_steps > 1:
        spec = batch_sharding.spec
        micro_sharding = NamedSharding(batch_sharding.mesh, P(None, *spec))

    def loss_and_grads(params, batch, key):
        if accum_steps == 1:
            return grad_fn(params, batch, key)
        rows, width = batch.shape
        if rows % accum_steps:
            raise ValueError(f"batch size {rows} is not divisible by accum_steps={accum_steps}")
        # [rows, width] -> [rows / accum, accum, width] -> [accum, rows / accum, width]: micro-batch i = rows
        # i, i + accum, ...; a device holding a contiguous block of rows holds a share of every micro-batch.
        micro = batch.reshape(rows // accum_steps, accum_steps, width).swapaxes(0, 1)
        if micro_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

        def body(carry, xs):
            loss_sum, grad_sum = carry
            tokens, i = xs
            loss, grads = grad_fn(params, tokens, jax.random.fold_in(key, i))
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), _trainable(params, lora))
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        (micro, jnp.arange(accum_steps)))
        scale = 1.0 / accum_steps
        return loss * scale, jax.tree_util.tree_map(lambda g, p: (g * scale).astype(p.dtype), grads,
                                                    _trainable(params, lora))

    rows = batch_sharding if _splits_rows_only(batch_sharding) else None

    def step(state: TrainState, batch: jax.Array, key: jax.Array):
        with rows_sharded(rows):  # activations split by rows like the batch (FSDP / data parallel)
            loss, grads = loss_and_grads(state.params, batch, key)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(operands):
            params, opt_state, grads, norm = operands
            if isinstance(optimizer, optax.GradientTransformationExtraArgs):  # a clip first in it reuses the norm
                updates, opt_state = optimizer.update(grads, opt_state, params, known_norm=(grads, norm))
            else:
                updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # Only one branch runs (a select after the update would cost ~60% more memory traffic).
        new_trainable, new_opt_state = jax.lax.cond(finite, apply, lambda operands: operands[:2],
                                                    (_trainable(state.params, lora), state.opt_state, grads,
                                                     grad_norm))
        new_params = _with_trainable(state.params, new_trainable, lora)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt_state, skipped=skipped)
        applied = state.step - state.skipped  # the schedule counts applied updates only
        lr = schedule(applied) if schedule is not None else jnp.nan
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": grad_norm,
            "lr": jnp.asarray(lr, jnp.float32),
            "finite": finite.astype(jnp.int32),
            "skipped": skipped,
        }
        return new_state, metrics

    if not jit:
        return step
    if state_sharding is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    if batch_sharding is None:
        raise ValueError("batch_sharding is required with state_sharding")
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )
