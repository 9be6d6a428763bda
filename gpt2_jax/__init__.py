"""gpt2-jax: a pure-functional GPT-2 in JAX/Flax. The public API, re-exported."""

from . import backend
from .backend import Tuning
from .checkpoints.hf_directory import load_hf_directory, save_hf_directory
from .checkpoints.convert import convert_checkpoint
from .checkpoints.hub import CheckpointNotFoundError, HubUnavailableError
from .checkpoints.pretrained import Pretrained, TokenizerFallbackWarning, from_pretrained, load_directory, read_config
from .checkpoints.safetensors_io import CheckpointError
from .checkpoints.adapters import load_adapter, save_adapter
from .config import GPT2Config
from .generation import GenerationConfig, GenerationOutput, decode_step, generate, generate_text, prefill, stream, stream_text
from .inspect import attention_maps, logit_lens, model_info, next_token_table, run_benchmark
from . import interp
from .interp import (ActivationCache, activation_patching, attribution_patching, hook_names, run_with_cache,
                     run_with_hooks)
from .kv_cache import KVCache
from .layers import REMAT_POLICIES, Variant, register_variant
from .losses import causal_lm_loss, cross_entropy
from .lora import LoraConfig, init_lora, lora_variables, merge_lora
from .model import (
    CausalLMOutput,
    DoubleHeadsOutput,
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2Output,
    SequenceClassifierOutput,
    count_params,
    init_params,
)
from .stacking import params_for, stack_layers, unstack_layers, with_scan_layers
from .tokenizer import GPT2Tokenizer, StreamingDecoder

__version__ = "0.1.0"

# Fine-tuning lives in gpt2_jax.training (imported on use: it pulls in orbax), e.g.
#   from gpt2_jax.training import make_optimizer, make_train_step, TrainState
