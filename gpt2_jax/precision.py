"""Low precision: what a narrow dtype computes in on each backend, and int8 weight-only quantization.

**bfloat16 / float16.** A narrow dtype always means narrow *storage* (params on disk and in memory). Whether it also
means narrow *compute* is a backend setting, :attr:`gpt2_jax.backend.Tuning.low_precision_compute`:

* GPU / TPU (on): computed in that dtype, as asked (the matrix units are faster, the weights half as many bytes).
* CPU (off): computed in float32. XLA CPU's bfloat16 matrix-vector products run at ~1 GB/s against ~24 GB/s for
  float32 (a gpt2 bfloat16 decode was 8x slower than float32) and its bfloat16 GEMMs are not faster than float32
  ones at gpt2's prompt sizes, so generation upcasts the narrow weights once, when it prepares them
  (:func:`gpt2_jax.generation.weight_layout.decode_weights`), and runs exactly the float32 programs: as fast as
  float32, with the numbers of the bfloat16-rounded weights. :func:`compute_dtype` is that decision;
  ``GPT2_JAX_TUNING=low_precision_compute=1`` (or :func:`gpt2_jax.backend.overrides`) forces narrow compute.

**int8 weight-only quantization** (:func:`quantize_params`): every Dense kernel (and, by default, the token
embedding ``wte``, which is also the tied LM head) becomes a :class:`QuantizedArray`, symmetric int8 with one
float32 scale per output channel (``scale = max|w| / 127`` over the input axis; each weight is off by at most
``scale / 2``). Biases, layer norms and ``wpe`` stay as they are. gpt2 shrinks from 498 MB (float32) to 128 MB.

* CPU: generation dequantizes once, to float32, when it prepares the weights (XLA CPU's int8 matrix-vector product,
  and an int8 -> float32 convert fused into the dot, both run ~7x slower than the float32 product): decode and
  prefill run at float32 speed; the saving is in storage and transfer.
* GPU / TPU (``low_precision_compute``): the Dense kernels stay int8 in device memory and each layer converts
  them inside the compiled program, scaling the product's output channels (XLA fuses the convert into the matmul's
  operand read, so a decode step reads a quarter of the float32 bytes); ``wte`` is dequantized once, to the compute
  dtype, because the embedding lookup and the tied LM head read it as a plain array.

Why not ``qwix`` (Google's JAX quantization library): it works with this JAX, but it quantizes by intercepting
``dot_general`` inside a ``quantize_model``-wrapped module, with its own params wrappers; that does not reach the
engine's prepared CPU layout (the transposed-kernel collection) or the tied LM head, and on the CPU its per-call
dequantization measured ~15x slower than float32 on gpt2-shaped matrix-vector products. Symmetric per-channel
int8 is a few lines here, and the quantized tree keeps the Hugging Face names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import backend

#: Dtypes that are stored narrow and, where :attr:`~gpt2_jax.backend.Tuning.low_precision_compute` is off,
#: computed in float32.
NARROW_FLOATS = ("bfloat16", "float16")
#: Quantization schemes :func:`quantize_params` knows.
QUANTIZATIONS = ("int8",)
_QMAX = 127.0


# Compute dtype -------------------------------------------------------------------------------------------------
def params_dtype(params: Any) -> str:
    """The dtype of the token embedding (``wte``) of ``params`` (plain, quantized or prepared
    ``DecodeWeights``): what generation computes in when no dtype is given, before :func:`compute_dtype`."""
    tree = getattr(params, "params", params)  # DecodeWeights -> its params
    return jnp.dtype(tree["wte"]["embedding"].dtype).name


def compute_dtype(dtype: Any = None, params: Any = None, tuning: backend.Tuning | None = None) -> str:
    """The dtype generation (or any caller) should compute in when asked for ``dtype``.

    Args:
        dtype: the requested dtype (a name or a dtype); None: the params' dtype (:func:`params_dtype`).
        params: the params (only read for their dtype and their devices' platform).
        tuning: backend settings; default :func:`~gpt2_jax.backend.tuning_for` the params.

    Returns:
        the dtype's name; ``'float32'`` for a narrow float (:data:`NARROW_FLOATS`) when
        :attr:`~gpt2_jax.backend.Tuning.low_precision_compute` is off (the CPU's default).
    """
    name = jnp.dtype(dtype).name if dtype is not None else params_dtype(params)
    tuning = tuning if tuning is not None else backend.tuning_for(params)
    if name in NARROW_FLOATS and not tuning.low_precision_compute:
        return "float32"
    return name


def precision_note(dtype: Any, tuning: backend.Tuning | None = None, quantize: str | None = None,
                   platform: str | None = None) -> str | None:
    """One line saying how ``dtype`` (and ``quantize``) run on this backend, or None for plain float32.

    Example: ``"bfloat16 on cpu: weights stored in bfloat16, computed in float32 (XLA CPU's bfloat16
    matrix-vector products are ~8x slower); GPT2_JAX_TUNING=low_precision_compute=1 computes in bfloat16"``.
    """
    name = jnp.dtype(dtype).name
    platform = platform or backend.platform_of(None)
    tuning = tuning if tuning is not None else backend.tuning_for(platform=platform)
    narrow_compute = tuning.low_precision_compute
    parts = []
    if name in NARROW_FLOATS:
        if narrow_compute:
            parts.append(f"{name} on {platform}: weights stored and computed in {name}")
        else:
            parts.append(f"{name} on {platform}: weights stored in {name}, computed in float32 (XLA CPU's {name} "
                         f"matrix-vector products are ~8x slower than float32); "
                         f"{backend.TUNING_ENV}=low_precision_compute=1 computes in {name}")
    if quantize is not None:
        target = compute_dtype(name, tuning=tuning)
        if narrow_compute:
            parts.append(f"{quantize} weights (per-channel scales) on {platform}: Dense kernels stay {quantize} in "
                         f"memory and are converted inside each layer's matmul; wte dequantized once to {target}")
        else:
            parts.append(f"{quantize} weights (per-channel scales) on {platform}: dequantized once to {target} "
                         f"when generation prepares them (XLA CPU's int8 matrix-vector products are slow), so "
                         f"speed is {target}'s; the saving is storage and transfer")
    return "; ".join(parts) if parts else None


# int8 weight-only quantization ---------------------------------------------------------------------------------
@struct.dataclass
class QuantizedArray:
    """A weight stored as symmetric int8 with float32 scales along one axis: ``w ~= q * scale``.

    A pytree (``q`` and ``scale`` are its leaves), so it can be sliced by ``nn.scan``, placed with
    ``jax.device_put`` and passed through ``jit``.

    Attributes:
        q: the int8 values, the weight's shape.
        scale: float32, the weight's shape with size 1 along ``axis`` (``max|w| / 127`` over that axis).
        axis: the reduced axis, negative (``-2``: the input axis of a ``[in, out]`` kernel, one scale per output
            channel; ``-1``: the embedding axis of ``wte [vocab, n_embd]``, one scale per token, which is the LM
            head's output channel).
        orig_dtype: the dtype of the weight before quantization, what :meth:`dequantize` returns by default.
    """

    q: jax.Array
    scale: jax.Array
    axis: int = struct.field(pytree_node=False, default=-2)
    orig_dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def dtype(self):
        """The dtype the weight stands for (its dequantized dtype)."""
        return jnp.dtype(self.orig_dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``q * scale`` in ``dtype`` (default: the original dtype)."""
        dtype = jnp.dtype(dtype if dtype is not None else self.orig_dtype)
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def transpose_last(self) -> "QuantizedArray":
        """The same weight with its last two axes swapped (the ``[in, out]`` kernel as ``[out, in]``)."""
        swap = lambda x: jnp.swapaxes(x, -1, -2)
        return QuantizedArray(swap(self.q), swap(self.scale), -1 if self.axis == -2 else -2, self.orig_dtype)


def is_quantized(leaf: Any) -> bool:
    """Whether ``leaf`` is a :class:`QuantizedArray` (use as ``is_leaf`` in tree maps)."""
    return isinstance(leaf, QuantizedArray)


def params_are_quantized(params: Any) -> bool:
    """Whether any leaf of ``params`` is a :class:`QuantizedArray`."""
    return any(is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_quantized))


def _quantize_int8(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / _QMAX, 1.0)  # an all-zero channel: q = 0, any scale
    q = jnp.clip(jnp.round(w / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return q, scale


_quantize_int8_jit = jax.jit(_quantize_int8, static_argnames="axis")


def quantize_array(w: jax.Array, axis: int = -2, scheme: str = "int8") -> QuantizedArray:
    """Quantize one weight symmetrically to int8 with one scale per slice along ``axis`` (negative)."""
    _check_scheme(scheme)
    if axis >= 0:
        raise ValueError(f"axis must be negative (counted from the end), got {axis}")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"only floating-point weights can be quantized, got {w.dtype}")
    q, scale = _quantize_int8_jit(w, axis=axis)
    return QuantizedArray(q, scale, axis, jnp.dtype(w.dtype).name)


def _check_scheme(scheme: Any) -> None:
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of: {', '.join(QUANTIZATIONS)}")


def quantize_params(params: Any, scheme: str = "int8", *, embeddings: bool = True) -> Any:
    """int8 weight-only quantization of a GPT-2 params tree (the Hugging Face-named nested dict).

    Args:
        params: the params (float32, bfloat16 or float16); per-layer or stacked (``scan_layers``) kernels alike.
        scheme: ``"int8"`` (:data:`QUANTIZATIONS`).
        embeddings: also quantize ``wte`` (one scale per token row: the tied LM head's output channels).

    Returns:
        the same tree with every Dense ``kernel`` (``[..., in, out]``, one scale per output channel) and ``wte``
        replaced by :class:`QuantizedArray` s. Generation takes it as it is (:func:`gpt2_jax.generation.generate`,
        ``prefill`` / ``decode_step``); for anything else, :func:`dequantize_params` first.

    Raises:
        ValueError: an unknown scheme, or params that are already quantized.
    """
    _check_scheme(scheme)
    if params_are_quantized(params):
        raise ValueError("params are already quantized")

    def walk(tree, path):
        out = {}
        for name, value in tree.items():
            where = path + (str(name),)
            if hasattr(value, "items"):
                out[name] = walk(value, where)
            elif name == "kernel" and np.ndim(value) >= 2:
                out[name] = quantize_array(value, -2, scheme)
            elif embeddings and where == ("wte", "embedding"):
                out[name] = quantize_array(value, -1, scheme)
            else:
                out[name] = value
        return out

    return walk(params, ())


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """Every :class:`QuantizedArray` of ``params`` back to a plain array (``dtype``, default its original
    dtype); other leaves unchanged. The result works with every model function."""
    return jax.tree_util.tree_map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params,
                                  is_leaf=is_quantized)


def quantized_bytes(params: Any) -> int:
    """Bytes of the arrays of ``params`` as stored (int8 values plus their scales for quantized leaves)."""
    return int(sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(params)))
