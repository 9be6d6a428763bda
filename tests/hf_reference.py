"""Helpers that build the Hugging Face PyTorch reference model from our config and params (tests only)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict
from gpt2_jax.config import GPT2Config

HF_CLASSES = {
    "GPT2Model": transformers.GPT2Model,
    "GPT2LMHeadModel": transformers.GPT2LMHeadModel,
    "GPT2DoubleHeadsModel": transformers.GPT2DoubleHeadsModel,
    "GPT2ForSequenceClassification": transformers.GPT2ForSequenceClassification,
}


def hf_config(config: GPT2Config) -> transformers.GPT2Config:
    """The transformers config equal to ours (eager attention so attention maps are returned)."""
    hf = transformers.GPT2Config(**config.to_hf_dict())
    hf._attn_implementation = "eager"
    return hf


def hf_model(params, config: GPT2Config, cls_name: str = "GPT2LMHeadModel") -> torch.nn.Module:
    """A transformers model (float32, eval mode) holding exactly ``params``."""
    cls = HF_CLASSES[cls_name]
    model = cls(hf_config(config)).eval()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params_to_state_dict(params).items()}
    if cls_name == "GPT2Model":
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if "lm_head.weight" in missing:
        assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    return model


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
