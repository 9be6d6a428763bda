"""``ActivationCache``: a mapping hook name -> activation, with TransformerLens's analysis helpers.

Helpers follow TransformerLens's ``ActivationCache`` conventions: residual stacks are ``[component, batch, pos,
d_model]``; ``apply_ln`` centres a stack and divides it by the cached ``hook_scale`` of the layer norm that reads
it (the norm's weights are not applied: they belong to the unembedding, as after ``fold_layer_norm``).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import jax.numpy as jnp

from ..config import GPT2Config


@jax.tree_util.register_pytree_node_class
class ActivationCache(Mapping):
    """Activations by hook name (``cache["blocks.0.attn.hook_z"]``), ``grads`` by hook name when a loss was given,
    and the params/config the helpers read (a pytree: it can be returned from ``jax.jit`` and ``jax.vmap``)."""

    def __init__(self, activations: dict, config: GPT2Config, params=None, grads: dict | None = None):
        self.activations = dict(activations)
        self.config = config
        self.params = params
        self.grads = dict(grads or {})

    # Mapping ------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> jax.Array:
        try:
            return self.activations[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self.activations), n=5, cutoff=0.6)
            hint = f"; closest cached: {', '.join(close)}" if close else ""
            raise KeyError(f"{name!r} is not in the cache (run_with_cache(..., names=...) keeps only the "
                           f"requested hooks){hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, {len(self.grads)} grads)"

    # pytree ---------------------------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.activations, self.params, self.grads), self.config

    @classmethod
    def tree_unflatten(cls, config, children):
        activations, params, grads = children
        return cls(activations, config, params, grads)

    # Helpers --------------------------------------------------------------------------------------------------
    def _n_layer(self, layer: int | None) -> int:
        n = self.config.n_layer
        layer = n if layer is None else layer
        if not 0 <= layer <= n:
            raise ValueError(f"layer {layer} is out of range for a {n}-layer model (0..{n})")
        return layer

    def apply_ln_to_stack(self, stack: jax.Array, layer: int | None = None, mlp_input: bool = False) -> jax.Array:
        """``stack [..., batch, pos, d_model]`` centred and divided by the cached scale of the layer norm that
        reads the residual stream at ``layer`` (None or ``n_layer``: ``ln_final``; else ``blocks.{layer}.ln1``,
        or ``ln2`` with ``mlp_input``)."""
        layer = self._n_layer(layer)
        if layer == self.config.n_layer:
            name = "ln_final.hook_scale"
        else:
            name = f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}.hook_scale"
        stack = stack - stack.mean(-1, keepdims=True)
        return stack / self[name]  # scale [batch, pos, 1] broadcasts

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          return_labels: bool = False):
        """The residual stream before each block up to ``layer`` (None: all, plus the final ``resid_post``):
        ``[component, batch, pos, d_model]`` (and the labels with ``return_labels``)."""
        layer = self._n_layer(layer)
        parts, labels = [], []
        for l in range(layer):
            parts.append(self[f"blocks.{l}.hook_resid_pre"]); labels.append(f"{l}_pre")
            if incl_mid:
                parts.append(self[f"blocks.{l}.hook_resid_mid"]); labels.append(f"{l}_mid")
        if layer == self.config.n_layer:
            parts.append(self[f"blocks.{layer - 1}.hook_resid_post"]); labels.append("final_post")
        stack = jnp.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mode: str = "all", apply_ln: bool = False,
                        incl_embeds: bool = True, return_labels: bool = False):
        """The residual stream at ``layer`` as the sum of its parts: embeddings, then each block's ``attn_out``
        and ``mlp_out`` (``mode`` ``"attn"`` / ``"mlp"`` keeps one kind): ``[component, batch, pos, d_model]``."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._n_layer(layer)
        parts, labels = [], []
        if incl_embeds:
            for name in ("hook_embed", "hook_pos_embed"):
                if name in self.activations:
                    parts.append(self[name]); labels.append(name.removeprefix("hook_"))
        for l in range(layer):
            if mode in ("all", "attn"):
                parts.append(self[f"blocks.{l}.hook_attn_out"]); labels.append(f"{l}_attn_out")
            if mode in ("all", "mlp"):
                parts.append(self[f"blocks.{l}.hook_mlp_out"]); labels.append(f"{l}_mlp_out")
        stack = jnp.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = None, apply_ln: bool = False, return_labels: bool = False):
        """Each head's output (without the attention bias) of the blocks before ``layer``: ``[layer * head, batch,
        pos, d_model]``, labels ``L{l}H{h}``. Read from ``attn.hook_result`` when cached, else computed from
        ``attn.hook_z`` and ``c_proj``."""
        layer = self._n_layer(layer)
        cfg = self.config
        parts, labels = [], []
        for l in range(layer):
            name = f"blocks.{l}.attn.hook_result"
            if name in self.activations:
                result = self[name]
            else:
                w_o = self.params["h"][str(l)]["attn"]["c_proj"]["kernel"].reshape(cfg.n_head, cfg.head_dim,
                                                                                   cfg.n_embd)
                z = self[f"blocks.{l}.attn.hook_z"]
                result = jnp.einsum("bthd,hdm->bthm", z, w_o.astype(z.dtype))  # [batch, pos, head, d_model]
            parts.append(jnp.moveaxis(result, 2, 0))  # [head, batch, pos, d_model]
            labels += [f"L{l}H{h}" for h in range(cfg.n_head)]
        stack = jnp.concatenate(parts) if parts else jnp.zeros((0,))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer)
        return (stack, labels) if return_labels else stack

    def logit_attrs(self, stack: jax.Array, tokens, incorrect_tokens=None) -> jax.Array:
        """Direct logit attribution: each component's dot product with the unembedding direction of ``tokens``
        (minus that of ``incorrect_tokens``), through ``ln_final``'s weight: ``stack [component, batch, d_model]``
        (or with a pos axis matching ``tokens [batch, pos]``), ``tokens [batch]`` -> ``[component, batch]``.

        With ``stack`` from :meth:`decompose_resid` (``apply_ln=True``), the attributions sum to the logit (or
        logit difference) less the constant ``ln_final.bias . W_U[:, token]``.
        """
        wte = self.params["wte"]["embedding"]  # [vocab, d_model]
        gain = self.params["ln_f"]["scale"]
        direction = wte[jnp.asarray(tokens)] * gain  # [batch(, pos), d_model]
        if incorrect_tokens is not None:
            direction = direction - wte[jnp.asarray(incorrect_tokens)] * gain
        return (stack * direction.astype(stack.dtype)).sum(-1)
