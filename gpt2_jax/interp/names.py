"""Hook point names (TransformerLens's), their validation, and selecting names from a list, regex or predicate."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, Union

from ..config import GPT2Config

#: Hook points of one block, relative to ``blocks.{l}``, in the order they are computed, with their shapes.
BLOCK_HOOKS: tuple[tuple[str, str], ...] = (
    ("hook_resid_pre", "[batch, pos, d_model]"),
    ("ln1.hook_scale", "[batch, pos, 1]"),
    ("ln1.hook_normalized", "[batch, pos, d_model]"),
    ("attn.hook_q", "[batch, pos, head, d_head]"),
    ("attn.hook_k", "[batch, pos, head, d_head]"),
    ("attn.hook_v", "[batch, pos, head, d_head]"),
    ("attn.hook_attn_scores", "[batch, head, query, key] (scaled, masked; float32)"),
    ("attn.hook_pattern", "[batch, head, query, key]"),
    ("attn.hook_z", "[batch, pos, head, d_head]"),
    ("attn.hook_result", "[batch, pos, head, d_model] (per-head output without the bias; computed only when asked)"),
    ("hook_attn_out", "[batch, pos, d_model]"),
    ("hook_resid_mid", "[batch, pos, d_model]"),
    ("ln2.hook_scale", "[batch, pos, 1]"),
    ("ln2.hook_normalized", "[batch, pos, d_model]"),
    ("mlp.hook_pre", "[batch, pos, d_mlp]"),
    ("mlp.hook_post", "[batch, pos, d_mlp]"),
    ("hook_mlp_out", "[batch, pos, d_model]"),
    ("hook_resid_post", "[batch, pos, d_model]"),
)
#: Hook points outside the blocks: before them (``hook_embed``, ``hook_pos_embed``) and the final layer norm.
EMBED_HOOKS = ("hook_embed", "hook_pos_embed")
FINAL_HOOKS = ("ln_final.hook_scale", "ln_final.hook_normalized")
#: Hook points that cost extra computation and are left out of "every hook" selections unless named.
ON_REQUEST = ("attn.hook_result",)

_BLOCK_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")

#: What ``names=`` accepts: None (every hook point but the on-request ones), one name, a list of names, a compiled
#: regex (``re.search`` on each name) or a predicate on names.
NameSelector = Union[None, str, Iterable[str], "re.Pattern[str]", Callable[[str], bool]]


def hook_names(config: GPT2Config, *, include_on_request: bool = True) -> list[str]:
    """Every hook point of a model with ``config``, in the order they are computed.

    ``include_on_request=False`` leaves out ``blocks.{l}.attn.hook_result`` (computed only when asked for).
    """
    if config.scan_layers:
        raise ValueError("hooks need the unrolled blocks (scan_layers=False); see gpt2_jax.with_scan_layers")
    names = [n for n in EMBED_HOOKS if n != "hook_pos_embed" or _learned_positions(config)]
    for layer in range(config.n_layer):
        names += [f"blocks.{layer}.{rel}" for rel, _ in BLOCK_HOOKS if include_on_request or rel not in ON_REQUEST]
    return names + list(FINAL_HOOKS)


def _learned_positions(config: GPT2Config) -> bool:
    from ..layers import get_variant

    return get_variant(config.variant).learned_positions


def check_name(name: str, config: GPT2Config) -> str:
    """``name`` if it is a hook point of ``config``'s model; else a ValueError naming a layer out of range or
    listing the closest valid names."""
    if not isinstance(name, str):
        raise TypeError(f"a hook name must be a string, got {name!r}")
    valid = hook_names(config)
    if name in valid:
        return name
    match = _BLOCK_NAME.fullmatch(name)
    if match and match.group(2) in dict(BLOCK_HOOKS):
        layer = int(match.group(1))
        raise ValueError(f"hook {name!r}: layer {layer} is out of range for a {config.n_layer}-layer model "
                         f"(layers 0..{config.n_layer - 1})")
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see gpt2_jax.interp.hook_names(config)"
    raise ValueError(f"unknown hook name {name!r}{hint}")


def select_names(selector: NameSelector, config: GPT2Config) -> tuple[str, ...]:
    """The hook points ``selector`` picks, in computation order (see :data:`NameSelector`)."""
    if selector is None:
        return tuple(hook_names(config, include_on_request=False))
    if isinstance(selector, str):
        return (check_name(selector, config),)
    if isinstance(selector, re.Pattern):
        return tuple(n for n in hook_names(config, include_on_request=False) if selector.search(n))
    if callable(selector):
        return tuple(n for n in hook_names(config, include_on_request=False) if selector(n))
    wanted = {check_name(n, config) for n in selector}
    return tuple(n for n in hook_names(config) if n in wanted)


def layer_of(name: str) -> int | None:
    """The block index in a hook name (``blocks.3.attn.hook_z`` -> 3), None outside the blocks."""
    match = _BLOCK_NAME.fullmatch(name)
    return int(match.group(1)) if match else None
