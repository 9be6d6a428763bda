"""Start N local processes of one multi-process ``gpt2-jax`` run on 127.0.0.1 (for tests and demos).

Each process runs ``gpt2-jax <ARGS> --coordinator 127.0.0.1:PORT --num-processes N --process-id I`` (a free port is
picked unless ``--port`` is given) with ``--devices-per-process`` CPU devices. Process 0 writes to this terminal as
it is; the others' lines are prefixed ``[pI]``. When one process fails, the others are stopped (SIGTERM, then
SIGKILL after a grace period) and the launcher exits with the failed process's status; Ctrl-C is passed on to every
process (each stops after the same step, with a checkpoint). On a real cluster run one ``gpt2-jax train ...
--coordinator HOST:PORT --num-processes N --process-id I`` per host instead (or ``--distributed`` where JAX detects
the cluster): see the README.

    python scripts/launch_local.py --num-processes 2 -- train --config-preset tiny --data corpus.txt --out run/ \\
        --steps 20 --batch-size 8 --seq-len 64
    python scripts/launch_local.py --num-processes 2 --devices-per-process 2 -- train ... --mesh-model 2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

#: Seconds the other processes get to exit after SIGTERM before they are killed.
GRACE_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_command(gpt2_jax_args: list[str], coordinator: str, num_processes: int, process_id: int) -> list[str]:
    """The command line of process ``process_id``."""
    return [sys.executable, "-m", "gpt2_jax.cli", *gpt2_jax_args, "--coordinator", coordinator,
            "--num-processes", str(num_processes), "--process-id", str(process_id)]


def process_env(devices_per_process: int | None) -> dict[str, str]:
    """The environment of each process: ``devices_per_process`` CPU devices (JAX_NUM_CPU_DEVICES) if given."""
    env = dict(os.environ)
    if devices_per_process is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _relay(stream, prefix: str, sink) -> None:
    """Copy ``stream`` line by line to ``sink`` with ``prefix``."""
    for line in iter(stream.readline, b""):
        sink.write(prefix + line.decode("utf-8", errors="replace"))
        sink.flush()
    stream.close()


def _stop_all(procs: list[subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM every live process, SIGKILL those still alive after ``grace_s`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(gpt2_jax_args: list[str], num_processes: int, devices_per_process: int | None = None,
           port: int | None = None, grace_s: float = GRACE_S) -> int:
    """Run the processes to completion; returns the run's exit status (the first failure's, else 0)."""
    coordinator = f"127.0.0.1:{port or free_port()}"
    env = process_env(devices_per_process)
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    for i in range(num_processes):
        piped = i > 0
        p = subprocess.Popen(process_command(gpt2_jax_args, coordinator, num_processes, i), env=env,
                             stdout=subprocess.PIPE if piped else None, stderr=subprocess.STDOUT if piped else None,
                             start_new_session=True)  # Ctrl-C reaches them through us, once
        procs.append(p)
        if piped:
            t = threading.Thread(target=_relay, args=(p.stdout, f"[p{i}] ", sys.stderr), daemon=True)
            t.start()
            relays.append(t)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        live = set(range(num_processes))
        while live:
            for i in sorted(live):
                code = procs[i].poll()
                if code is None:
                    continue
                live.discard(i)
                if code != 0 and status == 0:
                    status = code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell says
                    others = [p for j, p in enumerate(procs) if j != i]
                    if any(p.poll() is None for p in others):
                        print(f"launch_local: process {i} exited with status {code}; stopping the others",
                              file=sys.stderr)
                    _stop_all(others, grace_s)
                    live.clear()
            time.sleep(0.05)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _stop_all(procs, grace_s)
        for t in relays:
            t.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, required=True, metavar="N", help="processes to start")
    parser.add_argument("--devices-per-process", type=int, metavar="D",
                        help="CPU devices per process (JAX_NUM_CPU_DEVICES; default: JAX's, 1)")
    parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the gpt2-jax command and its options")
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not rest:
        parser.error("give the gpt2-jax command after --, e.g. -- train --config-preset tiny ...")
    if args.num_processes < 1:
        parser.error(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        parser.error(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    return launch(rest, args.num_processes, args.devices_per_process, args.port)


if __name__ == "__main__":
    sys.exit(main())
