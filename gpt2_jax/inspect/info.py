"""Parameter counts per module and in total, dtypes, bytes and the config of a GPT-2.

Works on real params or on shapes only (``jax.eval_shape`` of :func:`~gpt2_jax.model.init_params`), so the size of
gpt2-xl can be read without downloading or allocating it:

    >>> info = model_info(params, config)
    >>> info.total_params          # 124_439_808 for gpt2 (the LM head is tied to wte: no extra params)
    >>> print(format_model_info(info))
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np

from ..config import GPT2Config


@dataclasses.dataclass(frozen=True)
class ModuleParams:
    """The params under one module path (e.g. ``h/3`` or ``h/3/attn/c_attn``)."""

    name: str
    params: int
    bytes: int
    dtypes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Sizes of a GPT-2's params.

    Attributes:
        total_params: number of scalars in all params (the tied LM head adds none).
        total_bytes: their size in memory.
        dtypes: parameter count per dtype name.
        modules: per-module counts at the requested depth, in the params' order.
        per_block: the counts inside one transformer block (``ln_1``, ``attn/c_attn`` ...), the same for every
            block; empty when the model has no blocks.
        config: the architecture (Hugging Face ``config.json`` fields).
    """

    total_params: int
    total_bytes: int
    dtypes: dict[str, int]
    modules: tuple[ModuleParams, ...]
    per_block: tuple[ModuleParams, ...]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return dataclasses.asdict(self)


def _leaves(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` of every array (or ``ShapeDtypeStruct``) in a nested-dict params pytree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf) for path, leaf in flat]


# Forward order of GPT-2's modules, for listing; other names sort after these, alphabetically.
_ORDER = {"wte": 0, "wpe": 1, "h": 2, "ln_f": 3, "ln_1": 0, "attn": 1, "ln_2": 2, "mlp": 3, "c_attn": 0, "c_fc": 0,
          "c_proj": 1}


def _module_key(name: str) -> tuple:
    """Sort key of a module path: forward order, block indices numerically."""
    return tuple((0, int(p), "") if p.isdigit() else (1 + _ORDER.get(p, 99), 0, p) for p in name.split("/"))


def _group(leaves, depth: int, strip: int = 0) -> tuple[ModuleParams, ...]:
    groups: dict[str, list[int | set[str]]] = {}
    for path, leaf in leaves:
        module = path[strip:-1] or path[strip:]  # drop the leaf name (kernel, bias, scale, embedding)
        name = "/".join(module[:depth])
        count = math.prod(leaf.shape)
        entry = groups.setdefault(name, [0, 0, set()])
        entry[0] += count
        entry[1] += count * np.dtype(leaf.dtype).itemsize
        entry[2].add(np.dtype(leaf.dtype).name)
    return tuple(ModuleParams(name, n, b, tuple(sorted(d)))
                 for name, (n, b, d) in sorted(groups.items(), key=lambda item: _module_key(item[0])))


def model_info(params: Any, config: GPT2Config, depth: int = 2) -> ModelInfo:
    """Count ``params`` (arrays or ``jax.ShapeDtypeStruct`` leaves) per module and in total.

    Args:
        params: a params pytree with our names (``wte``, ``h/<i>/attn/c_attn`` ...).
        config: the architecture (reported with the counts).
        depth: how many levels of the module path to group by: 1 gives ``wte``, ``wpe``, ``h``, ``ln_f``; 2 splits
            ``h`` into its blocks; 4 reaches single layers such as ``h/0/attn/c_attn``.

    Returns:
        a :class:`ModelInfo`.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    leaves = _leaves(params)
    if not leaves:
        raise ValueError("the params hold no arrays")
    dtypes: dict[str, int] = {}
    for _, leaf in leaves:
        name = np.dtype(leaf.dtype).name
        dtypes[name] = dtypes.get(name, 0) + math.prod(leaf.shape)
    total = sum(math.prod(leaf.shape) for _, leaf in leaves)
    total_bytes = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for _, leaf in leaves)
    first_block = [(p, leaf) for p, leaf in leaves if len(p) > 2 and p[0] == "h" and p[1] == "0"]
    return ModelInfo(
        total_params=total,
        total_bytes=total_bytes,
        dtypes=dtypes,
        modules=_group(leaves, depth),
        per_block=_group(first_block, 2, strip=2),
        config=config.to_hf_dict(),
    )


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(rows: tuple[ModuleParams, ...], total: int) -> list[str]:
    width = max(len("module"), *(len(r.name) for r in rows))
    lines = [f"{'module':<{width}}  {'params':>13}  {'share':>6}  {'bytes':>10}  dtype"]
    for r in rows:
        share = 100.0 * r.params / total if total else 0.0
        lines.append(f"{r.name:<{width}}  {r.params:>13,}  {share:>5.1f}%  {_human_bytes(r.bytes):>10}  "
                     f"{','.join(r.dtypes)}")
    return lines


def format_model_info(info: ModelInfo, source: str | None = None) -> str:
    """A plain-text report: totals, the per-module table, one block's breakdown and the architecture."""
    cfg = info.config
    lines = []
    if source:
        lines.append(f"model: {source}")
    dtypes = ", ".join(f"{name} ({count:,})" for name, count in info.dtypes.items())
    lines += [
        f"parameters: {info.total_params:,} ({info.total_params / 1e6:.1f}M), {_human_bytes(info.total_bytes)} "
        f"({info.total_bytes:,} bytes); dtype: {dtypes}; LM head tied to wte",
        f"architecture: n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} "
        f"n_inner={cfg['n_inner'] or 4 * cfg['n_embd']} n_positions={cfg['n_positions']} "
        f"vocab_size={cfg['vocab_size']} activation={cfg['activation_function']}",
        "",
    ]
    lines += _table(info.modules, info.total_params)
    if info.per_block:
        block_total = sum(r.params for r in info.per_block)
        lines += ["", f"one block (x{cfg['n_layer']}): {block_total:,} params"]
        lines += _table(info.per_block, info.total_params)
    lines += ["", "config:", json.dumps(cfg, indent=2, sort_keys=True)]
    return "\n".join(lines)


# CLI -----------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """``gpt2-jax info [--model ...] [--depth N] [--json]``."""
    from ._cli import add_model_arguments

    parser = subparsers.add_parser(
        "info", help="parameter counts per module and in total, dtype, bytes, config",
        description="Count a GPT-2's parameters per module and in total, with dtypes, bytes and the config. With "
                    "--random-weights nothing is loaded or allocated (shapes only), so any preset is instant.",
    )
    parser.add_argument("--depth", type=int, default=2,
                        help="module-path levels to group by (1: wte/wpe/h/ln_f, 2: each block, 4: each layer)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run ``gpt2-jax info``."""
    from ._cli import load_model

    if args.depth < 1:
        raise ValueError(f"--depth must be at least 1, got {args.depth}")
    model = load_model(args, abstract=True)
    info = model_info(model.params, model.config, args.depth)
    if args.json:
        print(json.dumps({"source": model.source, **info.to_dict()}, indent=1))
    else:
        print(format_model_info(info, model.source))
    return 0
