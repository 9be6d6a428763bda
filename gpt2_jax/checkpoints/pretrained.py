"""from_pretrained: config, params and tokenizer from any GPT-2 checkpoint -- a hub id or a local directory.

Sources, in the order they are tried for ``name_or_path``:

1. an existing local directory, holding (first found wins, see :mod:`gpt2_jax.checkpoints.formats`)
   ``model.safetensors`` (memory-mapped), ``model.safetensors.index.json`` + shards, ``pytorch_model.bin`` (needs
   torch), ``pytorch_model.bin.index.json`` + shards, ``flax_model.msgpack`` (Hugging Face Flax), each with its
   ``config.json``; or OpenAI's TensorFlow release (``hparams.json`` + ``model.ckpt.*``, read without TensorFlow);
2. otherwise a Hugging Face hub id (``gpt2``, ``openai-community/gpt2-medium``, ``user/repo``), downloaded once
   into the Hugging Face cache at ``revision`` and read from there afterwards (:mod:`gpt2_jax.checkpoints.hub`).

The tokenizer comes from the checkpoint's ``vocab.json`` + ``merges.txt`` (Hugging Face) or ``encoder.json`` +
``vocab.bpe`` (OpenAI); a checkpoint without them gets the bundled GPT-2 tokenizer, with a
:class:`TokenizerFallbackWarning` and a line in :attr:`Pretrained.notes`.

Dtype: floating tensors are cast to ``dtype`` (float32, bfloat16 or float16; None keeps what the file stores);
nothing else is cast (GPT-2 has no integer params; the causal-mask buffers of old PyTorch files are dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from ..tokenizer import GPT2Tokenizer
from .flax_msgpack import flax_to_state_dict, read_flax_msgpack
from .formats import (CONFIG_NAME, WEIGHT_FILES, WeightsLocation, find_weights, ignored_weights, resolve_dtype,
                      to_device)
from .hf_mapping import expected_shapes, state_dict_to_params
from .hub import CheckpointNotFoundError, download_checkpoint, is_hub_id
from .safetensors_io import CheckpointError, read_safetensors
from .sharded import read_sharded
from .torch_bin import read_torch_bin


class TokenizerFallbackWarning(UserWarning):
    """A checkpoint had no tokenizer files, so the bundled GPT-2 tokenizer is used."""


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint.

    Attributes:
        config: the architecture.
        params: our params pytree (jax arrays).
        tokenizer: the checkpoint's tokenizer (or the bundled GPT-2 one, see ``notes``).
        source: the local directory the files were read from (for a hub id: its snapshot in the HF cache).
        format: ``safetensors``, ``safetensors-sharded``, ``pytorch``, ``pytorch-sharded``, ``flax`` or ``openai-tf``.
        revision: the hub commit hash for hub ids, else None.
        notes: human-readable remarks about the load (e.g. a tokenizer fallback).
    """

    config: GPT2Config
    params: dict
    tokenizer: GPT2Tokenizer
    source: str
    format: str = ""
    revision: str | None = None
    notes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        """One line: the config, the params summarised (never the arrays), format, source, revision, notes."""
        from ..reprs import short_dataclass_repr, tree_summary

        return short_dataclass_repr(self, params=tree_summary(self.params),
                                    tokenizer=f"<{type(self.tokenizer).__name__}, "
                                              f"{getattr(self.tokenizer, 'vocab_size', '?')} tokens>")


def _tokenizer_and_note(directory: Path) -> tuple[GPT2Tokenizer, str | None]:
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (directory / vocab).exists() and (directory / merges).exists():
            return GPT2Tokenizer.from_directory(directory), None
    note = (
        f"{directory} has no tokenizer files (vocab.json + merges.txt or encoder.json + vocab.bpe); "
        "using the bundled GPT-2 tokenizer"
    )
    return GPT2Tokenizer(), note


def load_tokenizer(directory: str | os.PathLike) -> GPT2Tokenizer:
    """The directory's own tokenizer files if it has them, else the bundled GPT-2 BPE."""
    return _tokenizer_and_note(Path(directory))[0]


def read_config(directory: str | os.PathLike) -> GPT2Config:
    """The architecture of a checkpoint directory: its ``config.json`` (refusing other model types), or for an
    OpenAI TensorFlow directory its ``hparams.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        from .openai_tf import is_openai_tf_checkpoint, read_openai_hparams

        if is_openai_tf_checkpoint(directory):
            return GPT2Config.from_hf_dict(read_openai_hparams(directory))
        raise CheckpointError(f"{directory} has weights but no {CONFIG_NAME} describing the architecture")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    try:
        return GPT2Config.from_hf_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_state_dict(location: WeightsLocation) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of a weights file (views into mapped files where the format allows)."""
    if location.format == "safetensors":
        return read_safetensors(location.path)[0]
    if location.format == "safetensors-sharded":
        return read_sharded(location.path)
    if location.format == "pytorch":
        return read_torch_bin(location.path)
    if location.format == "pytorch-sharded":
        return read_sharded(location.path, read_torch_bin)
    if location.format == "flax":
        return flax_to_state_dict(read_flax_msgpack(location.path))
    raise ValueError(f"not a Hugging Face weights format: {location.format}")


def _load_openai_tf(directory: Path, dtype: np.dtype | None) -> tuple[GPT2Config, dict]:
    """Params of an OpenAI TF checkpoint, converted leaf by leaf so the numpy copy shrinks as jax's grows."""
    from .openai_tf import load_openai_tf_params

    hf_config, params = load_openai_tf_params(directory)
    config = GPT2Config.from_hf_dict(hf_config)
    expected = expected_shapes(config)
    leaves = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"missing {'/'.join(p)}" for p in expected if p not in leaves]
    problems += [f"unexpected {'/'.join(p)}" for p in leaves if p not in expected]
    problems += [
        f"{'/'.join(p)}: checkpoint has {list(leaves[p].shape)}, the config expects {list(expected[p])}"
        for p in expected
        if p in leaves and tuple(leaves[p].shape) != expected[p]
    ]
    if problems:
        raise CheckpointError(f"{directory}: TF checkpoint does not match its hparams.json: " + "; ".join(problems))
    del leaves
    convert = to_device(dtype)
    for path in expected:
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = convert(node[path[-1]])  # the numpy array is freed here
    return config, params


def load_directory(directory: str | os.PathLike, dtype: Any = jnp.float32) -> Pretrained:
    """Load a local checkpoint directory of any supported format (see the module docstring).

    Args:
        directory: a Hugging Face model directory or an OpenAI TensorFlow checkpoint directory.
        dtype: dtype of the floating params (``float32``, ``bfloat16``, ``float16``; None keeps the file's).

    Raises:
        CheckpointError: no weights (the message lists what was looked for), no/invalid config, a truncated or
            corrupt file, or tensors that disagree with the config (naming the key and both shapes).
    """
    directory = Path(directory)
    dtype = resolve_dtype(dtype)
    location = find_weights(directory)
    if location.format == "openai-tf":
        config, params = _load_openai_tf(directory, dtype)
    else:
        config = read_config(directory)
        state = _read_state_dict(location)
        try:
            params = state_dict_to_params(state, config, to_device(dtype))
        except CheckpointError as e:
            hint = ""
            if location.format == "flax":
                hint = "\n  (Flax params are named by their PyTorch equivalents, Conv1D kernels shown as [in, out])"
            raise CheckpointError(f"{location.path}: {e}{hint}") from None
        del state
    tokenizer, note = _tokenizer_and_note(directory)
    notes = ()
    if note:
        warnings.warn(note, TokenizerFallbackWarning, stacklevel=3)
        notes = (note,)
    ignored = ignored_weights(directory, location)
    if ignored:  # the documented order decided; say so, the files may disagree
        notes += (f"loaded {location.path.name if location.format != 'openai-tf' else 'the OpenAI TF checkpoint'} "
                  f"and ignored {', '.join(ignored)} in the same directory (the first present of "
                  f"{', '.join(WEIGHT_FILES.values())}, then OpenAI TF, is read)",)
    return Pretrained(config, params, tokenizer, str(directory), location.format, None, notes)


def from_pretrained(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    local_files_only: bool = False,
    adapter: str | os.PathLike | None = None,
) -> Pretrained:
    """Load a GPT-2 checkpoint: config, params and tokenizer.

    Args:
        name_or_path: a local directory (Hugging Face safetensors / sharded / ``pytorch_model.bin`` / Flax msgpack,
            or OpenAI's TensorFlow release) or a hub id (``gpt2``, ``gpt2-medium``, ``openai-community/gpt2-large``,
            ``user/repo``). An existing directory wins over a hub id of the same name.
        revision: hub branch, tag or commit hash (default ``main``); ignored for local directories.
        dtype: dtype of the floating params: ``jnp.float32`` (default), ``jnp.bfloat16``, ``jnp.float16`` (or their
            names), or None to keep what the file stores. Only floating tensors are cast.
        local_files_only: never touch the network; hub ids must be in the Hugging Face cache (also implied by
            ``HF_HUB_OFFLINE=1``).
        adapter: a PEFT LoRA adapter directory (ours or written by ``peft``) to merge into the weights
            (:func:`gpt2_jax.checkpoints.adapters.with_adapter`); the result is plain params, noted in ``notes``.

    Returns:
        :class:`Pretrained` ``(config, params, tokenizer, source, format, revision, notes)``.

    Raises:
        CheckpointNotFoundError: ``name_or_path`` is neither a directory nor a hub id, the hub has no such model,
            or it holds no weights; :class:`~gpt2_jax.checkpoints.hub.HubUnavailableError` (a subclass) when there is
            no network (or downloads are disabled) and nothing is cached.
        CheckpointError: a corrupt or truncated file, or weights whose shapes disagree with the config.
    """
    resolve_dtype(dtype)  # fail on a bad dtype before any download
    if adapter is not None:
        from .adapters import check_adapter_directory, with_adapter

        check_adapter_directory(adapter)  # before any download
        return with_adapter(from_pretrained(name_or_path, revision, dtype, local_files_only), adapter)
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_directory(path, dtype)
    if path.exists():
        raise CheckpointNotFoundError(
            f"{text!r} is a file; pass the checkpoint directory that holds it (with its config.json)"
        )
    if isinstance(name_or_path, os.PathLike) or not is_hub_id(text):
        raise CheckpointNotFoundError(
            f"{text!r} is neither a directory nor a Hugging Face hub id (a hub id looks like 'gpt2' or "
            "'openai-community/gpt2-medium'; a directory must exist)"
        )
    snapshot, commit = download_checkpoint(text, revision=revision, local_files_only=local_files_only)
    loaded = load_directory(snapshot, dtype)
    return dataclasses.replace(loaded, revision=commit)
