"""The weights generation computes with, prepared once per params object for the backend they live on.

Two backend settings (:mod:`gpt2_jax.backend`, decided by :func:`~gpt2_jax.backend.tuning_for` from the platform
of the params' devices) shape them:

* :attr:`~gpt2_jax.backend.Tuning.transposed_kernels` (CPU): for programs whose decode steps compute one row, every
  Dense kernel also transposed to ``[out, in]``. A decode step at batch 1 is a chain of matrix-vector products,
  bound by reading the weights from memory, and XLA's CPU matrix-vector product reads a kernel laid out
  ``[out, in]`` (each output a contiguous row) faster than the ``[in, out]`` layout of the params (Hugging Face's
  ``Conv1D``): gpt2 decodes 6-15% faster on 2 cores (``benchmarks/bench_generate.py``). With 2 or more rows a step
  (batched prompts, return sequences, beams) the params' own layout is faster (gpt2 at batch 8:
  44 vs 54 ms a step), so such programs get the params unchanged and no copy is made
  (:meth:`~gpt2_jax.backend.Tuning.kernels_transposed_for`). The engine gives the model each kernel transposed in
  the :data:`~gpt2_jax.layers.KERNELS_OUT_IN` collection (the tied LM head already reads ``wte`` as
  ``[vocab, n_embd]``).
* :attr:`~gpt2_jax.backend.Tuning.low_precision_compute` off (CPU): bfloat16 / float16 weights and int8-quantized
  ones (:mod:`gpt2_jax.precision`) are converted to float32 here, once, ``wte`` (the LM head) included, and the
  programs compute in float32 (:func:`gpt2_jax.precision.compute_dtype`): XLA CPU's narrow matrix-vector products
  crawl at ~1 GB/s. On (GPU/TPU): narrow weights stay narrow; quantized Dense kernels stay int8 (each layer
  converts them inside its matmul) and only a quantized ``wte`` is dequantized here.

GPUs and TPUs with float params get the params unchanged. A prepared copy (gpt2: 0.34 GB of transposed float32
kernels) is made once per params object and reused while that object is alive (:func:`decode_weights`).
``GPT2_JAX_TUNING=transposed_kernels=0`` (or the older ``GPT2_JAX_TRANSPOSED_KERNELS=0``) turns the transposition
off.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from .. import backend
from ..backend import TRANSPOSED_KERNELS_ENV, Tuning
from ..layers import KERNELS_OUT_IN
from ..precision import NARROW_FLOATS, is_quantized

__all__ = ["TRANSPOSED_KERNELS_ENV", "DecodeWeights", "clear_cache", "decode_weights", "prepare_weights",
           "transpose_kernels", "use_transposed_kernels"]


@struct.dataclass
class DecodeWeights:
    """Params plus (optionally) their transposed kernels: what the compiled generation programs take.

    Attributes:
        params: the model params; without the Dense kernels when ``kernels_out_in`` carries them.
        kernels_out_in: the :data:`~gpt2_jax.layers.KERNELS_OUT_IN` collection (``h/<i>/.../kernel`` as
            ``[out, in]``), or None.
    """

    params: Any
    kernels_out_in: Any = None

    @property
    def variables(self) -> dict:
        """The variables dict for ``module.apply``."""
        if self.kernels_out_in is None:
            return {"params": self.params}
        return {"params": self.params, KERNELS_OUT_IN: self.kernels_out_in}


def use_transposed_kernels(platform: str | None = None) -> bool:
    """Whether generation on ``platform`` (default: JAX's default backend) computes with transposed kernels:
    :attr:`~gpt2_jax.backend.Tuning.transposed_kernels` of :func:`~gpt2_jax.backend.tuning_for` that platform
    (on the CPU unless turned off, e.g. ``GPT2_JAX_TRANSPOSED_KERNELS=0``)."""
    return backend.tuning_for(platform=platform).transposed_kernels


def _swap(x):
    return jnp.swapaxes(x, -1, -2)  # [..., in, out] -> [..., out, in] (stacked scan_layers kernels too)


def _widen(x, upcast: bool):
    """A leaf as the programs read it: float32 when ``upcast`` and it is narrow or quantized."""
    if is_quantized(x):
        return x.dequantize(jnp.float32) if upcast else x
    if upcast and jnp.dtype(x.dtype).name in NARROW_FLOATS:
        return x.astype(jnp.float32)
    return x


@functools.partial(jax.jit, static_argnames=("upcast",))
def _transposed(kernels, upcast: bool = False):
    """Every ``[..., in, out]`` kernel of the tree as ``[..., out, in]``, materialised row-major by XLA (and
    widened to float32 in the same pass when ``upcast``); quantized kernels stay quantized unless ``upcast``."""
    def one(kernel):
        kernel = _widen(kernel, upcast)
        return kernel.transpose_last() if is_quantized(kernel) else _swap(kernel)

    return jax.tree_util.tree_map(one, kernels, is_leaf=is_quantized)


_widened = jax.jit(lambda x: _widen(x, True))


def _split_kernels(tree) -> tuple[dict, dict]:
    """(the tree without Dense kernels, the same paths holding only the kernels)."""
    kept, kernels = {}, {}
    for name, value in tree.items():
        if hasattr(value, "items"):  # a nested module
            kept[name], sub = _split_kernels(value)
            if sub:
                kernels[name] = sub
        elif name == "kernel":
            kernels[name] = value
        else:
            kept[name] = value
    return kept, kernels


def _convert_params(tree, upcast: bool, consume: bool = False):
    """The non-transposed part of the prepared weights, converted leaf by leaf (leaves that need no conversion are
    shared, not copied): narrow and quantized leaves to float32 when ``upcast``; otherwise only quantized leaves
    that are not Dense kernels (``wte``: the embedding lookup and the tied LM head read a plain array) are
    dequantized, to their original dtype. ``consume``: each converted original is freed once its copy exists."""
    def convert(path, leaf):
        if upcast:
            needs = is_quantized(leaf) or jnp.dtype(leaf.dtype).name in NARROW_FLOATS
            return _widened(leaf) if needs else leaf
        if is_quantized(leaf) and getattr(path[-1], "key", None) != "kernel":
            return leaf.dequantize()
        return leaf

    def one(path, leaf):
        converted = convert(path, leaf)
        if consume and converted is not leaf:
            jax.block_until_ready(converted)
            _delete(leaf)
        return converted

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_quantized)


def _needs_preparing(params, upcast: bool) -> bool:
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf) or (upcast and jnp.dtype(leaf.dtype).name in NARROW_FLOATS):
            return True
    return False


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _delete(tree) -> None:
    """Free the device buffers of every jax array in ``tree`` now (they raise if used afterwards).

    On the CPU the freed host memory is also handed back to the operating system (glibc ``malloc_trim``): the
    buffers were allocated by the loading thread, their copies are allocated by XLA's worker threads from other
    malloc arenas, so without the trim the freed kernels stay resident and the copy costs as much as keeping them.
    """
    freed = False
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            freed = freed or backend.platform_of(leaf) == "cpu"
            leaf.delete()
    trim = _malloc_trim() if freed else None
    if trim is not None:
        trim(0)


def _transposed_one_by_one(kernels, upcast: bool):
    """:func:`_transposed`, one kernel at a time, each original freed as soon as its copy exists: the peak is the
    params plus one kernel instead of the params plus every kernel."""
    def one(kernel):
        moved = jax.block_until_ready(_transposed(kernel, upcast=upcast))
        _delete(kernel)
        return moved

    return jax.tree_util.tree_map(one, kernels, is_leaf=is_quantized)


def transpose_kernels(params, upcast: bool = False, *, consume: bool = False) -> DecodeWeights:
    """``params`` with every Dense kernel moved, transposed, to the ``KERNELS_OUT_IN`` collection (the other
    arrays are shared, not copied). ``upcast``: narrow (bfloat16, float16) and int8-quantized weights become
    float32, kernels in the same pass as their transposition. ``consume``: free each original kernel (and each
    narrow leaf that was widened) once its copy exists, so the copy costs one kernel of extra memory, not all of
    them; ``params`` is unusable afterwards."""
    kept, kernels = _split_kernels(params)
    if not consume:
        return DecodeWeights(_convert_params(kept, upcast), _transposed(kernels, upcast=upcast))
    return DecodeWeights(_convert_params(kept, upcast, consume=True), _transposed_one_by_one(kernels, upcast))


def prepare_weights(params, tuning: Tuning, *, consume: bool = False, rows: int = 1) -> DecodeWeights:
    """The weights the programs compute with under ``tuning`` (uncached; see :func:`decode_weights`).
    ``consume``: free the params' arrays that were copied, as they are copied (:func:`transpose_kernels`).
    ``rows``: rows a decode step of the programs computes (kernels are transposed for one row only)."""
    upcast = not tuning.low_precision_compute
    if tuning.kernels_transposed_for(rows):
        return transpose_kernels(params, upcast, consume=consume)
    return DecodeWeights(_convert_params(params, upcast, consume=consume))


class _LastWeights:
    """The layouts of the most recent params objects (and settings): two, so that speculative decoding's target and
    assistant both stay prepared across calls (one slot re-transposed both on every call: ~0.56 s for gpt2 plus a
    gpt2-large-sized target). An entry is dropped as soon as any of its params' leaves is garbage collected."""

    CAPACITY = 2

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[tuple] = []  # (token, refs, settings, weights), most recent first

    def get(self, params, tuning: Tuning, rows: int) -> DecodeWeights:
        leaves = jax.tree_util.tree_leaves(params)
        settings = (tuning.kernels_transposed_for(rows), tuning.low_precision_compute)
        with self._lock:
            entries = self._entries  # replaced, never mutated: a weakref callback may replace it meanwhile
            for entry in entries:
                _, refs, kept_settings, weights = entry
                if (kept_settings == settings and len(leaves) == len(refs)
                        and all(ref() is leaf for ref, leaf in zip(refs, leaves))):
                    self._entries = [entry] + [other for other in entries if other is not entry]
                    return weights
        weights = prepare_weights(params, tuning, rows=rows)
        token = object()
        try:
            refs = tuple(weakref.ref(leaf, lambda _ref, token=token: self._forget(token)) for leaf in leaves)
        except TypeError:  # a leaf that cannot be weakly referenced: do not cache
            return weights
        with self._lock:
            self._entries = [(token, refs, settings, weights)] + self._entries[: self.CAPACITY - 1]
        return weights

    def _forget(self, token) -> None:
        """Weakref callback: a leaf of a cached params object died (ignored when that entry is already gone). It
        takes no lock: the garbage collector may run it inside :meth:`get`, on the thread holding the lock."""
        self._entries = [entry for entry in self._entries if entry[0] is not token]

    def clear(self) -> None:
        with self._lock:
            self._entries = []


_LAST = _LastWeights()


def decode_weights(params, platform: str | None = None, *, tuning: Tuning | None = None,
                   consume: bool = False, rows: int = 1) -> DecodeWeights:
    """What the generation programs compute with for ``params``.

    Args:
        params: the model params: float32, narrow (bfloat16, float16) or int8-quantized
            (:func:`gpt2_jax.precision.quantize_params`); a :class:`DecodeWeights` is returned as is.
        platform: decide the settings for this platform instead of the params' own (``'cpu'``, ``'gpu'``...).
        tuning: the settings (default: :func:`~gpt2_jax.backend.tuning_for` the params, or ``platform``).
        consume: the caller hands ``params`` over: every array that gets a prepared copy is freed as soon as
            that copy exists (the transposed kernels then cost one kernel of extra memory at the peak instead of
            all of them: gpt2-xl's 5.8 GB on the CPU). ``params`` must not be used afterwards; the result is
            not cached. What the CLIs do with the model they loaded.
        rows: the rows each decode step of the programs that take the weights computes (prompts x return sequences
            or x beams): kernels are transposed for one row only
            (:meth:`~gpt2_jax.backend.Tuning.kernels_transposed_for`).

    Returns:
        Under :attr:`~gpt2_jax.backend.Tuning.transposed_kernels` (the CPU) and one row (any number of rows with
        :attr:`~gpt2_jax.backend.Tuning.kernels_as_lhs`, the CPU default), :func:`transpose_kernels`;
        when :attr:`~gpt2_jax.backend.Tuning.low_precision_compute` is off (the CPU), narrow and quantized weights
        converted to float32 once. Either copy is cached for the two most recent params objects (passing the same
        object again costs nothing; a new one, e.g. after a training step, is prepared anew, and the cache lets go
        of the copy when the params are garbage collected). With nothing to do (float params on a GPU or TPU, or
        float32 params for several rows without ``kernels_as_lhs``), the params unchanged.
    """
    if isinstance(params, DecodeWeights):
        return params
    if tuning is None:
        tuning = backend.tuning_for(params, platform=platform)
    if not tuning.kernels_transposed_for(rows) and not _needs_preparing(params, not tuning.low_precision_compute):
        return DecodeWeights(params)
    if consume:
        return prepare_weights(params, tuning, consume=True, rows=rows)
    return _LAST.get(params, tuning, rows)


def clear_cache() -> None:
    """Drop the cached prepared weights (their memory is freed once no running program holds them)."""
    _LAST.clear()
