"""Multi-process runs on ``jax.distributed`` (JAX's multi-controller runtime): joining, agreeing, waiting.

One process runs per host (or, for tests and demos, several per host: ``scripts/launch_local.py``). Every process
calls :func:`join` before any other JAX call; afterwards ``jax.devices()`` lists every process's devices, a mesh
spans all of them, and each process feeds and writes only its own shards. On the CPU the processes exchange
collectives through gloo.

``join(DistributedSpec.auto())`` lets JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI);
``DistributedSpec("10.0.0.1:1234", num_processes=4, process_id=i)`` names it explicitly.

Why a watchdog of our own: when the coordinator cannot be reached (or not every process joins), jaxlib ends the
process from C++ with a fatal log and a stack trace after its timeout. :func:`join` instead stops the process at
the same deadline with one line saying which process waited for what (exit status 2).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading

import numpy as np

#: Exit status of a process that could not join the run within its timeout.
JOIN_FAILED_STATUS = 2
#: jaxlib's own deadline is set this much later than ours, so that ours fires first with a readable message.
_JAXLIB_GRACE_S = 30


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How a process joins a multi-process run.

    Attributes:
        coordinator: ``HOST:PORT`` of process 0's coordination service; None lets JAX detect the cluster (TPU pod
            slices, SLURM, Open MPI), in which case ``num_processes`` and ``process_id`` must be None too.
        num_processes: processes in the run.
        process_id: this process's index, ``0 <= process_id < num_processes``; process 0 hosts the coordinator.
        timeout_s: how long to wait for the coordinator and the other processes before giving up.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: float = 300.0

    @classmethod
    def auto(cls, timeout_s: float = 300.0) -> "DistributedSpec":
        """Let JAX detect the cluster from the environment (TPU pod slice, SLURM, Open MPI)."""
        return cls(timeout_s=timeout_s)

    @property
    def explicit(self) -> bool:
        """Whether the coordinator and process numbers were given (rather than detected)."""
        return self.coordinator is not None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        given = [self.coordinator is not None, self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together: give all three (or none, "
                             "to let JAX detect a TPU pod slice, SLURM or Open MPI cluster)")
        if not self.timeout_s > 0:
            raise ValueError(f"--coordinator-timeout must be positive seconds, got {self.timeout_s}")
        if not self.explicit:
            return
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:8476), got {self.coordinator!r}")
        if self.num_processes < 1:
            raise ValueError(f"--num-processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes - 1}] for --num-processes "
                             f"{self.num_processes}, got {self.process_id}")


def coordinator_reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _join_failure(spec: DistributedSpec) -> str:
    """The one line said when the deadline passes before every process has joined."""
    if not spec.explicit:
        return (f"could not join the multi-process run JAX detected within {spec.timeout_s:g} s (see "
                "--coordinator-timeout): are all processes started?")
    who = f"process {spec.process_id} of {spec.num_processes}"
    if spec.process_id != 0 and not coordinator_reachable(spec.coordinator):
        return (f"{who} could not reach the coordinator at {spec.coordinator} within {spec.timeout_s:g} s: nothing "
                "accepts connections there (is process 0 running, with the same --coordinator, and is the port "
                "reachable from this host?)")
    return (f"{who}: not all {spec.num_processes} processes joined the coordinator at {spec.coordinator} within "
            f"{spec.timeout_s:g} s (were they all started with the same --coordinator and --num-processes, and "
            "distinct --process-id values?)")


def join(spec: DistributedSpec) -> None:
    """Join the run (``jax.distributed.initialize``); call in every process before any other JAX call.

    Selects gloo for collectives between CPU processes (GPU/TPU collectives are unaffected). If the run cannot
    be joined within ``spec.timeout_s``, prints one line naming the cause to stderr and exits the process with
    status :data:`JOIN_FAILED_STATUS`.

    Raises:
        ValueError: inconsistent settings (see :meth:`DistributedSpec.validate`).
    """
    import jax

    spec.validate()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    joined = threading.Event()

    def watchdog():
        if not joined.wait(spec.timeout_s):
            sys.stderr.write(f"gpt2-jax: error: {_join_failure(spec)}\n")
            sys.stderr.flush()
            os._exit(JOIN_FAILED_STATUS)  # jaxlib's own timeout would abort with a C++ stack trace

    threading.Thread(target=watchdog, name="gpt2-jax-join-watchdog", daemon=True).start()
    kwargs = {"initialization_timeout": int(spec.timeout_s) + _JAXLIB_GRACE_S}
    if spec.explicit:
        kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                      process_id=spec.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    finally:
        joined.set()


def is_multiprocess() -> bool:
    """Whether this process is one of several (``jax.process_count() > 1``)."""
    import jax

    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier ``name`` (no-op in a single process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one (no-op in a single process): decisions that
    change what the processes compute next (stop now, save now) must be the same on all of them."""
    if not is_multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))
