"""Which checkpoint format a directory holds, the dtype policy on load, and page release for mapped files.

The Hugging Face file names, in the order :func:`find_weights` prefers them (the first present wins)::

    model.safetensors                 one safetensors file (memory-mapped)
    model.safetensors.index.json      sharded safetensors: {"weight_map": {tensor: shard file}} + the shards
    pytorch_model.bin                 a torch.save pickle (needs PyTorch; read with weights_only=True, mmap=True)
    pytorch_model.bin.index.json      sharded PyTorch pickles
    flax_model.msgpack                Hugging Face Flax (flax.serialization msgpack, FlaxGPT2 param names)

and OpenAI's original TensorFlow release (``hparams.json`` + ``model.ckpt.index`` / ``.data-*``), recognised by
:func:`gpt2_jax.checkpoints.openai_tf.is_openai_tf_checkpoint`.

Dtype on load (:func:`resolve_dtype`): floating tensors (float16/bfloat16/float32/float64 in the file) are cast to
the requested ``float32``, ``bfloat16`` or ``float16``; ``None`` keeps each tensor's dtype as stored. Nothing else
is cast: a GPT-2 checkpoint has no integer parameters (the integer/bool causal-mask buffers of old PyTorch files are
dropped by the mapping, never loaded).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .hf_directory import is_floating
from .safetensors_io import CheckpointError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
FLAX_NAME = "flax_model.msgpack"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

# format name -> file that marks it, in order of preference
WEIGHT_FILES = {
    "safetensors": SAFETENSORS_NAME,
    "safetensors-sharded": SAFETENSORS_INDEX_NAME,
    "pytorch": TORCH_NAME,
    "pytorch-sharded": TORCH_INDEX_NAME,
    "flax": FLAX_NAME,
}
# Files that hold GPT-2 weights in formats this package does not read, with what to do instead.
UNSUPPORTED_FILES = {
    "tf_model.h5": "Hugging Face's TensorFlow/Keras weights (tf_model.h5) are not read; the same hub repositories "
    "ship model.safetensors",
    "rust_model.ot": "rust_model.ot (rust-bert) is not read",
    "model.onnx": "ONNX graphs are not read",
}

_DTYPE_NAMES = {
    "float32": np.dtype("float32"),
    "fp32": np.dtype("float32"),
    "f32": np.dtype("float32"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype("float16"),
    "fp16": np.dtype("float16"),
    "f16": np.dtype("float16"),
    "half": np.dtype("float16"),
}
LOAD_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: Any) -> np.dtype | None:
    """The numpy dtype floating params are cast to on load, or None to keep each tensor's stored dtype.

    Accepts None, ``"float32"``/``"bfloat16"``/``"float16"`` (and ``fp32``, ``bf16``, ``fp16``, ``half``), or the
    numpy / ``jax.numpy`` dtype objects. Raises ValueError for anything else (integer dtypes, float64, which jax
    does not keep without x64 mode).
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key in ("none", "keep", "auto"):
            return None
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(LOAD_DTYPES)} (or None to keep the file's)")
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(LOAD_DTYPES)}") from None
    if resolved.name not in LOAD_DTYPES:
        raise ValueError(f"cannot load params as {resolved.name}; use one of {', '.join(LOAD_DTYPES)} (or None)")
    return resolved


def to_device(dtype: np.dtype | None) -> Callable[[np.ndarray], jnp.ndarray]:
    """Converter: floating arrays cast to ``dtype`` (None keeps theirs) and copied into a jax array.

    When the input is a view into a memory-mapped file, the file pages it covered are released from this process
    afterwards (:func:`release_pages`), so a loaded checkpoint is held once (in jax arrays) and not twice.
    """

    def convert(array: np.ndarray) -> jnp.ndarray:
        source = array
        array = np.asarray(array)
        if dtype is not None and is_floating(array.dtype) and array.dtype != dtype:
            array = array.astype(dtype)  # [same shape], a transient host copy of one tensor
        out = jnp.asarray(array)  # one copy into a jax buffer; jnp.asarray never aliases host memory
        if out is array or getattr(out, "unsafe_buffer_pointer", lambda: None)() == array.ctypes.data:
            out = jnp.array(array, copy=True)  # defensive: a jax that aliased would tie params to the file
        release_pages(source)
        return out

    return convert


def _find_mmap(array: Any) -> mmap.mmap | None:
    node = array
    while isinstance(node, np.ndarray):
        mm = getattr(node, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        node = node.base
    return node if isinstance(node, mmap.mmap) else None


def release_pages(array: Any) -> bool:
    """Drop the pages of a memory-mapped file that ``array`` views from this process's resident set.

    ``madvise(MADV_DONTNEED)`` on a read-only file mapping only unmaps the pages (they stay in the OS page cache
    and are read again on a later access, with the same contents), so the view stays valid. Returns False (doing
    nothing) when ``array`` is not a view into an ``np.memmap`` or the platform lacks ``madvise``.
    """
    mm = _find_mmap(array)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        base = np.frombuffer(mm, dtype=np.uint8)
        start_addr = base.ctypes.data
        del base
        low, high = _byte_bounds(np.asarray(array))
    except (TypeError, ValueError, BufferError):
        return False
    page = mmap.PAGESIZE
    start = max(0, (low - start_addr) // page * page)
    end = min(len(mm), -(-(high - start_addr) // page) * page)
    if end <= start:
        return False
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        return False
    return True


def _byte_bounds(array: np.ndarray) -> tuple[int, int]:
    try:
        from numpy.lib.array_utils import byte_bounds  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        byte_bounds = np.byte_bounds
    return byte_bounds(array)


@dataclasses.dataclass(frozen=True)
class WeightsLocation:
    """Where a directory's weights are: ``format`` (a key of :data:`WEIGHT_FILES`, or ``"openai-tf"``) and
    ``path`` (the weights file, the index file, or the TF directory)."""

    format: str
    path: Path


def ignored_weights(directory: str | os.PathLike, location: WeightsLocation) -> list[str]:
    """Other weight files in ``directory`` that :func:`find_weights` passed over for ``location`` (a later format
    of :data:`WEIGHT_FILES`, an OpenAI TF checkpoint, an unsupported format), so a load can say it ignored them."""
    from .openai_tf import is_openai_tf_checkpoint

    directory = Path(directory)
    ignored = [name for fmt, name in WEIGHT_FILES.items() if fmt != location.format and (directory / name).is_file()]
    if location.format != "openai-tf" and is_openai_tf_checkpoint(directory):
        ignored.append("an OpenAI TensorFlow checkpoint (model.ckpt.*)")
    ignored += [name for name in UNSUPPORTED_FILES if (directory / name).exists()]
    return ignored


def find_weights(directory: str | os.PathLike) -> WeightsLocation:
    """The weights a checkpoint directory holds, in the order of :data:`WEIGHT_FILES` (OpenAI TF last).

    Raises:
        CheckpointError: the directory holds none of them; the message lists every file looked for (and names a
            recognised-but-unsupported file such as ``tf_model.h5`` if there is one).
    """
    from .openai_tf import is_openai_tf_checkpoint

    directory = Path(directory)
    for fmt, name in WEIGHT_FILES.items():
        if (directory / name).is_file():
            return WeightsLocation(fmt, directory / name)
    if is_openai_tf_checkpoint(directory):
        return WeightsLocation("openai-tf", directory)
    looked_for = ", ".join(WEIGHT_FILES.values())
    extra = [why for name, why in UNSUPPORTED_FILES.items() if (directory / name).exists()]
    hint = f" ({'; '.join(extra)})" if extra else ""
    raise CheckpointError(
        f"{directory} holds no GPT-2 weights: looked for {looked_for}, and an OpenAI TensorFlow checkpoint "
        f"(hparams.json + model.ckpt.index/.data-*){hint}"
    )
