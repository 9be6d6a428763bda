"""The weights generation computes with: on the CPU, every Dense kernel also transposed to ``[out, in]``.

A decode step at small batch is a chain of matrix-vector products, bound by reading the weights from memory.
XLA's CPU matrix-vector product reads a kernel laid out ``[out, in]`` (each output a contiguous row) faster than
the ``[in, out]`` layout of the params (Hugging Face's ``Conv1D``): gpt2 decodes 6-15% faster and prefills ~10%
faster on 2 cores (``benchmarks/bench_generate.py``). So on the CPU the engine gives the model each kernel
transposed in the :data:`~gpt2_jax.layers.KERNELS_OUT_IN` collection (the tied LM head already reads ``wte`` as
``[vocab, n_embd]``); GPUs and TPUs get the params unchanged.

The transposed kernels are a copy (gpt2: 0.34 GB in float32), made once per params object and reused while that
object is alive (:func:`decode_weights`). ``GPT2_JAX_TRANSPOSED_KERNELS=0`` turns the copy off.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import jax
from flax import struct

from ..layers import KERNELS_OUT_IN

#: Environment variable: ``0`` keeps generation on the params' own kernels on the CPU too (no copy).
TRANSPOSED_KERNELS_ENV = "GPT2_JAX_TRANSPOSED_KERNELS"


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
    on the CPU, unless ``$GPT2_JAX_TRANSPOSED_KERNELS`` is ``0``."""
    if (platform or jax.default_backend()) != "cpu":
        return False
    setting = os.environ.get(TRANSPOSED_KERNELS_ENV, "1").strip().lower()
    if setting not in ("0", "1", "false", "true", ""):
        raise ValueError(f"{TRANSPOSED_KERNELS_ENV} must be 0 or 1, got {setting!r}")
    return setting not in ("0", "false")


@jax.jit
def _transposed(kernels):
    """Every ``[in, out]`` array of the tree transposed to ``[out, in]``, materialised row-major by XLA."""
    return jax.tree_util.tree_map(lambda kernel: kernel.T, kernels)


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


def transpose_kernels(params) -> DecodeWeights:
    """``params`` with every Dense kernel moved, transposed, to the ``KERNELS_OUT_IN`` collection (the other
    arrays are shared, not copied)."""
    kept, kernels = _split_kernels(params)
    return DecodeWeights(kept, _transposed(kernels))


class _LastWeights:
    """The layout of the most recent params object, dropped as soon as any of its leaves is garbage collected."""

    def __init__(self):
        self._lock = threading.Lock()
        self._token = None
        self._refs: tuple = ()
        self._weights: DecodeWeights | None = None

    def get(self, params) -> DecodeWeights:
        leaves = jax.tree_util.tree_leaves(params)
        with self._lock:
            if (self._weights is not None and len(leaves) == len(self._refs)
                    and all(ref() is leaf for ref, leaf in zip(self._refs, leaves))):
                return self._weights
        weights = transpose_kernels(params)
        token = object()
        try:
            refs = tuple(weakref.ref(leaf, lambda _ref, token=token: self._forget(token)) for leaf in leaves)
        except TypeError:  # a leaf that cannot be weakly referenced: do not cache
            return weights
        with self._lock:
            self._token, self._refs, self._weights = token, refs, weights
        return weights

    def _forget(self, token) -> None:
        """Weakref callback: a leaf of the cached params died (ignored when a newer entry replaced it)."""
        if token is self._token:
            self._weights, self._refs = None, ()

    def clear(self) -> None:
        with self._lock:
            self._token, self._weights, self._refs = None, None, ()


_LAST = _LastWeights()


def decode_weights(params, platform: str | None = None) -> DecodeWeights:
    """What the generation programs compute with for ``params``.

    On the CPU, :func:`transpose_kernels`, cached for the most recent params object (passing the same object
    again costs nothing; a new one, e.g. after a training step, is transposed anew, and the cache lets go of the
    copy when the params are garbage collected). Elsewhere, or with ``GPT2_JAX_TRANSPOSED_KERNELS=0``, the params
    unchanged. A :class:`DecodeWeights` is returned as is.
    """
    if isinstance(params, DecodeWeights):
        return params
    if not use_transposed_kernels(platform):
        return DecodeWeights(params)
    return _LAST.get(params)


def clear_cache() -> None:
    """Drop the cached transposed kernels (their memory is freed once no running program holds them)."""
    _LAST.clear()
