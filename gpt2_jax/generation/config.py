"""GenerationConfig: a frozen, hashable description of one decoding request.

The fields and their meaning follow Hugging Face's ``GenerationConfig``. They fall into two groups:

* **structural** fields change the compiled program (``do_sample``, ``num_beams``, ``num_return_sequences``,
  ``no_repeat_ngram_size``, ``early_stopping``, the number of eos ids, ``return_logprobs``) and are passed to
  ``jax.jit`` as part of a static argument;
* **knobs** (``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``min_new_tokens``,
  ``max_new_tokens``, ``length_penalty``, the eos and pad ids) are passed as traced arrays, so changing them never
  recompiles. ``max_new_tokens`` is traced below a static cap (the next power of two, see
  :func:`gpt2_jax.generation.engine.new_token_cap`).

Every check that does not need the prompt runs in ``__post_init__``, so a bad value fails when the config is built,
long before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

EarlyStopping = Union[bool, str]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_eos(value: Any) -> int | tuple[int, ...] | None:
    if value is None or _is_int(value):
        return value
    try:
        ids = tuple(value)
    except TypeError:
        raise ValueError(f"eos_token_id must be an int, a sequence of ints or None, got {value!r}") from None
    if not all(_is_int(i) for i in ids):
        raise ValueError(f"eos_token_id must hold ints, got {value!r}")
    return ids


def _ids(value: Any, name: str) -> tuple[int, ...]:
    try:
        ids = tuple(value)
    except TypeError:
        raise ValueError(f"GenerationConfig.{name} must be a sequence of token ids, got {value!r}") from None
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"GenerationConfig.{name} must hold non-negative ints, got {value!r}")
    return ids


def _id_sequences(value: Any, name: str) -> tuple[tuple[int, ...], ...] | None:
    """``[[ids], ...]`` -> a tuple of non-empty id tuples (hashable), or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"GenerationConfig.{name} must be a list of token-id lists, got {value!r}")
    seqs = tuple(_ids(v, name) for v in value)
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError(f"GenerationConfig.{name} must be a non-empty list of non-empty token-id lists, got {value!r}")
    return seqs


def _sequence_bias(value: Any) -> tuple[tuple[tuple[int, ...], float], ...] | None:
    """``{(ids): bias}`` or ``[[ids], bias]`` pairs -> a tuple of ``(ids, bias)`` (hashable), or None."""
    if value is None:
        return None
    pairs = list(value.items()) if isinstance(value, dict) else list(value)
    if not pairs:
        raise ValueError("GenerationConfig.sequence_bias must not be empty")
    out = {}
    for pair in pairs:
        try:
            ids, bias = pair
        except (TypeError, ValueError):
            raise ValueError(f"GenerationConfig.sequence_bias entries must be (ids, bias) pairs, got {pair!r}") from None
        ids = _ids(ids, "sequence_bias")
        if not ids or isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"GenerationConfig.sequence_bias entries must be (non-empty ids, float), got {pair!r}")
        out[ids] = float(bias)
    return tuple(out.items())


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode: budget, search strategy, sampling knobs and special ids (Hugging Face names and semantics).

    Attributes:
        max_new_tokens: how many tokens to generate at most (the traced budget).
        max_length: if set, replaces ``max_new_tokens`` by ``max_length`` minus the longest prompt (Hugging Face's
            total-length budget); None (default) uses ``max_new_tokens``.
        min_new_tokens: eos ids are masked out until this many tokens have been generated.
        do_sample: sample from the processed distribution; False picks the argmax (greedy or beam search).
        temperature: logits are divided by it when sampling (must be > 0 when ``do_sample``; ignored otherwise).
        top_k: keep the ``top_k`` highest logits (ties at the threshold kept); 0 disables. Sampling only.
        top_p: nucleus filtering: drop the tokens whose ascending cumulative probability is ``<= 1 - top_p``,
            always keeping the most likely one; 1.0 disables. Must be in (0, 1]. Sampling only.
        repetition_penalty: CTRL penalty on every token already in the row (prompt padding excluded): a logit
            ``x`` becomes ``x / p`` if ``x > 0`` else ``x * p``. 1.0 disables; must be > 0.
        no_repeat_ngram_size: forbid any n-gram of this size from occurring twice in a row; 0 disables.
        num_beams: 1 for greedy / sampling, more for beam search.
        length_penalty: beam search: a finished hypothesis scores ``sum_logprobs / new_tokens ** length_penalty``.
        early_stopping: beam search: True stops a row as soon as ``num_beams`` hypotheses are finished; False
            stops when the best running beam (at its current length) cannot beat the worst finished one;
            ``"never"`` only stops when no better hypothesis is possible at all (Hugging Face's semantics).
        num_return_sequences: sequences returned per prompt (sampling: independent samples; beam search: the
            best ``num_return_sequences`` of ``num_beams`` hypotheses).
        eos_token_id: one id or several; None takes the model config's; ``()`` never stops before the budget.
        pad_token_id: the id written after a row has finished (and used for prompt padding in the output);
            None takes the model config's, then the first eos id (or 0 without one).
        bos_token_id: the prompt used for an empty prompt; None takes the model config's bos, then eos.
        return_logprobs: also return, for every generated token, its log-probability under the processed
            distribution that picked it (sampling / greedy only).
        min_p: sampling: drop tokens whose probability is below ``min_p`` times the top token's (after
            temperature); None disables. In [0, 1].
        typical_p: sampling: locally typical sampling mass in (0, 1]; 1.0 disables.
        epsilon_cutoff: sampling: drop tokens of probability below it; 0.0 disables. In [0, 1).
        eta_cutoff: sampling: eta sampling (entropy-dependent cutoff); 0.0 disables. In [0, 1).
        bad_words_ids: token sequences that may never be generated (the last token of a sequence is banned
            where the preceding tokens match; a single eos id is ignored, as in Hugging Face).
        sequence_bias: ``{(ids...): bias}`` (or ``[[ids], bias]`` pairs): ``bias`` is added to the last token's
            logit where the preceding ids match (always for one-token sequences).
        suppress_tokens: ids whose logits are always ``-inf``.
        begin_suppress_tokens: ids suppressed at the first generated step.
        forced_bos_token_id: forced as the first generated token when the (padded) prompt is one token long.
        forced_eos_token_id: id(s) forced as the last token of the budget.
        renormalize_logits: log-softmax the processed logits at the end of the processors.
        exponential_decay_length_penalty: ``(start, factor)``: after ``start`` generated tokens the eos logits grow
            by ``|logit| * (factor ** (step - start) - 1)``.
        stop_strings: stop a row once its decoded text contains one of these strings, matched across token
            boundaries like Hugging Face's ``StopStringCriteria`` (needs ``tokenizer=`` in ``generate``).
        output_scores: also return the processed scores of every step (``[rows, steps, vocab]``).
        output_logits: also return the raw logits of every step (``[rows, steps, vocab]``).
        num_assistant_tokens: speculative decoding: draft tokens proposed per step (K >= 1).
        prompt_lookup_num_tokens: prompt-lookup decoding: draft tokens copied from an n-gram match in the row;
            None disables.
        max_matching_ngram_size: prompt lookup: the longest trailing n-gram searched for (Hugging Face's default 2).
        assistant_fallback: speculative / prompt-lookup decoding: stop drafting (continue with plain decode steps)
            once the measured tokens per iteration fall below the estimated break-even.
    """

    max_new_tokens: int = 20
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    return_logprobs: bool = False
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None
    begin_suppress_tokens: tuple[int, ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None
    renormalize_logits: bool = False
    exponential_decay_length_penalty: tuple[int, float] | None = None
    stop_strings: tuple[str, ...] | None = None
    output_scores: bool = False
    output_logits: bool = False
    num_assistant_tokens: int = 5
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = 2
    assistant_fallback: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_id", _normalize_eos(self.eos_token_id))
        self._check_new_fields()
        for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be a positive integer, got {value!r}")
        for name in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"GenerationConfig.{name} must be an integer >= 0, got {value!r}")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 1):
            raise ValueError(f"GenerationConfig.max_length must be a positive integer or None, got {self.max_length!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"GenerationConfig.{name} must be a non-negative integer or None, got {value!r}")
        eos = self.eos_ids_or_none()
        if eos is not None and any(i < 0 for i in eos):
            raise ValueError(f"GenerationConfig.eos_token_id must be non-negative, got {self.eos_token_id!r}")
        for name in ("do_sample", "return_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GenerationConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"GenerationConfig.{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"GenerationConfig.temperature must be > 0 when sampling, got {self.temperature!r} "
                "(for greedy decoding set do_sample=False)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.early_stopping not in (True, False, "never") or (
            not isinstance(self.early_stopping, (bool, str))
        ):
            raise ValueError(
                f"GenerationConfig.early_stopping must be True, False or 'never', got {self.early_stopping!r}"
            )
        if self.max_length is None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"GenerationConfig.min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        if self.num_beams > 1:
            if self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"GenerationConfig.num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                    f"({self.num_beams})"
                )
            if self.return_logprobs:
                raise ValueError("GenerationConfig.return_logprobs is not supported with beam search "
                                 "(the output carries sequences_scores instead)")
        elif self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"GenerationConfig.num_return_sequences={self.num_return_sequences} needs do_sample=True or "
                "num_beams > 1 (greedy decoding would return the same sequence every time)"
            )

    def _check_new_fields(self) -> None:
        """Normalise and check the processor, score and speculative fields (hashable tuples, HF's ranges)."""
        set_ = lambda name, value: object.__setattr__(self, name, value)
        for name in ("typical_p", "epsilon_cutoff", "eta_cutoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"GenerationConfig.{name} must be a number, got {value!r}")
            set_(name, float(value))
        if self.min_p is not None:
            if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
                raise ValueError(f"GenerationConfig.min_p must be a number in [0, 1] or None, got {self.min_p!r}")
            set_("min_p", float(self.min_p))
        if not 0.0 < self.typical_p <= 1.0:
            raise ValueError(f"GenerationConfig.typical_p must be in (0, 1], got {self.typical_p!r}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GenerationConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        set_("bad_words_ids", _id_sequences(self.bad_words_ids, "bad_words_ids"))
        set_("sequence_bias", _sequence_bias(self.sequence_bias))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None:
                ids = _ids(value, name)
                set_(name, ids)
        if self.forced_bos_token_id is not None and (not _is_int(self.forced_bos_token_id)
                                                     or self.forced_bos_token_id < 0):
            raise ValueError(f"GenerationConfig.forced_bos_token_id must be a non-negative int, got "
                             f"{self.forced_bos_token_id!r}")
        if self.forced_eos_token_id is not None:
            forced = _ids([self.forced_eos_token_id] if _is_int(self.forced_eos_token_id)
                          else self.forced_eos_token_id, "forced_eos_token_id")
            if not forced:
                raise ValueError("GenerationConfig.forced_eos_token_id must name at least one id")
            set_("forced_eos_token_id", forced[0] if len(forced) == 1 else forced)
        if self.exponential_decay_length_penalty is not None:
            try:
                start, factor = self.exponential_decay_length_penalty
            except (TypeError, ValueError):
                raise ValueError("GenerationConfig.exponential_decay_length_penalty must be (start_index, "
                                 f"decay_factor), got {self.exponential_decay_length_penalty!r}") from None
            if not _is_int(start) or start < 0 or isinstance(factor, bool) or not isinstance(factor, (int, float)):
                raise ValueError("GenerationConfig.exponential_decay_length_penalty must be (int >= 0, float), got "
                                 f"{self.exponential_decay_length_penalty!r}")
            set_("exponential_decay_length_penalty", (int(start), float(factor)))
        if self.stop_strings is not None:
            strings = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
            if not strings or not all(isinstance(s, str) and s for s in strings):
                raise ValueError(f"GenerationConfig.stop_strings must be non-empty strings, got {self.stop_strings!r}")
            set_("stop_strings", strings)
        for name in ("renormalize_logits", "output_scores", "output_logits", "assistant_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GenerationConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not _is_int(self.num_assistant_tokens) or self.num_assistant_tokens < 1:
            raise ValueError(f"GenerationConfig.num_assistant_tokens must be an integer >= 1, got "
                             f"{self.num_assistant_tokens!r}")
        if self.prompt_lookup_num_tokens is not None and (not _is_int(self.prompt_lookup_num_tokens)
                                                          or self.prompt_lookup_num_tokens < 1):
            raise ValueError(f"GenerationConfig.prompt_lookup_num_tokens must be an integer >= 1 or None, got "
                             f"{self.prompt_lookup_num_tokens!r}")
        if not _is_int(self.max_matching_ngram_size) or self.max_matching_ngram_size < 1:
            raise ValueError(f"GenerationConfig.max_matching_ngram_size must be an integer >= 1, got "
                             f"{self.max_matching_ngram_size!r}")

    @property
    def rows_per_prompt(self) -> int:
        """Rows a decode step computes for each prompt: the beams (beam search) or the return sequences."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    def eos_ids_or_none(self) -> tuple[int, ...] | None:
        """The eos ids as a tuple, or None when they are to be taken from the model config."""
        if self.eos_token_id is None:
            return None
        return (self.eos_token_id,) if _is_int(self.eos_token_id) else tuple(self.eos_token_id)

    def __repr__(self) -> str:
        """Only the fields that differ from the defaults."""
        from ..reprs import short_dataclass_repr

        return short_dataclass_repr(self)

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
