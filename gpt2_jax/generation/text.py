"""Strings in, strings out: :func:`generate_text` and :func:`stream_text` over a loaded checkpoint.

``model`` is anything with ``config``, ``params`` and ``tokenizer`` attributes (what
:func:`gpt2_jax.checkpoints.pretrained.from_pretrained` returns), or a name / path to load with it. Loading
gpt2 takes a few seconds: load once and pass the result when generating repeatedly.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import numpy as np

from ..tokenizer import GPT2Tokenizer, StreamingDecoder
from .config import GenerationConfig
from .api import generate
from .streaming import stream


def _load(model: Any, dtype: Any):
    """``(config, params, tokenizer)`` of a loaded checkpoint, or of a name / path given to from_pretrained."""
    if all(hasattr(model, a) for a in ("config", "params", "tokenizer")):
        return model.config, model.params, model.tokenizer
    from ..checkpoints.pretrained import from_pretrained

    kwargs = {} if dtype is None else {"dtype": dtype}
    loaded = from_pretrained(model, **kwargs)
    return loaded.config, loaded.params, loaded.tokenizer


def _prepare(model: Any, dtype: Any, tokenizer: GPT2Tokenizer | None, config: GenerationConfig | None,
             overrides: dict):
    """``(model config, params, tokenizer, generation config)``: the model loaded if named, the tokenizer
    override applied, the generation config with ``overrides``."""
    model_config, params, tok = _load(model, dtype)
    return model_config, params, (tokenizer if tokenizer is not None else tok), _config(config, overrides)


def _resolve_key(key, seed: int, config: GenerationConfig):
    if key is not None:
        return key
    return jax.random.key(seed) if config.do_sample else None


def _config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    config = config if config is not None else GenerationConfig()
    return config.replace(**overrides) if overrides else config


def generate_text(
    prompts: str | Sequence[str],
    model: Any = "gpt2",
    config: GenerationConfig | None = None,
    *,
    key=None,
    seed: int = 0,
    dtype: Any = None,
    tokenizer: GPT2Tokenizer | None = None,
    return_full_text: bool = False,
    skip_special_tokens: bool = True,
    assistant: Any = None,
    **overrides: Any,
) -> str | list:
    """Generate text for one prompt or a batch of prompts.

    Args:
        prompts: a string, or a list of strings (batched together, left-padded). ``""`` generates from
            ``<|endoftext|>``.
        model: a loaded checkpoint (``from_pretrained(...)``) or a name / path to load.
        config: a :class:`GenerationConfig`; ``**overrides`` replace its fields (``max_new_tokens=50``, ...).
        key: a ``jax.random`` key for sampling (default: ``jax.random.key(seed)``).
        seed: the seed used when no key is given.
        dtype: compute dtype (default: the params' dtype); also the load dtype when ``model`` is a name.
        tokenizer: overrides the checkpoint's tokenizer.
        return_full_text: prepend the prompt to each continuation.
        skip_special_tokens: drop ``<|endoftext|>`` from the decoded text.
        assistant: a loaded draft checkpoint (same tokenizer) for speculative decoding with
            ``num_assistant_tokens`` draft tokens per step.

    Returns:
        For one prompt: a string, or a list of ``num_return_sequences`` strings. For a list of prompts: a list
        with one such entry per prompt.
    """
    model_config, params, tok, config = _prepare(model, dtype, tokenizer, config, overrides)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise ValueError("prompts is empty")
    ids = [tok.encode(t) for t in texts]
    draft = {} if assistant is None else dict(assistant_params=assistant.params, assistant_config=assistant.config)
    out = generate(params, ids, key=_resolve_key(key, seed, config), config=config, model_config=model_config,
                   dtype=dtype, tokenizer=tok, **draft)
    n = config.num_return_sequences
    decoded = [tok.decode(row, skip_special_tokens=skip_special_tokens) for row in out.new_tokens()]
    if return_full_text:
        decoded = [texts[i // n] + d for i, d in enumerate(decoded)]
    grouped = [decoded[i * n : (i + 1) * n] if n > 1 else decoded[i] for i in range(len(texts))]
    return grouped[0] if single else grouped


def stream_text(
    prompt: str,
    model: Any = "gpt2",
    config: GenerationConfig | None = None,
    *,
    key=None,
    seed: int = 0,
    dtype: Any = None,
    tokenizer: GPT2Tokenizer | None = None,
    skip_special_tokens: bool = True,
    **overrides: Any,
) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece as tokens are produced (greedy or sampling).

    Pieces split only at whole UTF-8 characters; their concatenation equals ``generate_text(prompt, ...)`` with
    the same arguments and key. Arguments as :func:`generate_text`.
    """
    model_config, params, tok, config = _prepare(model, dtype, tokenizer, config, overrides)
    if config.num_return_sequences != 1:
        raise ValueError("stream_text streams one sequence: num_return_sequences must be 1")
    decoder = StreamingDecoder(tok, skip_special_tokens=skip_special_tokens)
    for step in stream(params, [tok.encode(prompt)], key=_resolve_key(key, seed, config), config=config,
                       model_config=model_config, dtype=dtype):
        if not bool(np.asarray(step.active)[0]):
            break
        piece = decoder.push(int(step.tokens[0]))
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
