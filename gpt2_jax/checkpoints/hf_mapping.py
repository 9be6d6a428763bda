"""The table between Hugging Face GPT-2 state-dict names and our params pytree, checked both ways.

``transformer.h.3.attn.c_attn.weight`` <-> ``h/3/attn/c_attn/kernel`` and so on. Conv1D weights are already
``[in, out]`` and are not transposed; the ``nn.Linear`` heads (``multiple_choice_head.summary``, ``score``) are
``[out, in]`` and are. Only the causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are dropped silently;
``lm_head.weight`` is accepted when it equals ``wte`` (GPT-2 ties them) and refused otherwise.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from ..model import GPT2DoubleHeadsModel, GPT2ForSequenceClassification, GPT2LMHeadModel
from ..stacking import params_for, unstack_layers
from .safetensors_io import CheckpointError

Path = tuple[str, ...]

_LEAF_NAMES = {"weight": None, "bias": "bias"}  # weight -> kernel / scale / embedding, by module kind
_HEAD_PREFIXES = ("multiple_choice_head.", "score.", "lm_head.")
_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
_LINEAR_HEADS = ("multiple_choice_head", "score")  # nn.Linear in PyTorch: weight is [out, in]


def _param_path(hf_name: str) -> Path:
    """``h.0.attn.c_attn.weight`` -> ``('h', '0', 'attn', 'c_attn', 'kernel')`` (no ``transformer.`` prefix)."""
    *module, leaf = hf_name.split(".")
    if leaf not in _LEAF_NAMES:
        raise KeyError(hf_name)
    if leaf == "bias":
        return (*module, "bias")
    last = module[-1] if module else ""
    if last in ("wte", "wpe"):
        return (*module, "embedding")
    if last.startswith("ln_"):
        return (*module, "scale")
    return (*module, "kernel")


def _hf_name(path: Path) -> str:
    """Inverse of :func:`_param_path`, with the ``transformer.`` prefix on body params."""
    *module, leaf = path
    name = ".".join(module) + (".bias" if leaf == "bias" else ".weight")
    return name if module[0] in _LINEAR_HEADS else "transformer." + name


def model_class_for(params_or_names) -> type[nn.Module]:
    """The head class whose params these are (by the presence of ``multiple_choice_head`` / ``score``)."""
    keys = set(params_or_names)
    if "multiple_choice_head" in keys or any(str(k).startswith("multiple_choice_head.") for k in keys):
        return GPT2DoubleHeadsModel
    if "score" in keys or any(str(k).startswith("score.") for k in keys):
        return GPT2ForSequenceClassification
    return GPT2LMHeadModel


def expected_shapes(config: GPT2Config, model_cls: type[nn.Module] = GPT2LMHeadModel) -> dict[Path, tuple]:
    """Every param path of ``model_cls`` for ``config`` with its shape (computed abstractly: no memory).

    Always the per-layer paths (``h/<i>/...``), whatever ``config.scan_layers``: checkpoints are per layer.
    """
    model = model_cls(config.replace(scan_layers=False))
    ids = jnp.zeros((1, 1, 1) if model_cls is GPT2DoubleHeadsModel else (1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in key_path): tuple(leaf.shape) for key_path, leaf in flat}


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    config: GPT2Config,
    convert: Callable[[np.ndarray], object] = np.asarray,
    model_cls: type[nn.Module] | None = None,
) -> dict:
    """Map a Hugging Face GPT-2 state dict onto our params pytree.

    Args:
        state_dict: name -> array, with or without the ``transformer.`` prefix, with or without
            ``lm_head.weight``; from ``GPT2Model``, ``GPT2LMHeadModel``, ``GPT2DoubleHeadsModel`` or
            ``GPT2ForSequenceClassification``.
        config: the architecture the params must fit (with ``scan_layers`` the result is stacked,
            :func:`gpt2_jax.stacking.stack_layers`).
        convert: applied to each (transposed where needed) array, e.g. to cast or to move to a device.
        model_cls: the head to load; by default deduced from the names.

    Returns:
        The nested params dict.

    Raises:
        CheckpointError: one error listing every unknown, missing, duplicated or wrongly-shaped key, naming the
            key and both shapes.
    """
    model_cls = model_cls or model_class_for(state_dict)
    expected = expected_shapes(config, model_cls)
    params: dict = {}
    seen: dict[Path, str] = {}
    problems: list[str] = []
    lm_head = None
    for name, value in state_dict.items():
        bare = name[len("transformer."):] if name.startswith("transformer.") else name
        if _BUFFER.search(bare):
            continue
        if bare == "lm_head.weight":
            lm_head = (name, value)
            continue
        try:
            path = _param_path(bare)
        except KeyError:
            path = None
        if path is None or path not in expected:
            problems.append(f"unknown key {name!r} with shape {list(np.shape(value))}")
            continue
        if path in seen:
            problems.append(f"key set twice: {seen[path]!r} and {name!r} both map to {'/'.join(path)}")
            continue
        seen[path] = name
        array = value.T if path[0] in _LINEAR_HEADS and path[-1] == "kernel" else value
        if tuple(np.shape(array)) != expected[path]:
            hf_shape = list(np.shape(value))
            want = list(expected[path][::-1]) if array is not value else list(expected[path])
            problems.append(f"wrong shape for {name!r}: checkpoint has {hf_shape}, the config expects {want}")
            continue
        _set(params, path, convert(array))
    for path in expected:
        if path not in seen:
            problems.append(f"missing key {_hf_name(path)!r} (expected shape {list(expected[path])})")
    if lm_head is not None and not problems:
        name, value = lm_head
        wte = state_dict[seen[("wte", "embedding")]]
        if np.shape(value) != np.shape(wte) or not np.array_equal(np.asarray(value), np.asarray(wte)):
            problems.append(f"{name!r} differs from the token embedding; GPT-2's LM head must be tied to wte")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        noun = "problem" if len(problems) == 1 else "problems"
        raise CheckpointError(f"checkpoint does not match the GPT-2 config ({len(problems)} {noun}):\n  {shown}")
    return params_for(config, params)


def params_to_state_dict(params: Mapping, convert: Callable[[object], np.ndarray] = np.asarray) -> dict[str, np.ndarray]:
    """Our params -> a Hugging Face state dict (``transformer.``-prefixed; heads as ``nn.Linear`` weights).

    ``lm_head.weight`` is not written: Hugging Face ties it to ``transformer.wte.weight`` on load. Stacked
    (``scan_layers``) params are written per layer, as every checkpoint is.
    """
    params = unstack_layers(params)
    state: dict[str, np.ndarray] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in key_path)
        array = convert(leaf)
        if path[0] in _LINEAR_HEADS and path[-1] == "kernel":
            array = array.T
        state[_hf_name(path)] = array
    return state
