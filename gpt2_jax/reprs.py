"""Short ``repr`` for configs, states and loaded models: what differs from the defaults, and pytrees summarised.

``print(config)`` should fit on a line and ``print(model)`` must not dump 124M numbers; these helpers give the
dataclasses of the package one style: ``GPT2Config(n_layer=2, n_embd=64, n_head=4)`` (only the fields that differ
from their defaults) and ``<124,439,808 params in 148 float32 arrays>`` for a parameter tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["short_dataclass_repr", "tree_summary"]


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # arrays, objects without a boolean equality
        return False


def short_dataclass_repr(obj: Any, **shown: str) -> str:
    """``ClassName(field=value, ...)`` with only the fields whose value differs from the field's default.

    Args:
        obj: a dataclass instance.
        shown: field name -> text to show instead of the value's ``repr`` (always shown, e.g. a summarised tree).
    """
    parts = []
    for field in dataclasses.fields(obj):
        if not field.repr:
            continue
        if field.name in shown:
            parts.append(f"{field.name}={shown[field.name]}")
            continue
        value = getattr(obj, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if default is not dataclasses.MISSING and _same(value, default):
            continue
        parts.append(f"{field.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def tree_summary(tree: Any, what: str = "params") -> str:
    """``<N params in K float32 arrays>`` for a pytree of arrays (or ``jax.ShapeDtypeStruct``s, or tracers)."""
    import jax
    import numpy as np

    leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
    count = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    dtypes = sorted({str(np.dtype(leaf.dtype)) for leaf in leaves})
    return f"<{count:,} {what} in {len(leaves)} {'/'.join(dtypes)} arrays>".replace("  ", " ")
