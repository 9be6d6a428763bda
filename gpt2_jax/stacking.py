"""Exact converters between per-layer params (``h/<i>/...``, Hugging Face's names) and stacked params
(``h/... [n_layer, ...]``, what a ``scan_layers`` model computes with).

Checkpoints, Hugging Face export and the converters always see the per-layer tree; a ``scan_layers`` model gets
its params through :func:`stack_layers` (``state_dict_to_params`` does it when the config asks for scan) and
gives them back through :func:`unstack_layers` (``params_to_state_dict`` does it for any stacked tree). Both are
exact: stacking copies values, it never changes them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .config import GPT2Config


def params_are_stacked(params: Mapping) -> bool:
    """True when ``params['h']`` holds stacked ``[n_layer, ...]`` arrays rather than one subtree per layer."""
    blocks = params.get("h") if isinstance(params, Mapping) else None
    if not isinstance(blocks, Mapping) or not blocks:
        return False
    return not all(str(name).isdigit() for name in blocks)


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack_layers(params: Mapping) -> dict:
    """Per-layer params -> stacked: ``h/<i>/path`` for ``i = 0 .. n_layer-1`` become ``h/path [n_layer, ...]``.

    A stacked tree is returned unchanged. Raises ValueError when the layers are not numbered ``0 .. n-1`` or do not
    all hold the same paths and shapes.
    """
    if params_are_stacked(params):
        return dict(params)
    blocks = params["h"]
    names = sorted(blocks, key=int)
    if [int(n) for n in names] != list(range(len(names))):
        raise ValueError(f"params h/ holds layers {names}, expected 0 .. {len(names) - 1}")
    layers = [blocks[n] for n in names]
    first = jax.tree_util.tree_structure(layers[0])
    for name, layer in zip(names, layers):
        if jax.tree_util.tree_structure(layer) != first:
            raise ValueError(f"layer h/{name} holds other params than h/{names[0]}; cannot stack them")
        for a, b in zip(jax.tree_util.tree_leaves(layer), jax.tree_util.tree_leaves(layers[0])):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"layer h/{name} has a param of shape {list(np.shape(a))} where h/{names[0]} has "
                                 f"{list(np.shape(b))}; cannot stack them")
    stacked = jax.tree_util.tree_map(lambda *xs: _stack(xs), *layers)  # each leaf [n_layer, ...]
    return {**params, "h": stacked}


def unstack_layers(params: Mapping) -> dict:
    """Stacked params -> per-layer (``h/path [n_layer, ...]`` -> ``h/<i>/path``); a per-layer tree is unchanged."""
    if not params_are_stacked(params):
        return dict(params)
    leaves = jax.tree_util.tree_leaves(params["h"])
    n_layer = int(np.shape(leaves[0])[0])
    layers = {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], params["h"]) for i in range(n_layer)}
    return {**params, "h": layers}


def params_for(config: GPT2Config, params: Mapping) -> dict:
    """``params`` in the layout ``config`` computes with: stacked when ``config.scan_layers``, else per layer."""
    return stack_layers(params) if config.scan_layers else unstack_layers(params)


def with_scan_layers(config: GPT2Config, params: Mapping, scan_layers: bool = True) -> tuple[GPT2Config, Any]:
    """``(config, params)`` switched to (or from) scanned layers, e.g. after ``from_pretrained``::

        config, params = with_scan_layers(model.config, model.params)
    """
    config = config.replace(scan_layers=scan_layers)
    return config, params_for(config, params)
