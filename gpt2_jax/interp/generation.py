"""Hooks and recorded activations for generation (``generate(..., hooks=..., return_activations=...)``)."""

from __future__ import annotations

from ..config import GPT2Config
from .names import check_name
from .runner import HookRunner, HookSpec, split_hooks

#: Hook points without a position axis at 1 (``[batch, head, query, key]``): not returnable per generated token.
_NOT_POSITION_MAJOR = ("hook_attn_scores", "hook_pattern")


def hook_spec_for_generation(hooks, return_activations, config: GPT2Config) -> tuple[HookSpec, tuple, tuple]:
    """``(hook spec, hook data, recorded names)`` for the generation programs, every name checked."""
    if config.scan_layers:
        raise ValueError("hooks need the unrolled blocks: generate with the per-layer model "
                         "(config, params = gpt2_jax.with_scan_layers(config, params, False))")
    spec, data = split_hooks(hooks, config)
    names = tuple(check_name(n, config) for n in (return_activations or ()))
    for name in names:
        if name.endswith(_NOT_POSITION_MAJOR):
            raise ValueError(f"return_activations: {name!r} is [batch, head, query, key] over the cache's slots; "
                             "return a position-major hook (e.g. attn.hook_z) instead")
    return spec, data, names


def hook_runner(hook_spec: HookSpec | None, hook_data, activations: tuple[str, ...] = ()) -> HookRunner:
    """The runner of one forward pass inside a generation program: the hooks' code from ``hook_spec`` (static),
    their data from ``hook_data`` (traced), recording ``activations`` (the generation loops reach it through
    :func:`gpt2_jax.generation.engine.hook_runner_for`)."""
    return HookRunner(hook_spec.build(hook_data) if hook_spec is not None else (), activations)
