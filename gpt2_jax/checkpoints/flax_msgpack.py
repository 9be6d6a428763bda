"""``flax_model.msgpack``: Hugging Face's Flax GPT-2 checkpoints, read (and written) without transformers.

Layout. ``FlaxGPT2LMHeadModel.save_pretrained`` (transformers 4.x; Flax support was removed in transformers 5)
writes ``flax.serialization.to_bytes(params)``: a msgpack map of nested maps whose leaves are arrays encoded as
msgpack extension type 1, payload ``msgpack((shape, dtype_name, raw C-order bytes))`` (type 3 is a numpy scalar;
arrays over 2**30 bytes are split into ``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}``). The
param names are those of ``modeling_flax_gpt2.py`` (``FlaxGPT2LMHeadModule`` -> ``transformer`` ->
``FlaxGPT2Module``)::

    transformer/wte/embedding [V, D]        transformer/wpe/embedding [P, D]
    transformer/h/<i>/ln_1/{scale,bias}     transformer/h/<i>/ln_2/{scale,bias}
    transformer/h/<i>/attn/c_attn/{kernel [3D, D], bias}   transformer/h/<i>/attn/c_proj/{kernel [D, D], bias}
    transformer/h/<i>/mlp/c_fc/{kernel [I, D], bias}       transformer/h/<i>/mlp/c_proj/{kernel [D, I], bias}
    transformer/ln_f/{scale,bias}
    lm_head/kernel [D, V]                   (only when tie_word_embeddings is False; GPT-2 ties it to wte)

``FlaxGPT2Model`` (no head) saves the same tree without the ``transformer/`` level. Note the Conv1D kernels:
``FlaxConv1D`` declares its param as ``(features, in_features)`` = ``[out, in]`` and transposes it when applied, so
unlike PyTorch's ``Conv1D.weight`` and our ``Dense`` kernels (both ``[in, out]``) they are transposed here. This was
checked against a file written by transformers 4.46.3 (``tests/fixtures/hf_flax_tiny``).

Reading streams the file through ``msgpack.Unpacker`` with our own extension decoder, so the whole file is never
held as one bytes object next to the decoded arrays.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_dtypes
import msgpack
import numpy as np

from ..atomic import atomic_write_path
from .safetensors_io import CheckpointError

_EXT_NDARRAY = 1
_EXT_COMPLEX = 2
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
_CONV1D = re.compile(r"^h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel$")
_MAX_CHUNK = 2**30


def _dtype(name: str | bytes) -> np.dtype:
    name = name.decode() if isinstance(name, bytes) else name
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _decode_ndarray(payload: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    return np.frombuffer(buffer, dtype=_dtype(dtype_name)).reshape(shape)


def _ext_hook(code: int, payload: bytes):
    if code == _EXT_NDARRAY:
        return _decode_ndarray(payload)
    if code == _EXT_NPSCALAR:
        return _decode_ndarray(payload)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    raise ValueError(f"unknown msgpack extension type {code}")


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED):
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a Flax msgpack checkpoint, flattened to ``"a/b/c"`` names (HF Flax names, as stored).

    Raises:
        CheckpointError: the file is truncated, is not msgpack, or is not a tree of arrays.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(
                f,
                raw=False,
                ext_hook=_ext_hook,
                strict_map_key=False,
                max_buffer_size=max(1 << 20, min(size, 2**31 - 1)),
            )
            tree = unpacker.unpack()
            try:
                unpacker.unpack()
            except msgpack.OutOfData:
                pass
            else:
                raise CheckpointError(f"{path}: extra data after the msgpack tree (corrupt file)")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    except msgpack.OutOfData as e:
        raise CheckpointError(f"{path}: truncated Flax msgpack checkpoint (the data ends mid-object)") from e
    except CheckpointError:
        raise
    except Exception as e:  # msgpack raises ValueError/TypeError/FormatError/StackError/UnicodeDecodeError
        raise CheckpointError(f"{path}: corrupt Flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: a Flax checkpoint holds a map of params, found a {type(tree).__name__}")
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + "/")
            elif isinstance(value, np.ndarray):
                flat[name] = value
            else:
                raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not an array")

    walk(_unchunk(tree), "")
    return flat


def flax_to_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF Flax names -> Hugging Face PyTorch state-dict names (``transformer.h.0.attn.c_attn.weight``, ...).

    Conv1D kernels are transposed from Flax's ``[out, in]`` to ``[in, out]`` and ``lm_head/kernel`` ``[D, V]`` to
    ``lm_head.weight`` ``[V, D]`` (views, no copies). Other names are translated leaf by leaf (``embedding``,
    ``scale`` and ``kernel`` -> ``weight``), so unknown params surface as unknown keys in
    :func:`gpt2_jax.checkpoints.hf_mapping.state_dict_to_params`.
    """
    state: dict[str, np.ndarray] = {}
    for name, array in flat.items():
        bare = name[len("transformer/"):] if name.startswith("transformer/") else name
        *module, leaf = bare.split("/")
        if _CONV1D.match(bare) or bare == "lm_head/kernel":
            array = array.T
        hf_leaf = "bias" if leaf == "bias" else "weight" if leaf in ("kernel", "scale", "embedding") else leaf
        prefix = "" if module[:1] == ["lm_head"] else "transformer."
        state[prefix + ".".join([*module, hf_leaf])] = array
    return state


def params_to_flax(params: Mapping) -> dict:
    """Our params -> the nested tree ``FlaxGPT2LMHeadModel`` saves (``transformer/...``, Conv1D kernels
    transposed to ``[out, in]``), numpy leaves."""
    tree: dict = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in key_path)
        if keys[0] not in ("wte", "wpe", "h", "ln_f"):
            raise ValueError(f"{'/'.join(keys)}: Hugging Face's Flax GPT-2 has no such param (only the LM model)")
        array = np.asarray(leaf)
        if _CONV1D.match("/".join(keys)):
            array = np.ascontiguousarray(array.T)
        node = tree.setdefault("transformer", {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = array
    return tree


def _pack(obj: Any):
    if isinstance(obj, np.ndarray):
        if obj.nbytes > _MAX_CHUNK:
            raise ValueError("arrays over 1 GiB need flax's chunked encoding; use flax.serialization.to_bytes")
        payload = msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(_EXT_NDARRAY, payload)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_flax_msgpack(path: str | os.PathLike, params: Mapping) -> Path:
    """Write ``params`` as a Hugging Face ``flax_model.msgpack`` (atomically), byte-compatible with
    ``flax.serialization.to_bytes`` of the tree :func:`params_to_flax` returns."""
    tree = params_to_flax(params)
    with atomic_write_path(path) as tmp:
        Path(tmp).write_bytes(msgpack.packb(tree, default=_pack, strict_types=True))
    return Path(path)
