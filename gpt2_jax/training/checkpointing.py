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

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ..checkpoints.hf_directory import save_hf_directory
from .step import TrainState

__all__ = ["CheckpointManager", "CheckpointSaveError", "abstract_state", "save_hf_directory"]


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
        self._async = async_save

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
        with _quiet_orbax():
            try:
                self._manager.save(step, args=args, force=True)
                if not self._async:
                    self._manager.wait_until_finished()
            except Exception as e:
                raise self._save_error(step, e) from (e if debug_enabled() else None)
        return True

    def _save_error(self, step: int, error: BaseException) -> "CheckpointSaveError":
        """One line: which checkpoint failed, the OS reason, and what is still there."""
        try:
            latest = self._manager.latest_step()
        except Exception:  # the manager itself may be unusable now
            latest = None
        kept = (f"the newest complete checkpoint is step {latest} (continue with --resume once there is room)"
                if latest is not None else "there is no complete checkpoint yet")
        hint = "" if debug_enabled() else f"; set {DEBUG_ENV}=1 for the full traceback"
        if not debug_enabled():
            _quiet_after_failure()
        return CheckpointSaveError(f"could not write the checkpoint of step {step} to {self.directory}: "
                                   f"{_os_reason(error)}; {kept}{hint}")

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
        """Block until an asynchronous save is complete (:class:`CheckpointSaveError` if it failed)."""
        with _quiet_orbax():
            try:
                self._manager.wait_until_finished()
            except Exception as e:
                raise self._save_error(self._manager.latest_step() or 0, e) from (e if debug_enabled() else None)

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        try:
            self.wait()
        finally:
            with _quiet_orbax(), contextlib.suppress(Exception if not debug_enabled() else ()):
                self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, file too large, permissions); the message is one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "checkpoint not written"


#: Set to 1 for orbax's own logs and tracebacks on a failed save (otherwise one line says what failed).
DEBUG_ENV = "GPT2_JAX_DEBUG"


def debug_enabled() -> bool:
    """Whether ``GPT2_JAX_DEBUG`` asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _os_reason(error: BaseException) -> str:
    """The operating-system reason of a failed write: ``No space left on device`` from tensorstore's
    ``[os_error_code='28']`` or an OSError's errno, else the error's first line."""
    text = str(error)
    match = re.search(r"os_error_code='?(\d+)", text)
    if match:
        return f"{os.strerror(int(match.group(1)))} (errno {match.group(1)})"
    if isinstance(error, OSError) and error.errno:
        return f"{os.strerror(error.errno)} (errno {error.errno})"
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:300]


class _DropOrbaxErrors(logging.Filter):
    """Drop orbax's error logs of a failed write: the caller re-raises the error as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("orbax" in (record.pathname or "") and record.levelno >= logging.WARNING)


# A traceback tensorstore's C++ completion callbacks print (straight to the stderr file descriptor, not through
# sys.excepthook) when they call ``loop.call_soon_threadsafe`` on orbax's event loop after a failed write closed it.
# Several threads print at once, so the tracebacks arrive interleaved, even within a line: they are removed piece by
# piece (each piece is one of the lines such a traceback consists of), then the lines left blank.
_EVENT_LOOP_CLOSED_PIECES = re.compile(
    r"Traceback \(most recent call last\):"
    r"|File \"[^\"\n]*base_events\.py\", line \d+, in (?:call_soon_threadsafe|_check_closed)"
    r"|self\._check_closed\(\)"
    r"|raise RuntimeError\('Event loop is closed'\)"
    r"|RuntimeError: Event loop is closed")


def drop_event_loop_closed(text: str) -> str:
    """``text`` without the (possibly interleaved) "Event loop is closed" tracebacks; unchanged when it has none."""
    if "Event loop is closed" not in text:
        return text
    kept = [line for line in _EVENT_LOOP_CLOSED_PIECES.sub("", text).splitlines(keepends=True) if line.strip()]
    return "".join(kept)


class _DropUnretrievedWrites(logging.Filter):
    """Drop asyncio's "Task exception was never retrieved" records: orbax's failed write tasks, logged when they are
    garbage-collected (often at exit, after the one-line error), with the exception already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


_AFTER_FAILURE = {"quiet": False}


def checkpoint_write_failed() -> bool:
    """Whether a checkpoint write has failed in this process (its noise may still be printed until exit)."""
    return _AFTER_FAILURE["quiet"]


def _quiet_after_failure() -> None:
    """Once a checkpoint write has failed: drop asyncio's reports of orbax's unretrieved write tasks, and at exit
    (after everything the program printed itself) send file descriptor 2 to /dev/null, where tensorstore's late
    callbacks print their "Event loop is closed" tracebacks while the interpreter shuts down."""
    if _AFTER_FAILURE["quiet"]:
        return
    _AFTER_FAILURE["quiet"] = True
    import atexit

    logging.getLogger("asyncio").addFilter(_DropUnretrievedWrites())
    atexit.register(_silence_stderr_at_exit)


def _silence_stderr_at_exit() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


@contextlib.contextmanager
def _quiet_orbax():
    """While saving (unless ``GPT2_JAX_DEBUG`` is set): orbax's ERROR records are dropped (a failed write logs the
    same exception from several threads; the caller re-raises it as one line), and so are the dozens of
    ``RuntimeError: Event loop is closed`` tracebacks a failed write makes tensorstore print. Everything else
    written to stderr meanwhile (file descriptor 2, C++ included) is passed on when the save returns."""
    if debug_enabled():
        yield
        return
    quiet = _DropOrbaxErrors()
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with _filtered_stderr_fd(drop_event_loop_closed):
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@contextlib.contextmanager
def _filtered_stderr_fd(clean):
    """Collect what is written to file descriptor 2 meanwhile and pass on ``clean(text)``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            _wait_until_quiet(capture)  # a failed write's callbacks keep printing for a moment after the error
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            # A failed write: everything printed meanwhile is that failure's noise (threads interleave it beyond
            # any pattern); the caller reports it in one line. Otherwise pass it on, cleaned.
            text = "" if failed else clean(capture.read().decode("utf-8", errors="replace"))
            if text:
                os.write(2, text.encode("utf-8"))


def _wait_until_quiet(capture, settle: float = 1.0, limit: float = 15.0) -> None:
    """Wait until nothing more was written to ``capture`` for ``settle`` seconds (at most ``limit``)."""
    import time

    deadline, last_size, last_change = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < deadline:
        size = os.fstat(capture.fileno()).st_size
        if size != last_size:
            last_size, last_change = size, time.monotonic()
        elif time.monotonic() - last_change >= settle:
            return
        time.sleep(0.1)


def _is_abstract(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
