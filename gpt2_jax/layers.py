"""The layers of GPT-2: activations, float32 layer norm, causal attention over an optional KV cache, MLP, block.

Each module's params mirror Hugging Face's names (``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``, ``ln_2``); Dense
kernels are ``[in, out]`` like Hugging Face's ``Conv1D``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from . import narrow_dots, weights_first
from .backend import Tuning
from .config import GPT2Config
from .kv_cache import write_slots

Dtype = Any


# Activation sharding -------------------------------------------------------------------------------------------
# Under FSDP (and plain data parallelism) every activation is split by rows over the mesh, and each weight is
# gathered where it is used. Without a constraint, XLA's SPMD partitioner may instead follow a weight's sharding
# into the activations (e.g. the gradient of c_attn's output split along features, like its kernel) and then has to
# "involuntarily" replicate and re-split them. The training step sets the rows' sharding while it traces the model.
_ROW_SHARDING: contextvars.ContextVar = contextvars.ContextVar("gpt2_jax_row_sharding", default=None)


@contextlib.contextmanager
def rows_sharded(sharding):
    """While tracing under this context, :func:`constrain_rows` splits ``[batch, ...]`` activations by rows as the
    ``NamedSharding`` ``sharding`` splits a batch (its spec's first entry); None turns it off."""
    token = _ROW_SHARDING.set(sharding)
    try:
        yield
    finally:
        _ROW_SHARDING.reset(token)


def constrain_rows(x: jax.Array) -> jax.Array:
    """``x [batch, ...]`` constrained to the rows' sharding of :func:`rows_sharded` (the identity outside it)."""
    sharding = _ROW_SHARDING.get()
    if sharding is None or x.ndim == 0:
        return x
    spec = PartitionSpec(sharding.spec[0] if len(sharding.spec) else None, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))


def gathered(x: jax.Array) -> jax.Array:
    """Under :func:`rows_sharded`, ``x`` (a weight) whole on every device where it is used, FSDP's all-gather (its
    gradient is then summed over the rows' devices and split back to the weight's sharding); else the identity.
    Used for the embedding table, whose gather / scatter-add the partitioner cannot split by rows on its own."""
    sharding = _ROW_SHARDING.get()
    if sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, PartitionSpec()))


class Embed(nn.Embed):
    """``flax.linen.Embed`` (same params, init and lookup) whose table is :func:`gathered` and whose output rows are
    :func:`constrain_rows`-split while a training step traces it under FSDP."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        if self.num_embeddings == 1:
            (embedding,) = self.promote_dtype(gathered(self.embedding), dtype=self.dtype, inexact=False)
            return jnp.broadcast_to(embedding, inputs.shape + (self.features,))
        # The rows are taken from the stored table and then converted (not the whole table converted first): the
        # same values; the gradient is a scatter-add in the table's dtype, which XLA then writes into the other
        # uses' gradient of a tied table in place (the LM head's) instead of a zero-filled copy added to it.
        rows = jnp.take(gathered(self.embedding), inputs, axis=0)  # [..., features]
        (rows,) = self.promote_dtype(rows, dtype=self.dtype, inexact=False)
        return constrain_rows(rows)


# Activations ---------------------------------------------------------------------------------------------------
def _gelu_fast(x):
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_parts(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` in float32 or wider (``x`` upcast), in the operation order
    of ``jax.nn.gelu(approximate=True)``."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x, jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x**3)))


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GPT-2's GELU, the tanh approximation (``gelu_new``): ``x * 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715
    x^3)))``, computed in float32 (or wider) and returned in ``x``'s dtype; float32 values equal
    ``jax.nn.gelu(x, approximate=True)``'s.

    Its derivative is one closed-form factor (``custom_jvp``: forward and reverse mode both work), so a backward
    pass keeps one array, where differentiating the formula op by op keeps four intermediates (in a bfloat16 model
    each rounded to bfloat16 and written and read by a pass of its own on the CPU). gpt2's 12 MLPs, bfloat16,
    forward + backward on a 2-core Zen 4: 1.14 -> 1.08 s (median of 25 alternating calls).
    """
    upcast, tanh = _gelu_tanh_parts(x)
    return (upcast * (0.5 * (1.0 + tanh))).astype(x.dtype)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    upcast, tanh = _gelu_tanh_parts(x)
    cdf = 0.5 * (1.0 + tanh)
    # d/dx [x cdf(x)] = cdf + x * 0.5 (1 - tanh^2) * sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
    slope = cdf + upcast * (0.5 * (1.0 - tanh * tanh)) * (_SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * upcast * upcast))
    return (upcast * cdf).astype(x.dtype), (dx.astype(slope.dtype) * slope).astype(dx.dtype)


ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


# Hook points ---------------------------------------------------------------------------------------------------
# Every activation interpretability code names (TransformerLens's names, :mod:`gpt2_jax.interp`) passes through
# ``hook_point`` where it is computed. ``hooks`` is None on the plain path: the call returns its argument and adds
# nothing to the traced program. Otherwise it is a hook runner (:class:`gpt2_jax.interp.runner.HookRunner`) scoped
# to the module's name prefix (``blocks.3.attn``), which may record, replace or perturb the activation.
def hook_point(hooks, name: str, x: jax.Array) -> jax.Array:
    """The activation ``x`` at hook point ``name`` (relative to the scope of ``hooks``), after any hook."""
    return x if hooks is None else hooks(name, x)


def hook_wanted(hooks, name: str) -> bool:
    """Whether the hook point ``name`` is hooked or recorded (for activations computed only when asked for)."""
    return hooks is not None and hooks.wants(name)


def hook_scope(hooks, prefix: str, layer: int | None = None):
    """``hooks`` scoped one level down (``prefix`` appended to its names), or None on the plain path."""
    return None if hooks is None else hooks.scoped(prefix, layer)


def hooks_kwarg(hooks) -> dict:
    """``{"hooks": hooks}`` when hooks are used, else ``{}`` (so variant modules without the field still build)."""
    return {} if hooks is None else {"hooks": hooks}


# Layers --------------------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """Layer norm computed in float32 whatever the param and activation dtypes (``scale``/``bias`` params).

    Hook points (relative): ``hook_scale`` ``sqrt(var + eps)`` ``[..., 1]`` and ``hook_normalized`` (before the
    affine map), as TransformerLens names them.
    """

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    hooks: Any = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        centered = x32 - mean
        inv = jax.lax.rsqrt(var + self.epsilon)
        if hook_wanted(self.hooks, "hook_scale"):
            std = jnp.sqrt(var + self.epsilon)  # [..., 1]
            hooked = self.hooks("hook_scale", std)
            if hooked is not std:  # replaced or perturbed: normalise by the hooked scale
                inv = 1.0 / hooked
        y = hook_point(self.hooks, "hook_normalized", centered * inv)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


#: Variable collection that may carry every Dense kernel transposed, ``[out, in]``: the layout XLA's CPU
#: matrix-vector products read fastest. Generation on the CPU passes it
#: (:mod:`gpt2_jax.generation.weight_layout`); everything else uses the ``params`` kernels ``[in, out]``.
KERNELS_OUT_IN = "kernels_out_in"
#: The collection of LoRA adapters (:mod:`gpt2_jax.lora`): ``lora_A [in, r]``, ``lora_B [r, out]``, ``scale``,
#: ``dropout`` per adapted :class:`Dense`; and the rng stream of the adapters' input dropout (training).
LORA_COLLECTION = "lora"
LORA_DROPOUT_RNG = "lora_dropout"


class Dense(nn.Module):
    """``x @ kernel + bias`` with ``kernel [in, out]`` (Hugging Face's ``Conv1D``), params ``kernel`` and ``bias``.

    Computes like ``flax.linen.Dense``. When the variables carry the kernel transposed in the
    :data:`KERNELS_OUT_IN` collection, it reads that one instead (the ``params`` kernel is then not needed).
    Either kernel may be an int8 :class:`~gpt2_jax.precision.QuantizedArray` (per-output-channel scales): the
    int8 values are converted to ``dtype`` inside the matmul and its output channels scaled. When the variables
    carry a LoRA adapter in :data:`LORA_COLLECTION`, it adds ``dropout(x) @ lora_A @ lora_B * scale``
    (:mod:`gpt2_jax.lora`; the dropout only when a :data:`LORA_DROPOUT_RNG` stream is given).
    With a ``tuning`` whose :attr:`~gpt2_jax.backend.Tuning.row_major_bf16_dots` is on, a bfloat16 layer computes
    ``x @ kernel`` through :func:`gpt2_jax.narrow_dots.matmul` (float32 accumulation, XLA CPU's native bfloat16
    kernel in the forward and backward pass).
    """

    features: int
    std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    tuning: Any = None  # gpt2_jax.backend.Tuning or None (the plain dot)

    @nn.compact
    def __call__(self, x):
        from .precision import is_quantized  # a leaf module; imported here to keep layers' imports unchanged

        x = x.astype(self.dtype)
        quantized = None
        if self.has_variable(KERNELS_OUT_IN, "kernel"):
            kernel_t = self.get_variable(KERNELS_OUT_IN, "kernel")  # [out, in]
            if is_quantized(kernel_t):
                quantized = (kernel_t, "...i,oi->...o")
            elif self.tuning is not None and self.tuning.kernels_as_lhs:
                y = weights_first.matmul_out_in(x, kernel_t.astype(self.dtype))
            else:
                y = jnp.einsum("...i,oi->...o", x, kernel_t.astype(self.dtype))
        elif self.has_variable("params", "kernel") and is_quantized(self.get_variable("params", "kernel")):
            quantized = (self.get_variable("params", "kernel"), "...i,io->...o")  # [in, out]
        else:
            kernel = self.param("kernel", nn.initializers.normal(self.std), (x.shape[-1], self.features),
                                self.param_dtype)
            if narrow_dots.applies(self.dtype, self.tuning):
                y = narrow_dots.matmul(x, kernel.astype(self.dtype))  # float32 until the bias is added
            else:
                y = jax.lax.dot_general(x, kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if quantized is not None:  # int8 values converted inside the matmul, one scale per output channel
            kernel, spec = quantized
            y = jnp.einsum(spec, x, kernel.q.astype(self.dtype)) * kernel.scale.reshape(-1).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        # A float32 product (narrow_dots) takes the bias in float32 too: the bias gradient, a sum over all rows, is
        # then a float32 reduction. A bfloat16 one (the transpose of a bfloat16 broadcast) is lowered by XLA CPU as
        # a reduce-window loop, ~30x slower (7 vs 0.24 ms for 1024 x 3072; 0.27 s of gpt2's mixed-precision step).
        y = (y + bias.astype(y.dtype)).astype(self.dtype)
        if self.has_variable(LORA_COLLECTION, "lora_A"):
            y = y + self._lora_update(x)
        return constrain_rows(y)  # [batch, ..., features], rows split as the batch is (training under FSDP)

    def _lora_update(self, x):
        """``dropout(x) @ lora_A @ lora_B * scale``: ``x [..., in]`` -> ``[..., out]``."""
        a = self.get_variable(LORA_COLLECTION, "lora_A").astype(self.dtype)  # [in, r]
        b = self.get_variable(LORA_COLLECTION, "lora_B").astype(self.dtype)  # [r, out]
        scale = self.get_variable(LORA_COLLECTION, "scale").astype(self.dtype)  # []
        if self.has_rng(LORA_DROPOUT_RNG):
            rate = self.get_variable(LORA_COLLECTION, "dropout").astype(self.dtype)  # []
            keep = jax.random.bernoulli(self.make_rng(LORA_DROPOUT_RNG), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
        return (x @ a) @ b * scale  # [..., r] -> [..., out]


def dense_kernel(module: Dense) -> jax.Array:
    """The ``[in, out]`` kernel of a bound, already called :class:`Dense` in its compute dtype (from whichever
    collection it reads: transposed ``[out, in]`` kernels and int8 kernels are brought back to ``[in, out]``)."""
    from .precision import is_quantized

    if module.has_variable(KERNELS_OUT_IN, "kernel"):
        kernel, transposed = module.get_variable(KERNELS_OUT_IN, "kernel"), True
    else:
        kernel, transposed = module.get_variable("params", "kernel"), False
    if is_quantized(kernel):
        kernel = kernel.q.astype(module.dtype) * kernel.scale.reshape((-1, 1) if transposed else (1, -1)).astype(
            module.dtype)
    kernel = kernel.astype(module.dtype)
    return kernel.T if transposed else kernel


def dense(features: int, std: float, dtype, param_dtype, name: str, tuning=None) -> Dense:
    """A :class:`Dense` layer (``kernel [in, out]``, ``bias``) initialised with normal(std) weights, zero bias,
    computing under ``tuning`` (:class:`gpt2_jax.backend.Tuning`; None: the plain dot)."""
    return Dense(features, std, dtype, param_dtype, tuning=tuning, name=name)


# Gradient cut (a CPU tuning, :attr:`gpt2_jax.backend.Tuning.cut_block_gradients`) --------------------------------
# XLA's CPU compiler fuses the backward residual stream (a chain of elementwise adds through every block) into each
# consumer that needs it transposed for a weight-gradient matmul, recomputing the chain from the top for every
# layer: O(n_layer^2) work, ~40% of a gpt2 training step on CPU. optimization_barrier is stripped before fusion on
# CPU, but a conditional is a fusion boundary that survives: the backward of each block output goes through a
# `lax.cond` whose branches are both the identity, so every block's residual gradient is materialised once.
@jax.custom_vjp
def cut_gradient(x):
    """The identity; its gradient is materialised once (a fusion boundary for XLA CPU's backward pass)."""
    return x


def _cut_gradient_fwd(x):
    return x, None


def _cut_gradient_bwd(_, g):
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda t: t, lambda t: t * 1, g),)  # identity either way (NaN too)


cut_gradient.defvjp(_cut_gradient_fwd, _cut_gradient_bwd)


def attention_scale(config: GPT2Config, layer_idx) -> float | jax.Array:
    """The factor on ``q . k``: ``1/sqrt(head_dim)`` (if ``scale_attn_weights``) and ``1/(layer_idx + 1)`` (if
    ``scale_attn_by_inverse_layer_idx``). A Python float for a Python ``layer_idx``, else a traced scalar."""
    scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        if isinstance(layer_idx, int):
            return scale / float(layer_idx + 1)
        return scale / (jnp.asarray(layer_idx, jnp.float32) + 1.0)
    return scale


def attention_probs(q, k, visible, scale, *, upcast: bool = False, hooks=None, narrow: bool = False) -> jax.Array:
    """Softmax attention probabilities, the softmax always in float32.

    Args:
        q: ``[batch, n_head, T, head_dim]``; k: ``[batch, n_head, S, head_dim]`` (the cache's layout, read in place:
            other layouts made XLA CPU copy the whole one-row cache every decode step).
        visible: ``[batch, 1, T, S]`` bool, or None for full visibility.
        scale: Python float or traced scalar multiplying ``q . k``.
        upcast: compute the scores in float32 (Hugging Face's ``reorder_and_upcast_attn``).
        hooks: hook runner scoped to the attention module: ``hook_attn_scores`` (scaled and masked, float32) and
            ``hook_pattern`` (the probabilities) pass through it.
        narrow: compute ``q . k`` with :func:`gpt2_jax.narrow_dots.batched_matmul` (bfloat16 operands, float32
            scores; XLA CPU's native bfloat16 kernel, backward pass included). Ignored with ``upcast``.

    Returns:
        ``probs [batch, n_head, T, S]`` in k's dtype.
    """
    if narrow and not upcast:
        scores = narrow_dots.batched_matmul(q, k.astype(q.dtype), b_transposed=True) * scale  # [batch, n_head, T, S]
    else:
        score_dtype = jnp.float32 if upcast else q.dtype
        scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(score_dtype), k.astype(score_dtype)) * scale
    scores = scores.astype(jnp.float32)  # [batch, n_head, T, S]
    if visible is not None:
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    scores = hook_point(hooks, "hook_attn_scores", scores)
    return hook_point(hooks, "hook_pattern", jax.nn.softmax(scores, axis=-1).astype(k.dtype))


#: The shortest sequence whose causal attention :func:`causal_halves_attention` splits (shorter ones gain nothing).
CAUSAL_HALVES_MIN_LENGTH = 64


def causal_halves_attention(q, k, v, attend: Callable) -> jax.Array:
    """Causal attention in two query halves, skipping the block of scores the causal mask hides entirely.

    The first ``T // 2`` queries see only the first ``T // 2`` keys, so they are computed against those alone; the
    other queries against all keys. Each masked-out score's probability is exactly 0 in the full product, so the
    result is the same up to float32 round-off, for 3/4 of the scores, softmax and ``P @ V`` work.

    Args:
        q, k, v: ``[batch, n_head, T, head_dim]`` (queries at positions ``0 .. T - 1``, keys and values at the same).
        attend: ``attend(q_block [b, h, Tq, d], k_prefix [b, h, S, d], v_prefix [b, h, S, d], visible [1, 1, Tq,
            S] bool) -> [b, h, Tq, d]``: the probabilities (over the given keys only) times the values.

    Returns:
        ``[batch, n_head, T, head_dim]``.
    """
    length = q.shape[2]
    outs = []
    for start, stop in ((0, length // 2), (length // 2, length)):
        # query start + i sees key j iff j <= start + i: [1, 1, stop - start, stop]
        visible = (jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None])[None, None]
        outs.append(attend(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], visible))
    return jnp.concatenate(outs, axis=2)  # 2 x [b, h, T / 2, d] -> [b, h, T, d]


def fused_attention(q, k, v, visible, scale, *, causal_only: bool, implementation: str):
    """:func:`jax.nn.dot_product_attention` (no probabilities materialised for the caller).

    ``implementation`` is ``'xla'`` or ``'cudnn'`` (flash attention on NVIDIA GPUs; where cuDNN refuses the shapes
    or dtypes, the XLA implementation runs instead). ``causal_only`` says that ``visible`` is exactly the causal
    mask (no padding, no cache), which lets cuDNN skip the masked blocks.

    Shapes: ``q [batch, T, n_head, head_dim]``, ``k, v [batch, S, n_head, head_dim]`` -> ``[batch, T, n_head,
    head_dim]``.
    """
    if not isinstance(scale, float):  # a traced per-layer scale (scan over layers): fold it into q
        q, scale = (q.astype(jnp.float32) * scale).astype(q.dtype), 1.0
    mask = None if causal_only else visible
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal_only,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError, TypeError):
            pass  # shapes, dtype or device cuDNN does not take: the XLA implementation below
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal_only, implementation="xla")


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention (``c_attn`` -> heads -> ``c_proj``), optionally over a KV cache.

    Variants override :meth:`position_qk` (e.g. rotary position embeddings) or the whole module
    (:func:`register_variant`).
    """

    config: GPT2Config
    tuning: Tuning
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True
    output_attentions: bool = False
    causal_only: bool = False  # `visible` is the plain causal mask (no padding, no cache)
    hooks: Any = None  # hook runner scoped to ``blocks.{l}.attn`` (None: no hook points in the program)

    def position_qk(self, q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Where a variant injects positions into queries and keys (``[batch, T, n_head, head_dim]`` each,
        ``positions [batch, T]``). GPT-2's positions are learned and added to the embeddings: the identity."""
        return q, k

    def _probs(self, q, k, visible, scale, head_mask, narrow: bool, hooks=None) -> jax.Array:
        """:func:`attention_probs` ``[batch, n_head, Tq, S]``, then attention dropout and the head mask."""
        probs = attention_probs(q, k, visible, scale, upcast=self.config.reorder_and_upcast_attn, hooks=hooks,
                                narrow=narrow)
        probs = nn.Dropout(self.config.attn_pdrop)(probs, deterministic=self.deterministic)
        if head_mask is not None:
            probs = probs * head_mask.astype(probs.dtype)[None, :, None, None]
        return probs

    def _weigh_values(self, probs, v, narrow: bool) -> jax.Array:
        """``probs [b, h, Tq, S] @ v [b, h, S, d]`` -> ``[b, h, Tq, d]`` in the probabilities' dtype (on XLA CPU's
        native bfloat16 kernel under ``narrow``)."""
        v = v.astype(probs.dtype)
        if narrow and probs.dtype == self.dtype:
            return narrow_dots.batched_matmul(probs, v).astype(probs.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v)

    @nn.compact
    def __call__(self, x, positions, visible, layer_idx, layer_cache=None, cache_index=None, head_mask=None):
        """
        Args:
            x: ``[batch, T, n_embd]``.
            positions: ``[batch, T]`` int32 position of each token.
            visible: ``[batch, 1, T, S]`` bool, which key slot each query may attend to.
            layer_idx: this block's index (a Python int, or a traced scalar under ``scan_layers``).
            layer_cache: ``(keys, values)`` of this layer, each ``[batch, n_head, S, head_dim]``, or None.
            cache_index: ``[]`` int32 slot where the T new keys are written (with ``layer_cache``).
            head_mask: ``[n_head]`` multipliers of the attention probabilities, or None.

        Returns:
            ``(out [batch, T, n_embd], probs [batch, n_head, T, S] or None, new layer_cache or None)``.
        """
        cfg = self.config
        batch, length, _ = x.shape
        resid_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        qkv = dense(3 * cfg.n_embd, cfg.initializer_range, self.dtype, self.param_dtype, "c_attn", self.tuning)(x)
        # [batch, T, 3 * n_embd] -> 3 x [batch, T, n_head, head_dim]
        q, k, v = (t.reshape(batch, length, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        hooks = self.hooks
        q, k, v = hook_point(hooks, "hook_q", q), hook_point(hooks, "hook_k", k), hook_point(hooks, "hook_v", v)
        q, k = self.position_qk(q, k, positions)
        dropout_on = cfg.attn_pdrop > 0 and not self.deterministic
        # hooks on scores or pattern need them materialised: the explicit path, whatever the tuning says
        hooked_probs = hook_wanted(hooks, "hook_attn_scores") or hook_wanted(hooks, "hook_pattern")
        explicit = (self.output_attentions or head_mask is not None or dropout_on or cfg.reorder_and_upcast_attn
                    or self.tuning.attention == "explicit" or hooked_probs)
        # the explicit path's bfloat16 products on XLA CPU's native kernel (narrow_dots), which needs its operands
        # copied row-major; not over a cache, whose slot writes could hand the kernel an operand it rejects
        narrow = explicit and layer_cache is None and narrow_dots.applies(self.dtype, self.tuning)
        heads_first = narrow_dots.transpose if narrow else jnp.transpose
        # keys/values in the cache's layout: [batch, T, n_head, head_dim] -> [batch, n_head, T, head_dim]
        k, v = heads_first(k, (0, 2, 1, 3)), heads_first(v, (0, 2, 1, 3))
        new_cache = None
        if layer_cache is not None:
            single_row = self.tuning.single_row_cache_view
            k = write_slots(layer_cache[0], k, cache_index, single_row)  # [batch, n_head, S, head_dim]
            v = write_slots(layer_cache[1], v, cache_index, single_row)
            new_cache = (k, v)

        scale = attention_scale(cfg, layer_idx)
        probs = None
        halves = (explicit and self.tuning.causal_attention_halves and self.causal_only and layer_cache is None
                  and not (self.output_attentions or hooked_probs) and length >= CAUSAL_HALVES_MIN_LENGTH)
        if halves:  # the probabilities are neither returned nor hooked: the all-masked quarter is skipped
            def attend(q_block, k_prefix, v_prefix, block_visible):
                block_probs = self._probs(q_block, k_prefix, block_visible, scale, head_mask, narrow)
                return self._weigh_values(block_probs, v_prefix, narrow)  # [b, h, Tq, d]

            out = causal_halves_attention(heads_first(q, (0, 2, 1, 3)), k, v, attend)  # [b, h, T, d]
            out = heads_first(out, (0, 2, 1, 3))  # -> [batch, T, n_head, head_dim]
        elif explicit:
            probs = self._probs(heads_first(q, (0, 2, 1, 3)), k, visible, scale, head_mask, narrow, hooks)
            if narrow and probs.dtype == self.dtype:
                out = narrow_dots.transpose(self._weigh_values(probs, v, narrow), (0, 2, 1, 3))  # [b, T, h, d]
            elif length > 1:  # P @ V heads first, then the heads move: [b, h, T, d] -> [batch, T, n_head, head_dim]
                out = self._weigh_values(probs, v, narrow).transpose(0, 2, 1, 3)
            else:  # one query: XLA's matrix-vector product writes [batch, 1, n_head, head_dim] directly
                out = jnp.einsum("bhqk,bhkd->bqhd", probs, v.astype(probs.dtype))
        else:  # [batch, n_head, S, head_dim] -> [batch, S, n_head, head_dim], the layout it takes
            out = fused_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), visible, scale,
                                  causal_only=self.causal_only, implementation=self.tuning.attention)
        out = hook_point(hooks, "hook_z", out)  # [batch, T, n_head, head_dim]
        proj = dense(cfg.n_embd, resid_std, self.dtype, self.param_dtype, "c_proj", self.tuning)
        flat = out.reshape(batch, length, cfg.n_embd)  # [batch, T, n_head, head_dim] -> [batch, T, n_embd]
        if hook_wanted(hooks, "hook_result"):  # per-head outputs, computed only when asked for
            proj(flat)  # binds (or creates) c_proj's params; its value is unused
            w_o = dense_kernel(proj).reshape(cfg.n_head, cfg.head_dim, cfg.n_embd)
            result = jnp.einsum("bthd,hdm->bthm", out.astype(self.dtype), w_o)  # [batch, T, n_head, n_embd]
            result = hook_point(hooks, "hook_result", result)
            out = result.sum(axis=2) + proj.get_variable("params", "bias").astype(self.dtype)
        else:
            out = proj(flat)
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=self.deterministic)
        return out, (probs if self.output_attentions else None), new_cache


class GPT2MLP(nn.Module):
    """``c_fc`` -> activation -> ``c_proj`` -> dropout. Hook points (relative): ``hook_pre``, ``hook_post``."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True
    hooks: Any = None  # hook runner scoped to ``blocks.{l}.mlp``
    tuning: Any = None  # gpt2_jax.backend.Tuning of the matmuls (None: the plain dot)

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        resid_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        h = dense(cfg.inner_dim, cfg.initializer_range, self.dtype, self.param_dtype, "c_fc", self.tuning)(x)
        h = hook_point(self.hooks, "hook_pre", h)  # [batch, T, n_inner]
        h = hook_point(self.hooks, "hook_post", ACTIVATION_FNS[cfg.activation_function](h))  # [batch, T, n_inner]
        h = dense(cfg.n_embd, resid_std, self.dtype, self.param_dtype, "c_proj", self.tuning)(h)
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=self.deterministic)


class GPT2Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    The attention and MLP classes come from the config's variant (:func:`register_variant`). The call signature is
    the one ``nn.scan`` needs: ``(x, per-layer inputs...) -> (x, per-layer outputs)``.
    """

    config: GPT2Config
    tuning: Tuning
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False
    causal_only: bool = False
    hooks: Any = None  # hook runner (unscoped); the block scopes it to ``blocks.{layer_idx}``

    @nn.compact
    def __call__(self, x, positions, visible, layer_idx, layer_cache=None, cache_index=None, head_mask=None):
        """``x [batch, T, n_embd]`` (other arguments as :class:`GPT2Attention`) -> ``(x, (hidden or None, probs or
        None, layer_cache or None))``; ``hidden`` is the block output when ``output_hidden_states``."""
        cfg = self.config
        variant = get_variant(cfg.variant)
        hooks = hook_scope(self.hooks, f"blocks.{layer_idx}", layer_idx)  # None on the plain path
        norm = lambda name, scope: LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype,
                                             hooks=hook_scope(hooks, scope), name=name)
        attn = variant.attention(cfg, self.tuning, self.dtype, self.param_dtype, self.deterministic,
                                 self.output_attentions, self.causal_only, name="attn",
                                 **hooks_kwarg(hook_scope(hooks, "attn")))
        x = hook_point(hooks, "hook_resid_pre", x)
        attn_out, probs, layer_cache = attn(norm("ln_1", "ln1")(x), positions, visible, layer_idx, layer_cache,
                                            cache_index, head_mask)
        x = hook_point(hooks, "hook_resid_mid", x + hook_point(hooks, "hook_attn_out", attn_out))
        takes_tuning = "tuning" in getattr(variant.mlp, "__dataclass_fields__", {})  # a variant's MLP may not
        mlp = variant.mlp(cfg, self.dtype, self.param_dtype, self.deterministic, name="mlp",
                          **hooks_kwarg(hook_scope(hooks, "mlp")), **({"tuning": self.tuning} if takes_tuning else {}))
        x = hook_point(hooks, "hook_resid_post", x + hook_point(hooks, "hook_mlp_out", mlp(norm("ln_2", "ln2")(x))))
        if self.tuning.cut_block_gradients:
            x = cut_gradient(x)
        return x, (x if self.output_hidden_states else None, probs, layer_cache)


#: ``remat_policy`` values: what a rematerialised block keeps from its forward pass for the backward pass.
#: ``none``: no remat (keep every activation); ``full``: keep only the block input (recompute the whole block);
#: ``dots_saveable``: keep every matmul output (recompute elementwise ops); ``minimal``: keep the weight matmuls'
#: outputs, recompute attention's batched matmuls and elementwise ops (MaxText's "minimal").
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> str:
    """``name`` if it is one of :data:`REMAT_POLICIES`, else a ValueError listing them."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r} is not one of {', '.join(REMAT_POLICIES)}")
    return name


class GPT2BlockStack(nn.Module):
    """The ``n_layer`` blocks, named ``0 .. n_layer-1`` so params read ``h/<i>/...`` (unrolled), or one block
    under ``nn.scan`` with params stacked ``[n_layer, ...]`` directly under ``h/`` (``config.scan_layers``).

    Built inside the model's compact method (see :meth:`gpt2_jax.model._GPT2Base.transformer`), which names it
    ``h`` in both cases.
    """

    config: GPT2Config
    tuning: Tuning
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False
    causal_only: bool = False
    remat_policy: str = "none"
    hooks: Any = None  # hook runner (unrolled stack only; see gpt2_jax.interp)

    @nn.compact
    def __call__(self, x, positions, visible, cache=None, head_mask=None):
        """Returns ``(x, per-block outputs, per-layer attention probs, (keys, values) or None)``; the last three
        are tuples over layers (``keys``/``values`` as the cache holds them), empty when not requested."""
        cfg = self.config
        block_cls = remat_block(get_variant(cfg.variant).block, self.remat_policy)
        fields = dict(config=cfg, tuning=self.tuning, dtype=self.dtype, param_dtype=self.param_dtype,
                      deterministic=self.deterministic, output_attentions=self.output_attentions,
                      output_hidden_states=self.output_hidden_states, causal_only=self.causal_only,
                      **hooks_kwarg(self.hooks))
        cache_index = cache.index if cache is not None else None
        block_outputs, attentions, keys, values = [], [], [], []
        for i in range(cfg.n_layer):
            layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
            layer_head_mask = head_mask[i] if head_mask is not None else None
            x, (hidden, probs, layer_cache) = block_cls(**fields, name=str(i))(
                x, positions, visible, i, layer_cache, cache_index, layer_head_mask)
            block_outputs.append(hidden)
            attentions.append(probs)
            if layer_cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
        kv = (tuple(keys), tuple(values)) if cache is not None else None
        return x, tuple(block_outputs), tuple(attentions), kv


def remat_block(block_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """``block_cls`` wrapped in ``nn.remat`` with the named :data:`REMAT_POLICIES` policy (``none``: unchanged)."""
    if check_remat_policy(policy) == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy])


def scanned_blocks(x, positions, visible, cache, head_mask, *, fields: dict, remat_policy: str, name: str = "h"):
    """The blocks under ``nn.scan`` (params stacked ``[n_layer, ...]``), called from a compact method.

    Same inputs and outputs as :class:`GPT2BlockStack`; a stacked cache (``keys [n_layer, batch, n_head, S,
    head_dim]``) is scanned over its layer axis, per-layer outputs come back stacked and are split into tuples.
    """
    cfg = fields["config"]
    block_cls = remat_block(get_variant(cfg.variant).block, remat_policy)
    scan = nn.scan(
        block_cls,
        variable_axes={"params": 0, KERNELS_OUT_IN: 0, LORA_COLLECTION: 0},  # transposed kernels, adapters stacked too
        split_rngs={"params": True, "dropout": True, LORA_DROPOUT_RNG: True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, 0),
        length=cfg.n_layer,
    )
    layer_cache = (cache.keys, cache.values) if cache is not None else None
    cache_index = cache.index if cache is not None else None
    layer_idx = jnp.arange(cfg.n_layer, dtype=jnp.int32)
    x, (hidden, probs, kv) = scan(**fields, name=name)(
        x, positions, visible, layer_idx, layer_cache, cache_index, head_mask)
    split = lambda stacked: () if stacked is None else tuple(stacked)  # [n_layer, ...] -> n_layer arrays
    return x, split(hidden), split(probs), kv


# Variants ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """The module classes of an architecture variant, selected by ``GPT2Config.variant``.

    Attributes:
        attention: the attention module (constructor and call as :class:`GPT2Attention`).
        mlp: the MLP module (as :class:`GPT2MLP`).
        block: the block module (as :class:`GPT2Block`).
        learned_positions: add the learned ``wpe`` table to the embeddings (False: the model has no ``wpe``;
            positions reach attention only, e.g. rotary embeddings).
    """

    attention: type = GPT2Attention
    mlp: type = GPT2MLP
    block: type = GPT2Block
    learned_positions: bool = True


VARIANTS: dict[str, Variant] = {"gpt2": Variant()}


def register_variant(name: str, **modules: Any) -> Variant:
    """Register (or replace) a variant: ``register_variant("rotary", attention=RotaryAttention,
    learned_positions=False)``; then ``GPT2Config(variant="rotary")`` builds, trains and generates with it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a variant needs a non-empty name, got {name!r}")
    if name == "gpt2":
        raise ValueError("the 'gpt2' variant is the released architecture and cannot be replaced")
    VARIANTS[name] = variant = Variant(**modules)
    return variant


def get_variant(name: str) -> Variant:
    """The registered :class:`Variant` called ``name``."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; registered: {', '.join(VARIANTS)}") from None
