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
from .interventions import (AblateHead, AblateNeuron, AddVector, Patch, add_vector, mean_ablate_head,
                            mean_ablate_neuron, patch_from, zero_ablate_head, zero_ablate_neuron)
from .patching import activation_patching, attribution_patching
from .weights import center_unembed, center_writing_weights, fold_layer_norm, fold_value_biases, process_weights
