"""LoRA (low-rank adaptation, Hu et al. 2021) for GPT-2's dense layers, as PEFT defines it.

A targeted layer ``y = x @ W + b`` (``W [in, out]``, Hugging Face's ``Conv1D``) becomes

    y = x @ W + b + dropout(x) @ A @ B * scale,    A [in, r], B [r, out], scale = alpha / r

(``alpha / sqrt(r)`` with ``use_rslora``). ``A`` starts Kaiming-uniform (PEFT's ``nn.Linear`` init: uniform in
``+-1/sqrt(in)``), ``B`` at zero, so an untrained adapter changes nothing. The adapters are a small params tree of
their own, mirroring the base params' paths (``h/0/attn/c_attn/{lora_A, lora_B}``); the base params stay a plain,
frozen pytree. Two ways to use them:

* **training** (the dropout path): ``model.apply({"params": params, LORA_COLLECTION: lora_variables(adapters,
  cfg)}, ids, rngs={LORA_DROPOUT_RNG: key})``: each targeted :class:`~gpt2_jax.layers.Dense` adds the low-rank
  update on the fly, so gradients exist only for ``A`` and ``B`` and no ``[in, out]`` weight gradient is formed;
* **inference**: :func:`merge_lora` folds ``A @ B * scale`` into the kernels: plain params, the same programs and
  speed as the base model (what ``from_pretrained(base, adapter=DIR)`` does).

PEFT stores ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` (``nn.Linear`` layout); the file format lives in
:mod:`gpt2_jax.checkpoints.adapters`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .layers import LORA_COLLECTION, LORA_DROPOUT_RNG
from .stacking import params_are_stacked

#: PEFT's target modules for GPT-2 (every ``Conv1D``): attention's ``c_attn`` and ``c_proj``, the MLP's ``c_fc``
#: and ``c_proj``, as a regular expression searched in the layer names ``h.<i>.attn.c_attn`` ...
DEFAULT_TARGETS = r"c_attn|c_proj|c_fc"

__all__ = ["DEFAULT_TARGETS", "LORA_COLLECTION", "LORA_DROPOUT_RNG", "LoraConfig", "lora_targets", "init_lora",
           "lora_variables", "merge_lora", "count_lora_params"]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """One LoRA setup (frozen, hashable: safe as a static argument).

    Attributes:
        rank: ``r``, the inner width of ``A @ B`` (PEFT's ``r``).
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank`` (or ``alpha / sqrt(rank)``).
        dropout: ``lora_dropout``, applied to the adapter's input only (training).
        targets: regular expression searched in each dense layer's name (``h.<i>.attn.c_attn``,
            ``h.<i>.attn.c_proj``, ``h.<i>.mlp.c_fc``, ``h.<i>.mlp.c_proj``).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)`` (PEFT's ``use_rslora``).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        try:
            re.compile(self.targets)
        except (re.error, TypeError) as e:
            raise ValueError(f"LoRA targets {self.targets!r} is not a regular expression: {e}") from None

    @property
    def scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _dense_layers(params: Mapping) -> dict[str, tuple[str, ...]]:
    """Every dense layer of the blocks: dotted name (``h.0.attn.c_attn``, or ``h.attn.c_attn`` when stacked) ->
    its path in the params tree, in layer order."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(tree: Mapping, path: tuple[str, ...]):
        for key in sorted(tree, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k))):
            value = tree[key]
            if isinstance(value, Mapping):
                if "kernel" in value and not isinstance(value["kernel"], Mapping):
                    found[".".join(path + (str(key),))] = path + (str(key),)
                else:
                    walk(value, path + (str(key),))

    walk(params.get("h", {}), ("h",))
    return found


def lora_targets(params: Mapping, targets: str = DEFAULT_TARGETS) -> dict[str, tuple[str, ...]]:
    """The dense layers of ``params`` whose name matches ``targets`` (``re.search``): name -> params path.

    Raises:
        ValueError: nothing matches (the message lists the layer names).
    """
    layers = _dense_layers(params)
    pattern = re.compile(targets)
    chosen = {name: path for name, path in layers.items() if pattern.search(name)}
    if not chosen:
        examples = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
        raise ValueError(f"LoRA targets {targets!r} match no dense layer; the layers are named like {examples}")
    return chosen


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_lora(key: jax.Array, params: Mapping, config: LoraConfig, dtype: Any = jnp.float32) -> dict:
    """Fresh adapters for every targeted layer of ``params``: ``A`` uniform in ``+-1/sqrt(in)``, ``B`` zero.

    Returns:
        a nested dict mirroring the params' paths: ``h/<i>/attn/c_attn/{lora_A [in, r], lora_B [r, out]}``
        (with a leading ``[n_layer]`` axis when ``params`` are stacked for ``scan_layers``).
    """
    adapters: dict = {}
    for i, (name, path) in enumerate(lora_targets(params, config.targets).items()):
        kernel_shape = tuple(np.shape(_get(params, path)["kernel"]))  # [(L,) in, out]
        *lead, fan_in, fan_out = kernel_shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, fan_in, config.rank), dtype, -bound, bound)
        b = jnp.zeros((*lead, config.rank, fan_out), dtype)
        _set(adapters, path, {"lora_A": a, "lora_B": b})
    return adapters


def lora_variables(adapters: Mapping, config: LoraConfig) -> dict:
    """The ``LORA_COLLECTION`` variables a model applies: every adapter with its ``scale`` and ``dropout`` (as
    constants; one per layer when stacked). Build it inside the differentiated function from the trainable
    ``adapters`` so gradients reach ``A`` and ``B`` only."""

    def annotate(tree):
        if "lora_A" in tree:
            lead = np.shape(tree["lora_A"])[:-2]
            return {**tree, "scale": jnp.full(lead, config.scale, jnp.float32),
                    "dropout": jnp.full(lead, config.dropout, jnp.float32)}
        return {k: annotate(v) for k, v in tree.items()}

    return annotate(dict(adapters))


def merge_lora(params: Mapping, adapters: Mapping, config: LoraConfig) -> dict:
    """``params`` with every adapter folded in: ``kernel + A @ B * scale`` (computed in float32, stored in the
    kernel's dtype). The result is plain params: any program of the base model runs it unchanged.

    Raises:
        ValueError: an adapter has no matching kernel, or their shapes disagree.
    """
    merged = jax.tree_util.tree_map(lambda x: x, dict(params))  # a fresh container tree; leaves shared

    def visit(tree: Mapping, path: tuple[str, ...]):
        if "lora_A" in tree:
            try:
                layer = _get(merged, path)
            except (KeyError, TypeError):
                raise ValueError(f"the adapter for {'/'.join(path)} has no matching layer in the params") from None
            kernel = layer["kernel"]
            a, b = jnp.asarray(tree["lora_A"], jnp.float32), jnp.asarray(tree["lora_B"], jnp.float32)
            delta_shape = (*a.shape[:-1], b.shape[-1])  # [(L,) in, out]
            if tuple(np.shape(kernel)) != delta_shape or a.shape[-1] != b.shape[-2]:
                raise ValueError(f"the adapter for {'/'.join(path)} (lora_A {list(a.shape)}, lora_B {list(b.shape)}) "
                                 f"does not fit its kernel of shape {list(np.shape(kernel))}")
            delta = jnp.matmul(a, b) * config.scale  # [(L,) in, out]
            layer["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
            return
        for key, value in tree.items():
            visit(value, path + (str(key),))

    if params_are_stacked(params) != params_are_stacked(adapters) and adapters.get("h"):
        raise ValueError("params and adapters disagree on stacking (scan_layers): stack or unstack both "
                         "(gpt2_jax.stack_layers / unstack_layers)")
    visit(adapters, ())
    return merged


def count_lora_params(adapters: Mapping) -> int:
    """Number of trainable adapter parameters."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(adapters))
