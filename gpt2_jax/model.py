"""GPT-2 as Flax Linen modules over a plain params pytree whose names mirror Hugging Face's.

Params of ``GPT2Model`` and ``GPT2LMHeadModel`` (the LM head is tied to ``wte``)::

    wte/embedding [vocab, n_embd]          wpe/embedding [n_positions, n_embd]
    h/<i>/ln_1/{scale,bias}                h/<i>/attn/c_attn/{kernel [n_embd, 3 n_embd], bias}
    h/<i>/attn/c_proj/{kernel,bias}        h/<i>/ln_2/{scale,bias}
    h/<i>/mlp/c_fc/{kernel [n_embd, n_inner], bias}   h/<i>/mlp/c_proj/{kernel [n_inner, n_embd], bias}
    ln_f/{scale,bias}

Dense kernels are ``[in, out]``, exactly Hugging Face's ``Conv1D`` weights. Every forward pass takes an optional
:class:`~gpt2_jax.kv_cache.KVCache` and returns the updated one; nothing is hidden in mutable collections.

Positions: when ``position_ids`` is not given they are counted over the real tokens of ``attention_mask``
(``cumsum(mask) - 1``), so a left-padded row gets the same positions as the same row unpadded. Hugging Face's
forward uses ``arange`` instead (its ``generate`` counts over the mask as we do); pass ``position_ids`` explicitly
to reproduce its forward on left-padded input.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import backend, narrow_dots, weights_first
from .backend import Tuning
from .config import GPT2Config
from .kv_cache import KVCache, advance
from .layers import (Embed, GPT2BlockStack, LayerNorm, check_remat_policy, constrain_rows, dense, gathered, get_variant,
                     hook_point, hook_scope, hooks_kwarg, scanned_blocks)
from .losses import IGNORE_INDEX, causal_lm_loss, cross_entropy

Dtype = Any

#: Under :attr:`~gpt2_jax.backend.Tuning.kernels_as_lhs`, the tied LM head of at most this many rows (a decode or
#: verification step: generation keeps the last position's logits only) is computed as ``(wte @ hidden^T)^T``. Its
#: ~0.15 GB (gpt2, float32) is then read in place rather than repacked per call; at training's thousands of rows
#: both forms measured the same, so those keep the einsum (and its plain gradient).
LM_HEAD_WEIGHTS_FIRST_MAX_ROWS = 256


# Outputs -------------------------------------------------------------------------------------------------------
@struct.dataclass
class GPT2Output:
    """Output of :class:`GPT2Model`.

    ``hidden_states`` (when requested) holds ``n_layer + 1`` arrays ``[batch, seq, n_embd]``: the embeddings, the
    output of each block but the last, and the final (layer-normed) state, as Hugging Face returns them.
    ``attentions`` holds one ``[batch, n_head, seq, keys]`` array per layer.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    cache: KVCache | None = None


@struct.dataclass
class CausalLMOutput:
    """Output of :class:`GPT2LMHeadModel`: ``logits [batch, seq, vocab]`` and the mean LM ``loss`` if labels."""

    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    cache: KVCache | None = None


@struct.dataclass
class DoubleHeadsOutput:
    """Output of :class:`GPT2DoubleHeadsModel`: LM ``logits [batch, choices, seq, vocab]``, ``mc_logits
    [batch, choices]`` and their losses when labels are given."""

    logits: jax.Array
    mc_logits: jax.Array
    loss: jax.Array | None = None
    mc_loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


@struct.dataclass
class SequenceClassifierOutput:
    """Output of :class:`GPT2ForSequenceClassification`: ``logits [batch, num_labels]`` pooled at each row's
    last non-pad token."""

    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


# Input checks (run only on concrete values: inside jit the arrays are tracers) ---------------------------------
def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _check_ids(name: str, ids, vocab_size: int) -> None:
    if _is_concrete(ids) and ids.size:
        ids = np.asarray(ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains id {bad}, outside the vocabulary [0, {vocab_size})")


def _normalize_head_mask(head_mask, config: GPT2Config):
    """``[n_head]`` or ``[n_layer, n_head]`` -> ``[n_layer, n_head]`` float (None stays None)."""
    if head_mask is None:
        return None
    head_mask = jnp.asarray(head_mask, jnp.float32)
    if head_mask.shape == (config.n_head,):
        head_mask = jnp.broadcast_to(head_mask, (config.n_layer, config.n_head))
    if head_mask.shape != (config.n_layer, config.n_head):
        raise ValueError(
            f"head_mask must have shape [n_head={config.n_head}] or [n_layer={config.n_layer}, n_head], "
            f"got {list(head_mask.shape)}"
        )
    return head_mask


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Position ids counted over real tokens: ``start + cumsum(mask) - 1``, 0 at padding. ``[batch, T]``."""
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.asarray(start, jnp.int32).reshape(-1, 1) + jnp.cumsum(mask, axis=1) - 1
    return jnp.where(mask > 0, positions, 0)


def visibility(token_mask: jax.Array, cache: KVCache | None = None) -> jax.Array:
    """Which key slot each query may attend to: causal and not padding. A pure function of the masks.

    Args:
        token_mask: ``[batch, T]`` bool, True for the real tokens of the input.
        cache: the cache the input is written into (at ``cache.index``), or None.

    Returns:
        ``visible [batch, 1, T, S]`` bool (``S = T`` without a cache, ``cache.max_length`` with one).
    """
    length = token_mask.shape[1]
    if cache is None:
        slot_valid, query_slot, key_slot = token_mask, jnp.arange(length), jnp.arange(length)
    else:
        slot_valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
        query_slot = cache.index + jnp.arange(length)
        key_slot = jnp.arange(cache.max_length)
    causal = key_slot[None, :] <= query_slot[:, None]  # [T, S]
    return (causal[None, :, :] & slot_valid[:, None, :])[:, None]  # [batch, 1, T, S]


# Models --------------------------------------------------------------------------------------------------------
class _GPT2Base(nn.Module):
    """The transformer shared by every GPT-2 head: embeddings, blocks and the final layer norm.

    Attributes:
        config: the architecture (``config.scan_layers`` stacks the blocks under ``nn.scan``; ``config.variant``
            picks the block, attention and MLP classes, :func:`gpt2_jax.layers.register_variant`).
        dtype: activation / matmul dtype.
        param_dtype: dtype of freshly initialised params.
        tuning: backend formulation choices (:class:`gpt2_jax.backend.Tuning`); None: the defaults of JAX's
            default backend (:func:`gpt2_jax.backend.tuning_for`).
        remat_policy: rematerialise each block in the backward pass
            (:data:`gpt2_jax.layers.REMAT_POLICIES`: ``none``, ``full``, ``dots_saveable``, ``minimal``).
        hooks: a hook runner (:mod:`gpt2_jax.interp`, built by ``run_with_hooks`` / ``run_with_cache`` and the
            generation engine) that every hook point passes through; None (the default) adds nothing to the
            program. Needs the unrolled blocks (``scan_layers=False``) and ``remat_policy='none'``.
        float32_logits: the LM head returns its logits in float32 whatever ``dtype``; the matmul still reads
            ``dtype`` operands and accumulates in float32 (the few-row weights-first product of a decode step,
            :mod:`gpt2_jax.weights_first`, is computed in ``dtype`` and upcast): a float32 loss then reads the
            product as computed, not a ``dtype`` rounding of it (the CPU's mixed-precision train step gets the
            same from :func:`gpt2_jax.head_loss.tied_head_cross_entropy`, the head and its loss in one function).
    """

    config: GPT2Config
    dtype: Dtype = jnp.float32  # activation / matmul dtype
    param_dtype: Dtype = jnp.float32
    tuning: Tuning | None = None
    remat_policy: str = "none"
    hooks: Any = None
    float32_logits: bool = False

    def setup(self):
        cfg = self.config
        embed = lambda n: Embed(
            n, cfg.n_embd, embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=self.dtype, param_dtype=self.param_dtype,
        )
        self.wte = embed(cfg.vocab_size)
        if get_variant(cfg.variant).learned_positions:
            self.wpe = embed(cfg.n_positions)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype,
                              hooks=hook_scope(self.hooks, "ln_final"))

    @nn.compact
    def transformer(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> GPT2Output:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            input_ids = jnp.asarray(input_ids)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
            _check_ids("input_ids", input_ids, cfg.vocab_size)
            batch, length = input_ids.shape
            hidden = hook_point(self.hooks, "hook_embed", self.wte(input_ids))  # [batch, T, n_embd]
        else:
            inputs_embeds = jnp.asarray(inputs_embeds)
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.n_embd:
                raise ValueError(
                    f"inputs_embeds must be [batch, seq, n_embd={cfg.n_embd}], got {list(inputs_embeds.shape)}"
                )
            batch, length, _ = inputs_embeds.shape
            hidden = hook_point(self.hooks, "hook_embed", inputs_embeds.astype(self.dtype))
        if length == 0:
            raise ValueError("the input sequence is empty")
        limit = cache.max_length if cache is not None else cfg.n_positions
        if length > limit:
            what = f"the cache's max_length ({limit})" if cache is not None else f"n_positions ({limit})"
            raise ValueError(f"sequence length {length} exceeds {what}")

        if attention_mask is None:
            token_mask = jnp.ones((batch, length), bool)
        else:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (batch, length):
                raise ValueError(
                    f"attention_mask has shape {list(attention_mask.shape)}, expected [batch, seq] = {[batch, length]}"
                )
            token_mask = attention_mask.astype(bool)

        if position_ids is None:
            start = cache.next_position if cache is not None else 0
            position_ids = positions_from_mask(token_mask, start)
        else:
            position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (batch, length))
            _check_ids("position_ids", position_ids, cfg.n_positions)
        if self.hooks is not None:
            self._check_hookable()
            self.hooks.bind(positions=position_ids, token_mask=token_mask)
        if get_variant(cfg.variant).learned_positions:
            hidden = hidden + hook_point(self.hooks, "hook_pos_embed", self.wpe(position_ids))
        if token_type_ids is not None:
            token_type_ids = jnp.broadcast_to(jnp.asarray(token_type_ids), (batch, length))
            _check_ids("token_type_ids", token_type_ids, cfg.vocab_size)
            hidden = hidden + self.wte(token_type_ids)
        hidden = constrain_rows(self.drop(hidden, deterministic=deterministic))  # [batch, T, n_embd]
        embedded = hidden

        visible = visibility(token_mask, cache)  # [batch, 1, T, S]
        head_mask = _normalize_head_mask(head_mask, cfg)
        if cache is not None and cache.stacked != cfg.scan_layers:
            raise ValueError(
                f"the cache is {'stacked' if cache.stacked else 'per layer'} but the model has "
                f"scan_layers={cfg.scan_layers}; build it with KVCache.init(config, ...) for this config"
            )
        fields = dict(
            config=cfg, tuning=self._resolved_tuning(),
            dtype=self.dtype, param_dtype=self.param_dtype, deterministic=deterministic,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            causal_only=attention_mask is None and cache is None,
        )
        remat_policy = check_remat_policy(self.remat_policy)
        if cfg.scan_layers:
            hidden, block_outputs, attentions, kv = scanned_blocks(
                embedded, position_ids, visible, cache, head_mask, fields=fields, remat_policy=remat_policy)
        else:
            hidden, block_outputs, attentions, kv = GPT2BlockStack(
                **fields, remat_policy=remat_policy, name="h", **hooks_kwarg(self.hooks))(
                embedded, position_ids, visible, cache, head_mask)
        hidden = self.ln_f(hidden)
        new_cache = advance(cache, kv[0], kv[1], token_mask) if cache is not None else None
        return GPT2Output(
            last_hidden_state=hidden,
            hidden_states=(embedded, *block_outputs[:-1], hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            cache=new_cache,
        )

    def _check_hookable(self) -> None:
        """Hooks run on the unrolled blocks without remat (they record and replace activations as the Python
        code of each block is traced; ``nn.scan`` and ``nn.remat`` trace a block in an inner program)."""
        if self.config.scan_layers:
            raise ValueError(
                "hooks need the unrolled blocks: this config has scan_layers=True; use "
                "config, params = gpt2_jax.with_scan_layers(config, params, False) for the same model unrolled")
        if self.remat_policy != "none":
            raise ValueError(f"hooks need remat_policy='none' (got {self.remat_policy!r})")

    def _resolved_tuning(self) -> Tuning:
        """``tuning``, or when None the defaults of JAX's default backend (:func:`gpt2_jax.backend.tuning_for`)."""
        return self.tuning if self.tuning is not None else backend.tuning_for()

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: ``hidden [..., n_embd] @ wte.T -> [..., vocab]`` (an einsum: no transposed copy; in bfloat16
        under :attr:`~gpt2_jax.backend.Tuning.row_major_bf16_dots`, :func:`gpt2_jax.narrow_dots.matmul`; for the
        few rows of a decode step under :attr:`~gpt2_jax.backend.Tuning.kernels_as_lhs`, ``(wte @ hidden^T)^T``).
        The logits are in ``dtype``, or float32 with :attr:`float32_logits`."""
        wte = gathered(self.wte.embedding).astype(self.dtype)  # [vocab, n_embd]
        logits_dtype = jnp.float32 if self.float32_logits else self.dtype
        tuning = self._resolved_tuning()
        if narrow_dots.applies(self.dtype, tuning):  # a float32 product
            logits = narrow_dots.matmul(hidden.astype(self.dtype), wte, w_transposed=True).astype(logits_dtype)
            return constrain_rows(logits)  # [..., vocab]
        if tuning.kernels_as_lhs and math.prod(hidden.shape[:-1]) <= LM_HEAD_WEIGHTS_FIRST_MAX_ROWS:
            logits = weights_first.matmul_out_in(hidden, wte)
        else:
            logits = jnp.einsum("...d,vd->...v", hidden, wte,
                                preferred_element_type=jnp.float32 if self.float32_logits else None)
        return constrain_rows(logits.astype(jnp.float32) if self.float32_logits else logits)  # [..., vocab]


def _check_labels(labels, num_classes: int, name: str = "labels") -> None:
    if _is_concrete(labels) and labels.size and jnp.issubdtype(labels.dtype, jnp.integer):
        labels = np.asarray(labels)
        kept = labels[labels != IGNORE_INDEX]
        if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= num_classes):
            bad = int(kept.min()) if int(kept.min()) < 0 else int(kept.max())
            raise ValueError(f"{name} contains {bad}, outside [0, {num_classes}) (use {IGNORE_INDEX} to ignore)")


class GPT2Model(_GPT2Base):
    """The bare GPT-2 transformer: returns the final hidden state (after ``ln_f``)."""

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> GPT2Output:
        """Run the transformer.

        Args:
            input_ids: ``[batch, seq]`` int token ids (or pass ``inputs_embeds [batch, seq, n_embd]``).
            attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding (left or right).
            position_ids: ``[batch, seq]``; by default counted over the real tokens (see the module docstring).
            token_type_ids: ``[batch, seq]`` ids embedded through ``wte`` and added, as Hugging Face does.
            head_mask: ``[n_head]`` or ``[n_layer, n_head]`` multipliers of the attention probabilities.
            cache: a :class:`KVCache`; the new keys/values are written at ``cache.index`` and the updated cache
                is returned in the output.
            deterministic: False enables dropout, drawing from the ``'dropout'`` rng passed to ``apply``.
            output_attentions: return every layer's attention probabilities.
            output_hidden_states: return the ``n_layer + 1`` hidden states.
        """
        return self.transformer(
            input_ids, attention_mask, position_ids, token_type_ids, head_mask, inputs_embeds, cache,
            deterministic, output_attentions, output_hidden_states,
        )


class GPT2LMHeadModel(_GPT2Base):
    """GPT-2 with the language-model head tied to ``wte`` (same params as :class:`GPT2Model`)."""

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits ``[batch, seq, vocab]`` and, given ``labels [batch, seq]``, the shifted next-token loss.

        Takes the arguments of :meth:`GPT2Model.__call__`, plus ``labels`` (positions labelled -100 are
        ignored; ``labels = input_ids`` is the usual choice) and ``logits_to_keep``: when positive, only the
        last ``logits_to_keep`` positions get logits (what generation needs; the loss then cannot be computed).
        """
        out = self.transformer(
            input_ids, attention_mask, position_ids, token_type_ids, head_mask, inputs_embeds, cache,
            deterministic, output_attentions, output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            if labels is not None:
                raise ValueError("labels cannot be combined with logits_to_keep")
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_logits(hidden)  # [batch, seq, vocab]
        loss = None
        if labels is not None:
            labels = jnp.asarray(labels)
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels has shape {list(labels.shape)}, expected {list(logits.shape[:2])}")
            _check_labels(labels, self.config.vocab_size)
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits, loss, out.hidden_states, out.attentions, out.cache)


class SequenceSummary(nn.Module):
    """Hugging Face's ``SequenceSummary`` for the multiple-choice head: pool, dropout, project, activate."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, cls_index=None, deterministic=True):
        """``hidden [..., seq, n_embd]``, ``cls_index [...]`` -> ``[..., width]`` (width 1 for double heads)."""
        cfg = self.config
        if cfg.summary_type == "last":
            pooled = hidden[..., -1, :]
        elif cfg.summary_type == "first":
            pooled = hidden[..., 0, :]
        elif cfg.summary_type == "mean":
            pooled = hidden.mean(axis=-2)
        else:  # cls_index
            if cls_index is None:
                cls_index = jnp.full(hidden.shape[:-2], hidden.shape[-2] - 1, jnp.int32)
            pooled = jnp.take_along_axis(hidden, cls_index[..., None, None].astype(jnp.int32), axis=-2)[..., 0, :]
        pooled = nn.Dropout(cfg.summary_first_dropout)(pooled, deterministic=deterministic)
        if cfg.summary_use_proj:
            width = 1 if cfg.summary_proj_to_labels else cfg.n_embd
            pooled = dense(width, cfg.initializer_range, self.dtype, self.param_dtype, "summary")(pooled)
        if cfg.summary_activation == "tanh":
            pooled = jnp.tanh(pooled)
        return nn.Dropout(cfg.summary_last_dropout)(pooled, deterministic=deterministic)


class GPT2DoubleHeadsModel(_GPT2Base):
    """GPT-2 with the tied LM head and a multiple-choice head (params add ``multiple_choice_head/summary``)."""

    def setup(self):
        super().setup()
        self.multiple_choice_head = SequenceSummary(self.config, self.dtype, self.param_dtype)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        mc_token_ids=None,
        labels=None,
        mc_labels=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> DoubleHeadsOutput:
        """Inputs are ``[batch, choices, seq]`` (embeds ``[batch, choices, seq, n_embd]``).

        ``mc_token_ids [batch, choices]`` picks the token whose state scores each choice (default: the last);
        ``labels [batch, choices, seq]`` gives the LM loss, ``mc_labels [batch]`` the multiple-choice loss.
        Hidden states come as ``[batch, choices, seq, n_embd]`` (every one of them; Hugging Face reshapes only the
        last and leaves the others flattened) and attentions flattened to ``[batch * choices, n_head, seq, seq]``.
        """
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        lead = jnp.shape(source)[:2]
        if len(jnp.shape(source)) < 3:
            raise ValueError(f"double-heads inputs must be [batch, choices, seq], got {list(jnp.shape(source))}")
        flat = lambda x: None if x is None else jnp.asarray(x).reshape(-1, *jnp.shape(x)[2:])
        out = self.transformer(
            flat(input_ids), flat(attention_mask), flat(position_ids), flat(token_type_ids), head_mask,
            flat(inputs_embeds), None, deterministic, output_attentions, output_hidden_states,
        )
        hidden = out.last_hidden_state.reshape(*lead, *out.last_hidden_state.shape[1:])  # [batch, choices, T, D]
        logits = self.lm_logits(hidden)
        mc_logits = self.multiple_choice_head(hidden, mc_token_ids, deterministic)[..., 0]  # [batch, choices]
        loss = mc_loss = None
        if labels is not None:
            _check_labels(jnp.asarray(labels), self.config.vocab_size)
            loss = causal_lm_loss(logits, jnp.asarray(labels))
        if mc_labels is not None:
            _check_labels(jnp.asarray(mc_labels), mc_logits.shape[-1], "mc_labels")
            mc_loss = cross_entropy(mc_logits, jnp.asarray(mc_labels))
        hidden_states = out.hidden_states
        if hidden_states is not None:
            hidden_states = tuple(h.reshape(*lead, *h.shape[1:]) for h in hidden_states)
        return DoubleHeadsOutput(logits, mc_logits, loss, mc_loss, hidden_states, out.attentions)


class GPT2ForSequenceClassification(_GPT2Base):
    """GPT-2 with a linear ``score`` head (no bias) read at each row's last non-pad token."""

    def setup(self):
        super().setup()
        self.score = nn.Dense(
            self.config.num_labels, use_bias=False, kernel_init=nn.initializers.normal(self.config.initializer_range),
            dtype=self.dtype, param_dtype=self.param_dtype,
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput:
        """Pooled logits ``[batch, num_labels]``.

        The pooled token is the rightmost one that is not ``config.pad_token_id`` (left or right padding);
        without a pad id (or with ``inputs_embeds``) it is the last position, and batches above one need a pad
        id, as in Hugging Face. The loss follows Hugging Face's problem types: regression (MSE) for one label,
        single-label cross-entropy for integer labels, multi-label BCE for float labels ``[batch, num_labels]``.
        """
        out = self.transformer(
            input_ids, attention_mask, position_ids, token_type_ids, head_mask, inputs_embeds, None,
            deterministic, output_attentions, output_hidden_states,
        )
        logits = self.score(out.last_hidden_state)  # [batch, T, num_labels]
        batch, length = logits.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("sequence classification of a batch above 1 needs config.pad_token_id")
        if pad is None or input_ids is None:
            last = jnp.full((batch,), length - 1)
        else:
            last = jnp.argmax(jnp.arange(length) * (jnp.asarray(input_ids) != pad), axis=-1)
        pooled = logits[jnp.arange(batch), last]  # [batch, num_labels]
        loss = None
        if labels is not None:
            labels = jnp.asarray(labels)
            num_labels = self.config.num_labels
            if num_labels == 1:
                loss = jnp.mean(jnp.square(pooled.squeeze(-1).astype(jnp.float32) - labels.reshape(-1)))
            elif jnp.issubdtype(labels.dtype, jnp.integer):
                _check_labels(labels, num_labels)
                loss = cross_entropy(pooled, labels.reshape(-1))
            else:
                x, y = pooled.astype(jnp.float32), labels.astype(jnp.float32)
                loss = jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))))
        return SequenceClassifierOutput(pooled, loss, out.hidden_states, out.attentions)


def init_params(key: jax.Array, config: GPT2Config, model_cls: type[nn.Module] = GPT2LMHeadModel,
                param_dtype: Dtype = jnp.float32) -> dict:
    """Freshly initialised params with GPT-2's scheme: normal(initializer_range) weights and embeddings,
    residual projections (``c_proj``) at ``initializer_range / sqrt(2 * n_layer)``, zero biases, unit norms.

    Args:
        key: a ``jax.random`` key.
        config: the architecture.
        model_cls: which module's params (heads add ``multiple_choice_head`` or ``score``).
        param_dtype: dtype of the params.

    Returns:
        The params pytree (a nested dict, no ``{'params': ...}`` wrapper); stacked ``h/... [n_layer, ...]`` for a
        ``scan_layers`` config, with the same values as the per-layer tree of the same key.

    The initialiser is traced and compiled once per ``(config, model_cls, param_dtype)`` and reused by later calls
    (only ``key`` is an argument of the compiled program). Params larger than :data:`INIT_GROUP_BYTES` (gpt2-large
    and up in float32) are made instead by a few programs that each compute a group of leaves (the same values):
    one program for all of them holds every leaf's random bits at once and peaks at ~2.7x the params' bytes.
    """
    param_dtype = jnp.dtype(param_dtype)  # jnp.float32, np.float32 and "float32" share one compiled initialiser
    init, static = _init_params_jit, dict(config=config, model_cls=model_cls, param_dtype=param_dtype)
    try:
        hash(config)
    except TypeError:  # a config with an unhashable field cannot be a static argument: compile for this call only
        init, static = jax.jit(lambda k: _init_params_traced(k, config, model_cls, param_dtype)), {}
    if isinstance(key, jax.core.Tracer):  # under jit / eval_shape: one program, nothing to gain from groups
        return init(key, **static)
    shapes = init.eval_shape(key, **static)  # the jit's own trace: the call below reuses it
    if sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)) > INIT_GROUP_BYTES:
        return _init_params_in_groups(key, config, model_cls, param_dtype, shapes)
    return init(key, **static)


#: Params above this many bytes are initialised group by group, each group of leaves at most this large.
INIT_GROUP_BYTES = 256 * 2**20


def _init_params_in_groups(key: jax.Array, config: GPT2Config, model_cls: type[nn.Module], param_dtype,
                           shapes) -> dict:
    """:func:`init_params` for large params: the whole initialiser traced once per group of leaves of at most
    :data:`INIT_GROUP_BYTES`, returning only that group (XLA drops the rest), so the peak is the params plus one
    group's temporaries. Each leaf gets exactly the values of the single program (same keys, same ops)."""
    flat_shapes, treedef = jax.tree_util.tree_flatten(shapes)
    groups: list[list[int]] = [[]]
    size = 0
    for i, leaf in enumerate(flat_shapes):
        n = leaf.size * leaf.dtype.itemsize
        if groups[-1] and size + n > INIT_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    leaves: list[Any] = [None] * len(flat_shapes)
    for group in groups:
        def init_group(k, group=tuple(group)):
            flat = jax.tree_util.tree_leaves(_init_params_traced(k, config, model_cls, param_dtype))
            return [flat[i] for i in group]

        for i, value in zip(group, jax.block_until_ready(jax.jit(init_group)(key))):
            leaves[i] = value
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _init_params_traced(key: jax.Array, config: GPT2Config, model_cls: type[nn.Module], param_dtype) -> dict:
    """The body :func:`init_params` compiles: ``model_cls(config).init`` on a one-token input. A ``scan_layers``
    config gets the unrolled model's params stacked, so one key gives the same model in either layout."""
    if config.scan_layers:
        from .stacking import stack_layers

        return stack_layers(_init_params_traced(key, config.replace(scan_layers=False), model_cls, param_dtype))
    model = model_cls(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1, 1) if model_cls is GPT2DoubleHeadsModel else (1, 1), jnp.int32)
    return model.init(key, ids)["params"]


# One jit whose cache is keyed on the static (config, model class, param dtype): one trace per architecture.
_init_params_jit = jax.jit(_init_params_traced, static_argnames=("config", "model_cls", "param_dtype"))


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
