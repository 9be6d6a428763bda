"""Interpretability: TransformerLens's hook points on the one gpt2-jax model, compiled.

``run_with_cache`` / ``run_with_hooks`` run the model with named hooks (``blocks.{l}.attn.hook_z``, ...);
``activation_patching`` / ``attribution_patching`` sweep patches in one compiled call; ``interventions`` are
ready-made hooks (ablation, patching, steering); weight processing folds and centres params as TransformerLens
does. Hooks need the unrolled blocks (``scan_layers=False``).
"""

from .cache import ActivationCache
from .names import hook_names
from .run import run_with_cache, run_with_hooks
from .runner import HookContext, HookRunner
