"""Fine-tuning with optax: data pipeline, jitted train step, evaluation, resumable checkpoints, device meshes.

Quick tour (see ``scripts/finetune.py`` for a complete example)::

    tokens = load_or_tokenize("corpus.txt", "cache/")                       # uint16 memmap, EOS between docs
    loader = WindowLoader(tokens, batch_size=8, seq_len=256, seed=0)        # batch(step) -> [8, 257]
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=3e-4, total_steps=1000))
    state = TrainState.create(params, optimizer)
    step = make_train_step(config, optimizer, schedule)
    state, metrics = step(state, loader.batch(0), jax.random.PRNGKey(0))
"""

import importlib

# Public name -> submodule. Imported lazily, so that ``gpt2-jax <other command>`` does not pay for orbax & co.
_EXPORTS = {
    "checkpointing": ["CheckpointManager", "abstract_state", "save_hf_directory"],
    "distributed": ["DistributedSpec", "any_process", "barrier", "join"],
    "data": ["DataError", "WindowLoader", "iter_eval_windows", "load_or_tokenize", "load_tokens", "tokenize_files"],
    "evaluate": ["EvalResult", "evaluate", "make_nll_fn"],
    "loop": ["TRAINING_PRESETS", "TrainConfig", "TrainingError", "TrainResult", "plot_losses", "read_metrics",
             "train"],
    "optim": ["OptimizerConfig", "decay_mask", "make_optimizer", "make_schedule"],
    "sharding": ["batch_sharding", "check_batch_size", "global_batch", "local_batch_rows", "make_mesh",
                 "param_shardings", "param_specs", "state_shardings"],
    "step": ["TrainState", "make_loss_fn", "make_train_step"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
