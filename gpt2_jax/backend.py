"""The one switchboard for backend-specific tuning.

Some formulations only pay on one backend: XLA's CPU compiler reads a transposed ``[out, in]`` kernel faster in a
matrix-vector product, copies a loop-carried one-row cache unless it is viewed as ``[n_head, S, head_dim]``,
recomputes the backward residual chain quadratically unless each block's gradient is cut, and so on. Each such
choice is a named field of :class:`Tuning`; its default is decided from the *platform of the devices the params
live on* (:func:`tuning_for`), and GPUs and TPUs get the plain formulation. The public shapes (the 4-D
:class:`~gpt2_jax.kv_cache.KVCache`, the params' ``[in, out]`` kernels) never depend on it.

Override in one place, for the whole process or a block of code::

    from gpt2_jax import backend
    backend.set_overrides(transposed_kernels=False)        # process-wide
    with backend.overrides(attention="xla"):               # scoped
        ...

or from the environment: ``GPT2_JAX_TUNING="transposed_kernels=0,attention=xla"``. A :class:`Tuning` is frozen
and hashable, so it is part of every compiled program's identity: changing a setting compiles anew and never
silently reuses a program built under another setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Iterator

import jax

from gpt2_jax import cpu_features

#: Environment variable with comma-separated ``name=value`` overrides of :class:`Tuning` fields.
TUNING_ENV = "GPT2_JAX_TUNING"
#: Older switch for :attr:`Tuning.transposed_kernels` alone (``0`` turns the copy off); still honoured.
TRANSPOSED_KERNELS_ENV = "GPT2_JAX_TRANSPOSED_KERNELS"

#: Attention implementations: ``explicit`` materialises ``[batch, head, query, key]`` probabilities (always used
#: when they are requested); ``xla`` / ``cudnn`` go through :func:`jax.nn.dot_product_attention` (``cudnn`` is
#: flash attention on NVIDIA GPUs).
ATTENTION_IMPLS = ("explicit", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Backend-specific formulation choices. Values never change results beyond float round-off.

    Attributes:
        transposed_kernels: generation whose decode steps compute one row (batch 1, no beams, one sequence)
            computes with every Dense kernel transposed to ``[out, in]`` (a copy made once per params object):
            XLA CPU's matrix-vector product reads that layout fastest, while its matmuls of 2 or more rows read
            the params' ``[in, out]`` layout faster (gpt2, batch 8: 44 vs 54 ms a step); see
            :meth:`kernels_transposed_for`.
        single_row_cache_view: compiled generation loops carry a one-row cache as ``[n_head, S, head_dim]``; XLA
            CPU then updates the carried buffers in place instead of copying the whole cache every step.
        cumsum_by_matmul: top-p's exclusive cumulative sum as blocked triangular matmuls at HIGHEST precision
            (``jnp.cumsum`` lowers to strided slices on CPU that turn the feeding top-k into a full sort).
        top_k_tiers: top-k / top-p thresholds from the 256, then 4096 largest logits when provably exact, behind
            data-dependent ``lax.cond``s; off, one full sort (no data-dependent branch in the decode loop).
        beam_reorder_by_matmul: beam search moves its generated cache slots with a one-hot matmul at HIGHEST
            precision (XLA CPU fused a gather into a whole-cache copy); off, a gather.
        cut_block_gradients: training materialises each block's residual gradient once (XLA CPU's fusion
            recomputed the backward residual chain quadratically).
        attention: one of :data:`ATTENTION_IMPLS`, used when attention probabilities are not requested.
        low_precision_compute: bfloat16 (or other narrow) weights are computed in that dtype; off, they are stored
            narrow but computed in float32 (XLA CPU's bfloat16 matrix-vector products crawl at ~1 GB/s).
        row_major_bf16_dots: the Dense and LM-head matmuls of a bfloat16 computation go through
            :func:`gpt2_jax.narrow_dots.matmul`: float32 results, and a backward pass whose products read
            row-major ``[M, K] x [K, N]`` operands, the only bfloat16 dots XLA CPU runs natively (2x its float32
            rate with AVX512-BF16); off, plain bfloat16 dots, which XLA CPU converts to float32. On by default on
            CPUs with native bfloat16 dot products only (:func:`gpt2_jax.cpu_features.has_native_bf16_dots`):
            elsewhere its copies are pure cost.
        kernels_as_lhs: a Dense layer whose kernel is laid out ``[out, in]`` (:attr:`transposed_kernels`)
            computes ``(W @ x^T)^T`` (:mod:`gpt2_jax.weights_first`): the weights are the GEMM's left operand,
            which XLA CPU's dot library reads in place instead of repacking it every call (gpt2's MLP chain at
            8 rows: 10.5 vs 21.9 ms with ``x @ W^T``, 14.1 ms with the params' ``[in, out]``); with it,
            :attr:`transposed_kernels` pays for any number of rows, not one only.
        causal_attention_halves: explicit attention over the plain causal mask (no padding, no cache, no
            probabilities asked for) computes the first half of the queries against the first half of the keys
            only, skipping the all-masked quarter of the scores, softmax and ``P @ V`` (:func:`gpt2_jax.layers.
            causal_halves_attention`; gpt2's 12 attentions at 4 x 256, forward and backward: 232 -> 170 ms in
            bfloat16, 355 -> 290 ms in float32 on a 2-core CPU).
    """

    transposed_kernels: bool = False
    single_row_cache_view: bool = False
    cumsum_by_matmul: bool = False
    top_k_tiers: bool = False
    beam_reorder_by_matmul: bool = False
    cut_block_gradients: bool = False
    attention: str = "xla"
    low_precision_compute: bool = True
    row_major_bf16_dots: bool = False
    kernels_as_lhs: bool = False
    causal_attention_halves: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"Tuning.attention must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r}")
        for field in dataclasses.fields(self):
            if field.type == "bool" and not isinstance(getattr(self, field.name), bool):
                raise ValueError(f"Tuning.{field.name} must be a bool, got {getattr(self, field.name)!r}")

    def replace(self, **changes: Any) -> "Tuning":
        """A copy with some settings changed (validated)."""
        return dataclasses.replace(self, **changes)

    def kernels_transposed_for(self, rows: int) -> bool:
        """Whether the weights of a program whose decode steps compute ``rows`` rows (prompts x return sequences
        or x beams) get transposed kernels: under :attr:`transposed_kernels`, for one row, or for any number of
        rows with :attr:`kernels_as_lhs` (which makes the ``[out, in]`` layout the faster one at every row count).
        Speculative decoding passes the rows of its plain steps, not of its verification passes."""
        return self.transposed_kernels and (rows == 1 or self.kernels_as_lhs)


#: The defaults per platform. GPUs and TPUs get the plain formulation.
PLATFORM_DEFAULTS: dict[str, Tuning] = {
    "cpu": Tuning(
        transposed_kernels=True,
        single_row_cache_view=True,
        cumsum_by_matmul=True,
        top_k_tiers=True,
        beam_reorder_by_matmul=True,
        cut_block_gradients=True,
        attention="explicit",
        low_precision_compute=False,
        row_major_bf16_dots=cpu_features.has_native_bf16_dots(),
        kernels_as_lhs=True,
        causal_attention_halves=True,
    ),
    "gpu": Tuning(attention="cudnn"),
    "tpu": Tuning(attention="xla"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(Tuning)}
_lock = threading.Lock()
_process_overrides: dict[str, Any] = {}
_scoped = threading.local()


def _parse_value(name: str, text: str) -> Any:
    if _FIELDS[name].type == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "on", "yes"):
            return True
        if lowered in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"{TUNING_ENV}: {name} must be 0 or 1, got {text!r}")
    if name == "attention" and text.strip() not in ATTENTION_IMPLS:
        raise ValueError(f"{TUNING_ENV}: attention must be one of {', '.join(ATTENTION_IMPLS)}, got {text.strip()!r}")
    return text.strip()


def _env_overrides() -> dict[str, Any]:
    """Overrides from ``$GPT2_JAX_TUNING`` (and the older ``$GPT2_JAX_TRANSPOSED_KERNELS``)."""
    found: dict[str, Any] = {}
    legacy = os.environ.get(TRANSPOSED_KERNELS_ENV)
    if legacy is not None and legacy.strip():
        setting = legacy.strip().lower()
        if setting not in ("0", "1", "false", "true"):
            raise ValueError(f"{TRANSPOSED_KERNELS_ENV} must be 0 or 1, got {setting!r}")
        found["transposed_kernels"] = setting in ("1", "true")
    text = os.environ.get(TUNING_ENV, "")
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in _FIELDS:
            raise ValueError(
                f"{TUNING_ENV} entry {item!r} is not name=value with a name among {', '.join(_FIELDS)}"
            )
        found[name] = _parse_value(name, value)
    return found


def _check_overrides(changes: dict[str, Any]) -> None:
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown tuning setting(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")


def set_overrides(**changes: Any) -> None:
    """Override settings for the whole process (``None`` as a value drops that override)."""
    _check_overrides(changes)
    with _lock:
        for name, value in changes.items():
            if value is None:
                _process_overrides.pop(name, None)
            else:
                _process_overrides[name] = value
    Tuning().replace(**{k: v for k, v in changes.items() if v is not None})  # validate the values now


def clear_overrides() -> None:
    """Drop every process-wide override (environment and scoped overrides still apply)."""
    with _lock:
        _process_overrides.clear()


@contextlib.contextmanager
def overrides(**changes: Any) -> Iterator[None]:
    """Override settings inside a ``with`` block (this thread only); innermost wins."""
    _check_overrides(changes)
    Tuning().replace(**changes)  # validate
    stack = getattr(_scoped, "stack", None)
    if stack is None:
        stack = _scoped.stack = []
    stack.append(changes)
    try:
        yield
    finally:
        stack.pop()


def platform_of(tree: Any = None) -> str:
    """The platform (``'cpu'``, ``'gpu'``, ``'tpu'``) of the devices the first array of ``tree`` lives on.

    Tracers, non-JAX leaves and empty trees fall back to JAX's default backend. CUDA and ROCm count as ``'gpu'``.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            try:
                platform = next(iter(leaf.devices())).platform
            except Exception:  # deleted or otherwise unreadable array
                break
            return "gpu" if platform in ("cuda", "rocm", "gpu") else platform
        break
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def tuning_for(params: Any = None, *, platform: str | None = None) -> Tuning:
    """The settings for computing with ``params`` (or on ``platform``): the platform's defaults, then the
    environment's overrides, the process-wide ones (:func:`set_overrides`) and the scoped ones
    (:func:`overrides`), later ones winning."""
    platform = platform or platform_of(params)
    changes = dict(_env_overrides())
    with _lock:
        changes.update(_process_overrides)
    for scoped in getattr(_scoped, "stack", ()):
        changes.update(scoped)
    return PLATFORM_DEFAULTS.get(platform, Tuning()).replace(**changes)
