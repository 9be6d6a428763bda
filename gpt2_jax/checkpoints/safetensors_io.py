"""Read and write the safetensors format with numpy, memory-mapped on read and streamed on write.

Reading maps the file and returns zero-copy views, so loading a checkpoint never holds two copies of the
weights in memory; every offset is checked against the file size so a truncated or corrupt file gives an error
naming the file and the tensor. Writing streams one tensor at a time into a temporary file that replaces the
destination only when complete. bfloat16 is supported through ``ml_dtypes``.
"""

from __future__ import annotations

import json
import os
import struct as _struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from ..atomic import atomic_write_path

_DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, truncated or does not match the model."""


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map a ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: read-only numpy views into the mapped file by name, and the ``__metadata__``.

    Raises:
        CheckpointError: the file is too short, its header is not valid JSON, a dtype is unknown, or a tensor's
            byte range does not fit its shape or the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = _struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes, file of {size})"
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) if data_size else None
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from e
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} {dtype} needs {expected} bytes, header says {end - begin}"
            )
        if begin < 0 or end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} needs bytes [{begin}, {end}) of the data section, "
                f"which has {data_size} bytes"
            )
        view = mapped[begin:end] if expected else np.zeros(0, np.uint8)
        tensors[name] = view.view(dtype).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write tensors to ``path`` atomically (a temporary file renamed into place when complete).

    Args:
        path: destination file.
        tensors: name -> array (numpy or anything ``np.asarray`` accepts, e.g. jax arrays).
        metadata: string key/values for ``__metadata__`` (Hugging Face expects ``{"format": "pt"}``).
        progress: called with the number of bytes written after each tensor.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, value in items:
        array = np.asarray(value)
        if array.dtype not in _CODES:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {array.dtype} is not supported by safetensors")
        nbytes = array.size * array.dtype.itemsize
        header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(array)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_write_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in arrays:
            f.write(np.ascontiguousarray(array).tobytes())
            if progress is not None:
                progress(array.nbytes)
