"""LoRA adapters in PEFT's directory format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What ``peft`` writes for a GPT-2 (``Conv1D`` layers, ``fan_in_fan_out=True``) and reads back:
``base_model.model.transformer.h.<i>.attn.c_attn.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``
(``nn.Linear`` layout: ours transposed, :mod:`gpt2_jax.lora` keeps ``A [in, r]``, ``B [r, out]``). Adapters
trained on a ``GPT2Model`` (no ``transformer.`` level) load too. Unsupported PEFT features (DoRA, trained biases,
per-module rank or alpha patterns, extra trained modules) are refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_directory
from ..lora import LoraConfig, lora_targets, merge_lora
from ..stacking import unstack_layers
from .safetensors_io import CheckpointError, read_safetensors, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?:transformer\.)?(h\.\d+\.(?:attn|mlp)\.[A-Za-z_]+)\.(lora_A|lora_B)\.weight$")

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "is_adapter_directory", "save_adapter", "load_adapter",
           "apply_adapter"]


def is_adapter_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter (its ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _target_modules(names: list[str], all_names: list[str]) -> list[str]:
    """PEFT ``target_modules``: the short names (``c_attn``) when they select exactly ``names``, else every name."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    if sorted(n for n in all_names if n.rsplit(".", 1)[-1] in suffixes) == sorted(names):
        return suffixes
    return ["transformer." + name for name in names]


def save_adapter(directory: str | os.PathLike, adapters: Mapping, config: LoraConfig, base_model: str,
                 overwrite: bool = True) -> Path:
    """Write ``adapters`` (from :func:`gpt2_jax.lora.init_lora` or training) as a PEFT adapter directory,
    atomically (a complete directory appears, or nothing changes).

    Args:
        directory: destination.
        adapters: ``h/<i>/.../{lora_A [in, r], lora_B [r, out]}`` (stacked adapters are unstacked).
        config: their :class:`~gpt2_jax.lora.LoraConfig`.
        base_model: ``base_model_name_or_path`` recorded for PEFT (the ``--model`` the base came from).
        overwrite: replace an existing directory.
    """
    adapters = unstack_layers(adapters)
    tensors: dict[str, np.ndarray] = {}
    names = []

    def visit(tree: Mapping, path: tuple[str, ...]):
        if "lora_A" in tree:
            name = ".".join(path)
            names.append(name)
            prefix = f"base_model.model.transformer.{name}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(tree["lora_A"]).T)  # [r, in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(tree["lora_B"]).T)  # [out, r]
            return
        for key, value in tree.items():
            visit(value, path + (str(key),))

    visit(adapters, ())
    if not names:
        raise ValueError("no adapters to save")
    layer_names = sorted({n for n in names}, key=_layer_order)
    all_names = [f"h.{i}.{m}" for i in sorted({int(n.split(".")[1]) for n in names})
                 for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    document = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(layer_names, all_names),
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        write_safetensors(tmp / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    return Path(directory)


def _layer_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]), ".".join(parts[2:]))


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if document.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {document.get('peft_type')!r} is not supported (only LORA)")
    refusals = {
        "use_dora": (lambda v: bool(v), "DoRA adapters (use_dora) are not supported"),
        "bias": (lambda v: v not in (None, "none"), "adapters that train biases (bias != 'none') are not supported"),
        "modules_to_save": (lambda v: bool(v), "adapters with modules_to_save (fully trained extra modules) are "
                                               "not supported"),
        "rank_pattern": (lambda v: bool(v), "per-module ranks (rank_pattern) are not supported"),
        "alpha_pattern": (lambda v: bool(v), "per-module alphas (alpha_pattern) are not supported"),
    }
    for key, (refused, message) in refusals.items():
        if refused(document.get(key)):
            raise CheckpointError(f"{path}: {message}")
    return document


def load_adapter(directory: str | os.PathLike, params: Mapping) -> tuple[dict, LoraConfig, dict[str, Any]]:
    """Read a PEFT LoRA adapter (ours or written by ``peft``) for the base ``params``.

    Returns:
        ``(adapters, lora_config, adapter_config_json)``: adapters as ``h/<i>/.../{lora_A [in, r], lora_B [r, out]}``
        (float32 numpy), their config, and the raw ``adapter_config.json``.

    Raises:
        CheckpointError: the directory is not an adapter, uses an unsupported PEFT feature, names a layer the base
            does not have, or its shapes do not fit the base (another model size).
    """
    directory = Path(directory)
    document = _read_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = ", ".join(sorted(p.name for p in directory.iterdir())) if directory.is_dir() else "nothing"
        raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS} (it holds: {found})")
    tensors, _ = read_safetensors(weights)
    base = unstack_layers(params)
    layers = lora_targets(base, ".")  # every dense layer of the base: name -> path
    adapters: dict = {}
    ranks = set()
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{weights}: unexpected tensor {key!r} (expected base_model.model.transformer."
                                  "h.<i>.<attn|mlp>.<layer>.lora_A|lora_B.weight)")
        name, which = match.groups()
        if name not in layers:
            raise CheckpointError(f"{weights}: adapter for {name!r}, a layer the base model does not have "
                                  f"(it has {len({n.split('.')[1] for n in layers})} blocks)")
        node = adapters
        for part in layers[name]:
            node = node.setdefault(part, {})
        node[which] = np.asarray(value, np.float32).T  # A: [in, r], B: [r, out]
    if not adapters:
        raise CheckpointError(f"{weights} holds no LoRA tensors")
    for name, path in layers.items():
        node = adapters
        try:
            for part in path:
                node = node[part]
        except KeyError:
            continue
        if set(node) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: {name} has {sorted(node)}, expected both lora_A and lora_B")
        kernel = base
        for part in path:
            kernel = kernel[part]
        fan_in, fan_out = np.shape(kernel["kernel"])
        a, b = node["lora_A"], node["lora_B"]
        if a.shape[0] != fan_in or b.shape[1] != fan_out or a.shape[1] != b.shape[0]:
            raise CheckpointError(
                f"{weights}: the adapter of {name} (lora_A {list(a.shape[::-1])}, lora_B {list(b.shape[::-1])}) does "
                f"not fit the base model's layer [in {fan_in}, out {fan_out}]: an adapter for another model size?")
        ranks.add(a.shape[1])
    if len(ranks) != 1:
        raise CheckpointError(f"{weights}: adapters of different ranks {sorted(ranks)}")
    rank = ranks.pop()
    if int(document.get("r", rank)) != rank:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: r={document.get('r')} but the tensors have rank {rank}")
    names = sorted({".".join(p) for p in _adapter_paths(adapters)}, key=_layer_order)
    config = LoraConfig(rank=rank, alpha=float(document.get("lora_alpha", 8)),
                        dropout=float(document.get("lora_dropout", 0.0) or 0.0),
                        targets="^(?:" + "|".join(re.escape(n) for n in names) + ")$",
                        use_rslora=bool(document.get("use_rslora", False)))
    return adapters, config, document


def check_adapter_directory(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter directory, checked (see :func:`load_adapter`'s errors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"adapter {str(directory)!r} is not a directory (a PEFT adapter directory holds "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return _read_config(directory)


def with_adapter(pretrained: Any, directory: str | os.PathLike) -> Any:
    """A :class:`~gpt2_jax.checkpoints.pretrained.Pretrained` with the adapter in ``directory`` merged into its
    params, and a note saying so (and naming the base the adapter was trained on when that differs)."""
    import dataclasses

    adapters, config, document = load_adapter(directory, pretrained.params)
    params = _merged(pretrained.params, adapters, config)
    note = (f"LoRA adapter {directory} merged (rank {config.rank}, alpha {config.alpha:g}, "
            f"{sum(1 for _ in _adapter_paths(adapters))} layers)")
    trained_on = document.get("base_model_name_or_path")
    if trained_on and str(trained_on) not in (str(pretrained.source), Path(str(pretrained.source)).name):
        note += f"; it was trained on base {trained_on!r}"
    return dataclasses.replace(pretrained, params=params, notes=tuple(pretrained.notes) + (note,))


def _adapter_paths(adapters: Mapping, path: tuple[str, ...] = ()):
    if "lora_A" in adapters:
        yield path
        return
    for key, value in adapters.items():
        yield from _adapter_paths(value, path + (str(key),))


def apply_adapter(params: Mapping, directory: str | os.PathLike) -> tuple[dict, LoraConfig, dict[str, Any]]:
    """``params`` with the PEFT adapter in ``directory`` merged in (:func:`gpt2_jax.lora.merge_lora`): plain
    params, in the layout (stacked or not) ``params`` had. Returns ``(params, lora_config, adapter_config_json)``."""
    adapters, config, document = load_adapter(directory, params)
    return _merged(params, adapters, config), config, document


def _merged(params: Mapping, adapters: Mapping, config: LoraConfig) -> dict:
    """``params`` with per-layer ``adapters`` merged, in the layout (stacked or not) ``params`` had."""
    from ..stacking import params_are_stacked, stack_layers

    merged = merge_lora(unstack_layers(params), adapters, config)
    return stack_layers(merged) if params_are_stacked(params) else merged
