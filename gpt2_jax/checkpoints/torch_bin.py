"""``pytorch_model.bin``: Hugging Face's PyTorch pickle checkpoints, read with PyTorch when it is installed.

The file is a ``torch.save`` of the state dict. It is read with ``torch.load(weights_only=True)``, which refuses
to run arbitrary code from the pickle, and ``mmap=True`` for the zip format torch has written since 1.6 (the
tensors then stay in the mapped file until converted). Files in the older pickle-only format (the 2019 uploads of
the GPT-2 repositories on the hub, for instance) cannot be mapped and are read into memory.

PyTorch is not a dependency of this package: without it, reading a ``.bin`` raises a :class:`CheckpointError`
saying how to proceed (install torch, or pick a safetensors copy: every GPT-2 repository on the hub ships
``model.safetensors``, which :func:`gpt2_jax.checkpoints.pretrained.from_pretrained` prefers anyway).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .safetensors_io import CheckpointError


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch checkpoint and reading it needs PyTorch, which is not installed: "
            "`pip install torch` (the CPU build is enough), or use a directory with model.safetensors instead "
            "(`gpt2-jax convert` on a machine with torch writes one)"
        ) from None
    return torch


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU torch tensor as a numpy array without copying (bfloat16 through ``ml_dtypes``)."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a ``pytorch_model.bin`` as ``{name: numpy array}`` (views into the mapped file).

    Raises:
        CheckpointError: torch is missing; the file is truncated, corrupt or not a torch checkpoint; the pickle
            holds something other than plain tensors (``weights_only=True`` refuses to execute it).
    """
    path = Path(path)
    torch = _import_torch(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (truncated download?)")
    zipped = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4 ..."
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\n|$)", str(e), re.DOTALL)
        detail = match.group(1).strip() if match else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: corrupt, or not a plain PyTorch state dict: torch.load(weights_only=True) refused it "
            f"({detail})"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint ({message})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    tensors: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[str(name)] = tensor_to_numpy(value)
    return tensors
