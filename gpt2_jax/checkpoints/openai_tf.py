"""Load OpenAI's original GPT-2 release (a TensorFlow 1 checkpoint directory) without TensorFlow.

OpenAI's ``download_model.py`` fetched, per model size, a directory holding::

    checkpoint                       text proto naming the checkpoint prefix (model_checkpoint_path: "model.ckpt")
    model.ckpt.index                 tensor-bundle index (see tf_bundle.py)
    model.ckpt.data-00000-of-00001   tensor bytes
    model.ckpt.meta                  the TF graph (not needed here)
    hparams.json                     {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
    encoder.json, vocab.bpe          the BPE tokenizer (not read here)

and ``model.py`` stores these float32 variables (D = n_embd, V = n_vocab, P = n_ctx)::

    model/wte [V, D]    model/wpe [P, D]    model/ln_f/g, model/ln_f/b [D]
    model/h{i}/ln_1/g, /b [D]                model/h{i}/ln_2/g, /b [D]
    model/h{i}/attn/c_attn/w [1, D, 3D], /b [3D]   model/h{i}/attn/c_proj/w [1, D, D], /b [D]
    model/h{i}/mlp/c_fc/w [1, D, 4D], /b [4D]      model/h{i}/mlp/c_proj/w [1, 4D, D], /b [D]

:func:`load_openai_tf_params` maps them onto this project's params layout: ``wte``/``wpe`` -> ``{'embedding'}``,
``g`` -> ``scale``, ``b`` -> ``bias``, ``w`` -> ``kernel`` squeezed from ``[1, in, out]`` to ``[in, out]`` (the
1x1 "conv" weights are already ``[in, out]``, exactly like Hugging Face's ``Conv1D``: nothing is transposed).

Which variables are ignored. Checkpoints saved while fine-tuning with ``tf.train.AdamOptimizer`` (e.g. by
nshepperd's / gpt-2-simple's training scripts) carry TF bookkeeping next to the weights. Exactly these names are
skipped (:func:`is_bookkeeping_variable`):

* ``global_step``;
* ``beta1_power``, ``beta2_power`` (Adam's bias-correction accumulators), also with a ``_<n>`` suffix;
* optimizer slots whose last path component is ``Adam`` or ``Adam_<n>`` (``model/wte/Adam``, ``.../w/Adam_1``);
* ``_CHECKPOINTABLE_OBJECT_GRAPH`` (the object-graph metadata TF2's object-based saver adds).

Anything else that is not one of the variables above fails loudly, as does a missing variable, a shape that
disagrees with ``hparams.json`` and a non-floating dtype.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

from .safetensors_io import CheckpointError
from .tf_bundle import read_bundle_header, read_bundle_index, read_tensor

__all__ = [
    "find_tf_checkpoint_prefix",
    "read_openai_hparams",
    "load_openai_tf_params",
    "is_openai_tf_checkpoint",
    "is_bookkeeping_variable",
    "openai_variable_shapes",
]

HPARAMS_FILE = "hparams.json"
CHECKPOINT_STATE_FILE = "checkpoint"
# hparams.json key -> Hugging Face config.json key
_HPARAM_KEYS = {
    "n_vocab": "vocab_size",
    "n_ctx": "n_positions",
    "n_embd": "n_embd",
    "n_head": "n_head",
    "n_layer": "n_layer",
}
# Facts of OpenAI's model.py that hparams.json does not spell out (they are also GPT2Config's defaults).
_FIXED_CONFIG = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}

_BOOKKEEPING = re.compile(
    r"^(global_step|beta[12]_power(_\d+)?|_CHECKPOINTABLE_OBJECT_GRAPH)$"  # whole names
    r"|/Adam(_\d+)?$"  # Adam slot variables: <variable>/Adam, <variable>/Adam_1, ...
)
_MODEL_CHECKPOINT_PATH = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', re.MULTILINE)
_LAYER_NAME = re.compile(r"^model/h(\d+)/")


def is_bookkeeping_variable(name: str) -> bool:
    """True for the TF training bookkeeping that :func:`load_openai_tf_params` skips (see the module docstring)."""
    return bool(_BOOKKEEPING.search(name))


def _unescape_text_proto(s: str) -> str:
    """Undo the C-style escapes of a text-format proto string (``\\"``, ``\\\\``, octal ``\\ooo`` UTF-8 bytes)."""
    if "\\" not in s:
        return s
    try:
        return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeError, ValueError):
        return s


def find_tf_checkpoint_prefix(directory: str | os.PathLike) -> str:
    """The checkpoint prefix (``<directory>/model.ckpt``) of a TF checkpoint directory.

    Read from the ``checkpoint`` file's ``model_checkpoint_path`` (relative paths are relative to ``directory``;
    an absolute path that no longer exists, as when a directory was copied from another machine, is retried
    by its base name inside ``directory``). Without a ``checkpoint`` file, or one that names no path, the single
    ``*.index`` file in ``directory`` decides. Raises ``FileNotFoundError`` when nothing usable is found.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"TensorFlow checkpoint directory {directory!r} does not exist or is not a directory")
    state_path = os.path.join(directory, CHECKPOINT_STATE_FILE)
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8", errors="replace") as f:
            match = _MODEL_CHECKPOINT_PATH.search(f.read())
        if match:
            named = _unescape_text_proto(match.group(1))
            candidates = [named if os.path.isabs(named) else os.path.join(directory, named)]
            if os.path.isabs(named):
                candidates.append(os.path.join(directory, os.path.basename(named)))
            for prefix in candidates:
                if os.path.isfile(prefix + ".index"):
                    return prefix
            looked = [repr(c + ".index") for c in candidates]
            absent = f"{looked[0]} does not exist" if len(looked) == 1 else f"neither {' nor '.join(looked)} exists"
            raise FileNotFoundError(f"{state_path} names checkpoint {named!r}, but {absent}")
    indexes = sorted(glob.glob(os.path.join(glob.escape(directory), "*.index")))
    if len(indexes) == 1:
        return indexes[0][: -len(".index")]
    if not indexes:
        raise FileNotFoundError(f"no TensorFlow checkpoint (*.index file) in {directory!r}")
    raise FileNotFoundError(
        f"{directory!r} holds {len(indexes)} checkpoints ({', '.join(os.path.basename(p) for p in indexes)}) and no "
        f"'{CHECKPOINT_STATE_FILE}' file saying which one to use"
    )


def read_openai_hparams(directory: str | os.PathLike) -> dict[str, Any]:
    """``hparams.json`` as Hugging Face ``config.json`` keys.

    ``n_vocab`` -> ``vocab_size``, ``n_ctx`` -> ``n_positions``, ``n_embd``, ``n_head``, ``n_layer`` kept; plus
    ``model_type="gpt2"``, ``activation_function="gelu_new"`` and ``layer_norm_epsilon=1e-5``, which OpenAI's
    model.py hard-codes. Other keys in hparams.json are ignored. Raises ``FileNotFoundError`` if the file is
    missing and :class:`CheckpointError` if it is not JSON, lacks a key or holds a non-positive/non-integer size.
    """
    path = os.path.join(os.fspath(directory), HPARAMS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; an OpenAI GPT-2 checkpoint directory needs its hparams.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    missing = [k for k in _HPARAM_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (expected keys: {', '.join(_HPARAM_KEYS)})")
    config: dict[str, Any] = {}
    for key, hf_key in _HPARAM_KEYS.items():
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}")
        config[hf_key] = value
    if config["n_embd"] % config["n_head"]:
        raise CheckpointError(f"{path}: n_embd ({config['n_embd']}) is not divisible by n_head ({config['n_head']})")
    config.update(_FIXED_CONFIG)
    return config


def openai_variable_shapes(config: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """``{openai_name: (params_path, tf_shape)}`` for every variable of a GPT-2 with this (HF-keyed) config."""
    d, v, p, n_layer = config["n_embd"], config["vocab_size"], config["n_positions"], config["n_layer"]
    inner = config.get("n_inner") or 4 * d
    table = {
        "model/wte": (("wte", "embedding"), (v, d)),
        "model/wpe": (("wpe", "embedding"), (p, d)),
        "model/ln_f/g": (("ln_f", "scale"), (d,)),
        "model/ln_f/b": (("ln_f", "bias"), (d,)),
    }
    for i in range(n_layer):
        layer = ("h", str(i))
        for ln in ("ln_1", "ln_2"):
            table[f"model/h{i}/{ln}/g"] = ((*layer, ln, "scale"), (d,))
            table[f"model/h{i}/{ln}/b"] = ((*layer, ln, "bias"), (d,))
        for block, conv, fan_in, fan_out in (
            ("attn", "c_attn", d, 3 * d),
            ("attn", "c_proj", d, d),
            ("mlp", "c_fc", d, inner),
            ("mlp", "c_proj", inner, d),
        ):
            table[f"model/h{i}/{block}/{conv}/w"] = ((*layer, block, conv, "kernel"), (1, fan_in, fan_out))
            table[f"model/h{i}/{block}/{conv}/b"] = ((*layer, block, conv, "bias"), (fan_out,))
    return table


def _describe_unknown(name: str, config: dict[str, Any]) -> str:
    m = _LAYER_NAME.match(name)
    if m and int(m.group(1)) >= config["n_layer"]:
        return f"{name!r} (layer {m.group(1)}, but hparams.json says n_layer={config['n_layer']})"
    return repr(name)


def load_openai_tf_params(
    directory: str | os.PathLike, *, verify_checksums: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an OpenAI GPT-2 TF checkpoint directory: ``(hf_config_dict, params)``.

    ``hf_config_dict`` is :func:`read_openai_hparams`; ``params`` is a nested dict of numpy arrays in this
    project's layout (``{'wte': {'embedding'}, 'wpe': ..., 'h': {'0': {'ln_1': {'scale', 'bias'}, 'attn':
    {'c_attn': {'kernel', 'bias'}, 'c_proj': ...}, 'ln_2': ..., 'mlp': {'c_fc': ..., 'c_proj': ...}}, ...},
    'ln_f': {'scale', 'bias'}}``), dtypes as stored (float32 for OpenAI's release). TF bookkeeping is skipped
    (see the module docstring); an unknown or missing variable, a shape that disagrees with hparams.json or a
    non-floating dtype raises :class:`CheckpointError`. ``verify_checksums`` checks each tensor's CRC32C.
    """
    directory = os.fspath(directory)
    config = read_openai_hparams(directory)
    prefix = find_tf_checkpoint_prefix(directory)
    entries = read_bundle_index(prefix, verify_checksums=verify_checksums)
    wanted = openai_variable_shapes(config)
    where = f"TensorFlow checkpoint {prefix!r}"

    unknown = [n for n in entries if n not in wanted and not is_bookkeeping_variable(n)]
    if unknown:
        listed = ", ".join(_describe_unknown(n, config) for n in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise CheckpointError(f"{where} holds variables that are not part of OpenAI's GPT-2 layout: {listed}{more}")
    missing = [n for n in wanted if n not in entries]
    if missing:
        listed = ", ".join(repr(n) for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(
            f"{where} lacks {len(missing)} variable(s) of a GPT-2 with n_layer={config['n_layer']}: {listed}{more}"
        )
    for name, (_, shape) in wanted.items():
        entry = entries[name]
        if tuple(entry.shape) != shape:
            raise CheckpointError(
                f"{where}: variable {name!r} has shape {list(entry.shape)}, but hparams.json "
                f"(n_vocab={config['vocab_size']}, n_ctx={config['n_positions']}, n_embd={config['n_embd']}) "
                f"implies {list(shape)}"
            )
        if entry.dtype is None or (entry.dtype.kind != "f" and entry.dtype.name != "bfloat16"):
            raise CheckpointError(f"{where}: variable {name!r} has dtype {entry.tf_dtype}; expected a floating type")

    num_shards = read_bundle_header(prefix).num_shards
    params: dict[str, Any] = {}
    for name, (path, shape) in wanted.items():
        array = read_tensor(prefix, entries[name], verify_checksums=verify_checksums, num_shards=num_shards)
        if len(shape) == 3:
            array = array.reshape(shape[1:])  # [1, in, out] -> [in, out]
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return config, params


def is_openai_tf_checkpoint(directory: str | os.PathLike) -> bool:
    """True if ``directory`` looks like OpenAI's GPT-2 TF release: an ``hparams.json`` object with ``n_vocab`` and
    ``n_embd``, and a TF checkpoint prefix whose ``.index`` exists. Reads no tensors; never raises."""
    try:
        directory = os.fspath(directory)
        with open(os.path.join(directory, HPARAMS_FILE), encoding="utf-8") as f:
            data = json.load(f)
        if not (isinstance(data, dict) and "n_vocab" in data and "n_embd" in data):
            return False
        find_tf_checkpoint_prefix(directory)
        return True
    except (OSError, ValueError, TypeError):
        return False
