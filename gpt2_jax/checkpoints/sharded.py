"""Sharded Hugging Face checkpoints: ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``).

The index is the JSON transformers' ``save_pretrained(max_shard_size=...)`` writes::

    {"metadata": {"total_size": 497759232},
     "weight_map": {"transformer.h.0.attn.c_attn.weight": "model-00001-of-00002.safetensors", ...}}

Every shard named in ``weight_map`` must exist beside the index, every tensor it lists must be in its shard, and
every tensor of a shard must be listed; anything else is a corrupt or incomplete download and raises
:class:`CheckpointError` naming the shard or tensor. Safetensors shards are memory-mapped, like single files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .safetensors_io import CheckpointError, read_safetensors


def read_index(index_path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded-checkpoint index, validated."""
    index_path = Path(index_path)
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {index_path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path} is not valid JSON (truncated or corrupt index): {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' object naming the shard of each tensor")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in Path(shard).parts:
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to an invalid shard file name {shard!r}")
    return dict(weight_map)


def shard_files(index_path: str | os.PathLike) -> list[str]:
    """The distinct shard file names an index refers to, in first-use order."""
    return list(dict.fromkeys(read_index(index_path).values()))


def read_sharded(
    index_path: str | os.PathLike,
    read_shard: Callable[[Path], Mapping[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Every tensor of a sharded checkpoint, by name (views into the memory-mapped shards for safetensors).

    Args:
        index_path: the ``*.index.json`` file; shards are looked up in its directory.
        read_shard: reads one shard file into ``{name: array}``; by default the memory-mapped safetensors reader.

    Raises:
        CheckpointError: missing shards (all listed), a listed tensor absent from its shard, a shard tensor the
            index does not list, or a shard the reader rejects (truncated/corrupt).
    """
    index_path = Path(index_path)
    weight_map = read_index(index_path)
    if read_shard is None:
        read_shard = lambda path: read_safetensors(path)[0]  # noqa: E731
    directory = index_path.parent
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = [shard for shard in by_shard if not (directory / shard).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path} names {len(by_shard)} shard(s) but {len(missing)} are missing from {directory}: "
            f"{', '.join(missing)}"
        )
    tensors: dict[str, np.ndarray] = {}
    for shard, names in by_shard.items():
        contents = read_shard(directory / shard)
        absent = [n for n in names if n not in contents]
        if absent:
            raise CheckpointError(
                f"{directory / shard} lacks {len(absent)} tensor(s) that {index_path.name} places in it: "
                f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}"
            )
        unlisted = [n for n in contents if weight_map.get(n) != shard]
        if unlisted:
            raise CheckpointError(
                f"{directory / shard} holds tensor(s) that {index_path.name} does not place in it: "
                f"{', '.join(unlisted[:10])}{' ...' if len(unlisted) > 10 else ''}"
            )
        for name in names:
            tensors[name] = contents[name]
    return tensors
