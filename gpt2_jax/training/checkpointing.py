"""Resumable training checkpoints (orbax-checkpoint) and the final Hugging Face export.

A checkpoint ``<dir>/<step>/`` holds the :class:`~gpt2_jax.training.step.TrainState` (params, optimizer state,
step, skipped count) and a JSON ``meta`` item (data position, rng key, anything the loop wants back). orbax writes
each checkpoint into a temporary ``<step>.orbax-checkpoint-tmp-*`` directory and renames it into place only when
every file is written, so a process killed mid-write (even by ``kill -9``) leaves the previous checkpoint as the
latest complete one; the unfinished temporary directory is ignored and cleaned up by the next manager.

Sharded states are written cooperatively by every process of a multi-host run and restored straight into the
target shardings (no host gathers the whole model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..checkpoints.hf_directory import save_hf_directory
from .step import TrainState

__all__ = ["CheckpointManager", "abstract_state", "save_hf_directory"]


def abstract_state(state_shape, shardings=None):
    """``ShapeDtypeStruct`` leaves (with ``shardings`` when given) for :meth:`CheckpointManager.restore`."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_shape)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state_shape, shardings)


class CheckpointManager:
    """Save / restore :class:`TrainState` + JSON metadata under ``directory``, keeping the newest ``max_to_keep``.

    Args:
        directory: where the numbered step directories go (created if needed).
        max_to_keep: complete checkpoints kept (older ones are deleted after a newer one is complete).
        async_save: write in a background thread while training continues (the state is copied first);
            :meth:`wait` / :meth:`close` block until the write is complete.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, async_save: bool = False):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any] | None = None) -> bool:
        """Checkpoint ``state`` under its own step (no-op, returning False, if that step is already saved)."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state.to_dict()),
            meta=ocp.args.JsonSave({"step": step, **(meta or {})}),
        )
        self._manager.save(step, args=args, force=True)
        return True

    def restore(self, target, step: int | None = None) -> tuple[TrainState, dict]:
        """``(state, meta)`` of checkpoint ``step`` (default: the latest).

        Args:
            target: a :class:`TrainState` of arrays or ``ShapeDtypeStruct`` (see :func:`abstract_state`) giving
                the structure, dtypes and shardings to restore into.
            step: which checkpoint.

        Raises:
            FileNotFoundError: there is no complete checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = abstract_state(target) if not _is_abstract(target) else target
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target.to_dict()), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return TrainState.from_dict(restored.state), dict(restored.meta)

    def wait(self) -> None:
        """Block until an asynchronous save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_abstract(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
