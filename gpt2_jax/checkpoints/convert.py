"""Convert any checkpoint :func:`from_pretrained` reads into a Hugging Face safetensors directory.

The output (``config.json``, ``model.safetensors``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``) is what ``transformers.GPT2LMHeadModel.from_pretrained`` / ``AutoTokenizer`` and this
package load. It is built in a hidden temporary directory beside ``dst`` and renamed into place only when complete:
an interrupted or failed conversion leaves no ``dst`` (at worst a hidden ``.<dst>.tmp-*`` directory), and an
existing ``dst`` (with ``overwrite``) is replaced only after the new one is complete -- a source that turns out to
be corrupt is detected while loading, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from ..locking import DirectoryLock
from .formats import resolve_dtype
from .hf_directory import save_hf_directory
from .pretrained import Pretrained, from_pretrained


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: Any = None,
    revision: str | None = None,
    overwrite: bool = False,
    local_files_only: bool = False,
    progress: bool | Callable[[int], None] = True,
) -> Pretrained:
    """Read ``src`` (hub id or local checkpoint directory of any supported format) and write ``dst`` atomically.

    Args:
        src: what :func:`~gpt2_jax.checkpoints.pretrained.from_pretrained` accepts.
        dst: the output directory.
        dtype: cast floating tensors to ``float32``, ``bfloat16`` or ``float16``; None keeps the source's dtypes.
        revision: hub revision of ``src`` (branch, tag or commit).
        overwrite: replace an existing ``dst`` (only once the new one is complete).
        local_files_only: never use the network for a hub ``src``.
        progress: True for a tqdm bar over the bytes written, False for none, or a callable given the byte count
            of each tensor written.

    Returns:
        The loaded checkpoint (its ``source``, ``format`` and ``notes`` say what was read).

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False (checked before anything is read).
        DirectoryLockedError: another convert is writing ``dst`` (an advisory lock ``.<dst name>.lock`` beside it,
            held for the whole conversion; the message names the holder's PID and host).
        CheckpointError / CheckpointNotFoundError: from loading ``src``.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    resolve_dtype(dtype)
    with DirectoryLock.beside(dst, what="convert destination"):  # one writer per destination, for the whole run
        if dst.exists() and not overwrite:  # finished by another convert while this one started
            raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
        return _convert_locked(src, dst, dtype, revision, local_files_only, progress)


def _convert_locked(src, dst: Path, dtype, revision, local_files_only, progress) -> Pretrained:
    """The body of :func:`convert_checkpoint`, under the destination's lock."""
    loaded = from_pretrained(src, revision=revision, dtype=dtype, local_files_only=local_files_only)
    total = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(loaded.params))
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {dst.name}")
        callback = bar.update
    else:
        callback = progress or None
    try:
        save_hf_directory(dst, loaded.params, loaded.config, tokenizer=loaded.tokenizer, progress=callback)
    finally:
        if bar is not None:
            bar.close()
    return loaded
