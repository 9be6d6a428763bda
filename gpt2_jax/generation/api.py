"""``generate()``: the one entry point of generation, dispatching a checked request to sampling / greedy decoding,
beam search, or speculative (assisted) and prompt-lookup decoding.

Every check runs on the host in :func:`~gpt2_jax.generation.request.build_request` (and, for an assistant,
:func:`~gpt2_jax.generation.speculative.check_assistant`) before anything is traced or compiled.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..config import GPT2Config
from .config import GenerationConfig
from .request import GenerationOutput, build_request, request_key


def generate(
    params,
    input_ids,
    attention_mask=None,
    key=None,
    config: GenerationConfig | None = None,
    *,
    model_config: GPT2Config,
    dtype: Any = None,
    logits_processor: Sequence[Any] = (),
    tokenizer: Any = None,
    assistant_params=None,
    assistant_config: GPT2Config | None = None,
    hooks: Sequence[Any] | None = None,
    return_activations: Sequence[str] | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """Generate continuations of a batch of prompts, compiled once per bucket: greedy, sampling, beam search,
    speculative decoding with a draft model, or prompt-lookup decoding.

    Args:
        params: GPT-2 params (``init_params`` / ``from_pretrained``).
        input_ids: ``[batch, seq]`` or ``[seq]`` int ids, or a list of token lists (ragged). Rows may be padded
            on either side when ``attention_mask`` is given; an empty prompt starts from the bos id
            (``<|endoftext|>`` for GPT-2).
        attention_mask: ``[batch, seq]``, 1 for real tokens.
        key: a ``jax.random`` key (or one per prompt); required when ``do_sample``.
        config: a :class:`GenerationConfig` (default: greedy, 20 new tokens).
        model_config: the model's :class:`GPT2Config`.
        dtype: compute dtype (default: the params' dtype).
        logits_processor: the caller's own processor objects, ``(logits [rows, vocab], state) -> logits``
            (:mod:`~gpt2_jax.generation.logits_processors`), applied after the built-in processors and before
            the sampling warpers, as in Hugging Face. A ``flax.struct.dataclass`` keeps its array fields traced.
        tokenizer: a :class:`~gpt2_jax.tokenizer.GPT2Tokenizer` (or a Hugging Face tokenizer); needed for
            ``stop_strings``.
        assistant_params: the draft model's params: speculative decoding with ``num_assistant_tokens`` (K) draft
            tokens per step (greedy output equals plain greedy; sampling keeps the target's distribution).
        assistant_config: the draft model's :class:`GPT2Config` (same vocabulary and tokenizer as the target).
        hooks: ``[(name, fn), ...]`` interventions (:mod:`gpt2_jax.interp`: steering vectors, ablations) applied
            at the prefill and at every decode step inside the compiled loop, with every strategy (beam search: the
            data must broadcast over beams; speculative decoding: in the target's passes, the draft runs unhooked).
            Their array data is traced (new values reuse the compiled program), their code is part of its identity.
        return_activations: hook names (position-major ones: residual, attention q/k/v/z/result, MLP, norms)
            whose activations are returned in ``output.activations[name] [rows, steps, ...]``: for each
            generated token, the activation at the position whose logits picked it.
        **overrides: :class:`GenerationConfig` fields replacing those of ``config``.

    Returns:
        A :class:`~gpt2_jax.generation.request.GenerationOutput`.

    Raises:
        ValueError: bad knobs, ids outside the vocabulary, prompt + ``max_new_tokens`` beyond ``n_positions``,
            sampling without a key, stop strings without a tokenizer, an assistant that does not fit the target;
            all raised before anything is compiled.
    """
    if (assistant_params is None) != (assistant_config is None):
        raise ValueError("speculative decoding needs both assistant_params and assistant_config")
    request = build_request(params, model_config, input_ids, attention_mask, config, dtype,
                            logits_processor=tuple(logits_processor), tokenizer=tokenizer, **overrides)
    key = request_key(request.config, key)
    cfg = request.config
    drafting = assistant_params is not None or cfg.prompt_lookup_num_tokens is not None
    if return_activations and (cfg.num_beams > 1 or drafting):
        raise ValueError("return_activations= works with greedy decoding and sampling, not with beam search or "
                         "speculative / prompt-lookup decoding (hooks= work with every strategy)")
    if cfg.num_beams > 1:
        if drafting:
            raise ValueError("speculative / prompt-lookup decoding does not combine with beam search (num_beams > 1)")
        if cfg.stop_strings is not None:
            raise ValueError("stop_strings are supported with greedy decoding and sampling, not beam search")
        from .beam_search import run_beam_request

        return run_beam_request(params, request, key, hooks=hooks)
    if drafting:
        from .speculative import run_speculative_request

        return run_speculative_request(params, request, key, assistant_params=assistant_params,
                                       assistant_config=assistant_config, hooks=hooks)
    from .sampler import run_request

    if hooks or return_activations:
        return run_request(params, request, key, hooks=hooks, return_activations=return_activations)
    return run_request(params, request, key)
