"""GPT2Config: a frozen, hashable description of a GPT-2 architecture.

Field names and defaults follow Hugging Face's ``GPT2Config`` so that a ``config.json`` shipped with any GPT-2
checkpoint maps onto it one to one. Being a frozen dataclass, a config can be passed to ``jax.jit`` as a static
argument and used as a dictionary key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu", "swish", "gelu_fast", "quick_gelu", "gelu_pytorch_tanh", "tanh")
SUMMARY_TYPES = ("last", "first", "mean", "cls_index")

# Fields that describe how this library lays the model out, not the model: never read from or written to a
# Hugging Face config.json (a non-default variant is written as ``gpt2_jax_variant``).
LIBRARY_FIELDS = ("scan_layers", "variant")

# Keys of a Hugging Face config.json that name the same field as ours under another name.
_HF_ALIASES = {
    "n_ctx": "n_positions",
    "max_position_embeddings": "n_positions",
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 model (names and defaults as in Hugging Face's ``GPT2Config``).

    The defaults describe the released 124M ``gpt2`` model.
    """

    vocab_size: int = 50257  # tokens in the BPE vocabulary (+ <|endoftext|>)
    n_positions: int = 1024  # longest sequence the learned position table covers (HF alias: n_ctx)
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must be divisible by it
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # MLP non-linearity; GPT-2 uses the tanh form of GELU
    resid_pdrop: float = 0.1  # dropout on attention and MLP outputs
    embd_pdrop: float = 0.1  # dropout on token + position embeddings
    attn_pdrop: float = 0.1  # dropout on attention probabilities
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02  # std of the normal initialiser
    scale_attn_weights: bool = True  # divide attention scores by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # further divide layer i's scores by (i + 1)
    reorder_and_upcast_attn: bool = False  # compute attention scores and softmax in float32
    summary_type: str = "cls_index"  # double-heads pooling: last / first / mean / cls_index
    summary_use_proj: bool = True  # double-heads: a linear projection after pooling
    summary_activation: str | None = None  # double-heads: "tanh" or None
    summary_proj_to_labels: bool = True  # double-heads: project to num_labels (1 for double heads)
    summary_first_dropout: float = 0.1  # double-heads: dropout before the projection
    summary_last_dropout: float = 0.0  # double-heads: dropout after the projection
    num_labels: int = 2  # sequence classification classes
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None  # used by sequence classification to find each row's last token
    # Not Hugging Face fields (never written to config.json): how this library lays the model out.
    scan_layers: bool = False  # blocks under nn.scan, params stacked [n_layer, ...] under h/ (compiles one block)
    variant: str = "gpt2"  # a registered architecture variant (gpt2_jax.layers.register_variant)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by GPT2Config.n_head ({self.n_head})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function {self.activation_function!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if self.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"GPT2Config.summary_type {self.summary_type!r} is not one of {', '.join(SUMMARY_TYPES)}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "summary_last_dropout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {value!r}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        if self.initializer_range < 0:
            raise ValueError(f"GPT2Config.initializer_range must be >= 0, got {self.initializer_range!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"GPT2Config.scan_layers must be a bool, got {self.scan_layers!r}")
        if not isinstance(self.variant, str) or not self.variant:
            raise ValueError(f"GPT2Config.variant must be a non-empty string, got {self.variant!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"GPT2Config.{name} must be a non-negative integer or None, got {value!r}")

    # Derived sizes --------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """Width of the MLP hidden layer."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def n_ctx(self) -> int:
        """Alias of ``n_positions`` (the name OpenAI's hparams.json and older HF configs use)."""
        return self.n_positions

    def __repr__(self) -> str:
        """Only the fields that differ from the defaults (the released ``gpt2``): ``GPT2Config(n_layer=2, ...)``."""
        from .reprs import short_dataclass_repr

        return short_dataclass_repr(self)

    def replace(self, **changes: Any) -> "GPT2Config":
        """A copy with some fields changed (validated again)."""
        if "n_ctx" in changes:
            changes["n_positions"] = changes.pop("n_ctx")
        return dataclasses.replace(self, **changes)

    # Presets --------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPT2Config":
        """The architecture of a released GPT-2 size: ``gpt2``, ``gpt2-medium``, ``gpt2-large`` or ``gpt2-xl``.

        ``openai-community/`` prefixes are accepted.
        """
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    # Hugging Face config.json ---------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> "GPT2Config":
        """Build a config from a Hugging Face ``config.json`` dictionary.

        Keys that do not change the computation (``architectures``, ``task_specific_params``, ...) are ignored;
        ``n_ctx`` and the other HF attribute aliases are accepted. ``id2label`` sets ``num_labels``. A list of
        eos ids keeps its first entry.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        if data.get("model_type") not in (None, "gpt2"):
            raise ValueError(f"the config describes a {data['model_type']!r} model, not GPT-2 (model_type 'gpt2')")
        field_names = {f.name for f in dataclasses.fields(cls)} - set(LIBRARY_FIELDS)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = _HF_ALIASES.get(key, key)
            if name in field_names and not (key != name and name in data):
                kwargs[name] = value
        if data.get("gpt2_jax_variant") is not None:
            kwargs["variant"] = data["gpt2_jax_variant"]
        if "num_labels" not in kwargs and isinstance(data.get("id2label"), Mapping):
            kwargs["num_labels"] = len(data["id2label"])
        if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "summary_last_dropout"):
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = float(kwargs[name])
        if kwargs.get("summary_first_dropout") is None:
            kwargs.pop("summary_first_dropout", None)
        if kwargs.get("summary_last_dropout") is None:
            kwargs.pop("summary_last_dropout", None)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """This config as a Hugging Face ``config.json`` dictionary (``GPT2LMHeadModel`` architecture)."""
        data: dict[str, Any] = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
        data.update(dataclasses.asdict(self))
        for name in LIBRARY_FIELDS:
            del data[name]
        if self.variant != "gpt2":  # not loadable by transformers; our loader restores it
            data["gpt2_jax_variant"] = self.variant
        data["n_ctx"] = self.n_positions
        num_labels = data.pop("num_labels")
        data["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        data["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        data["tie_word_embeddings"] = True
        data["use_cache"] = True
        return data

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        """Read a Hugging Face ``config.json``; errors name the file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise OSError(f"cannot read config file {os.fspath(path)!r}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid JSON: {e}") from e
        try:
            return cls.from_hf_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config file {os.fspath(path)!r}: {e}") from e

    def to_json_string(self) -> str:
        """The Hugging Face ``config.json`` text of this config."""
        return json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n"


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}
