"""Generation: compiled prefill / decode over a static KV cache, a ``while_loop`` sampler, beam search,
streaming, a text API and the ``gpt2-jax generate`` command.

Entry points::

    from gpt2_jax.generation import GenerationConfig, generate, stream, generate_text

    out = generate(params, input_ids, attention_mask, key, GenerationConfig(max_new_tokens=20), model_config=cfg)
    out.sequences            # [rows, prompt_width + steps]

``generate`` (:mod:`~gpt2_jax.generation.api`) dispatches to sampling / greedy (:mod:`.sampler`), beam search
(:mod:`.beam_search`) and speculative / prompt-lookup decoding (:mod:`.speculative`); every strategy applies the
same ordered list of logits processors (:mod:`.logits_processors`).
"""

from .beam_search import reorder_generated
from .config import GenerationConfig
from .engine import (
    TRACE_COUNTS,
    decode_step,
    flatten_cache,
    init_cache,
    new_token_cap,
    prefill,
    prompt_bucket,
    unflatten_cache,
)
from .processors import (
    no_repeat_ngram_banned,
    sample,
    process_logits,
    repetition_penalty,
    temperature,
    top_k_filter,
    top_k_top_p_filter,
    top_p_filter,
)
from .logits_processors import LogitsProcessor, ProcessorState, apply_processors, build_processors
from .request import GenerationOutput, Knobs
from .api import generate
from .streaming import StreamStep, stream
from .text import generate_text, stream_text
from .weight_layout import DecodeWeights, decode_weights

__all__ = [
    "DecodeWeights",
    "GenerationConfig",
    "GenerationOutput",
    "Knobs",
    "LogitsProcessor",
    "ProcessorState",
    "apply_processors",
    "build_processors",
    "StreamStep",
    "TRACE_COUNTS",
    "decode_step",
    "decode_weights",
    "flatten_cache",
    "generate",
    "generate_text",
    "init_cache",
    "new_token_cap",
    "no_repeat_ngram_banned",
    "prefill",
    "process_logits",
    "prompt_bucket",
    "reorder_generated",
    "repetition_penalty",
    "sample",
    "stream",
    "stream_text",
    "temperature",
    "top_k_filter",
    "top_k_top_p_filter",
    "top_p_filter",
    "unflatten_cache",
]
