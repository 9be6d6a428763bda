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

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_id", _normalize_eos(self.eos_token_id))
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
