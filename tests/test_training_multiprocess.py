"""Multi-process training on jax.distributed: 2 processes x 2 CPU devices on 127.0.0.1 (gloo collectives).

The same FSDP run (mesh data=2 x model=2) as 2 processes x 2 devices (through ``scripts/launch_local.py``) and as
1 process x 4 devices gives the same per-step losses and final weights; a run whose process 1 is killed is stopped
by the launcher, and ``--resume`` with one process continues it to the reference's losses; a process that cannot
reach the coordinator, or inconsistent process options, fail with one line within a bounded time.

Tolerances: both runs execute the same partitioned program; only the collectives differ (in-process vs gloo), so
sums are reduced in another order. Losses: a float32 mean of 256 token losses (a few u) of params that differ by
round-off; rtol 1e-5 (~170 u) as in test_training_sharding. Params: where a gradient is itself round-off, AdamW
may move an element by up to ``2 R lr`` per step in different directions in the two runs (``R`` the direction
bound of :func:`roundoff.adam_direction_bound`), which bounds every element but is loose (~lr per step). So the bulk
is held too: an element with a real gradient moves by ``lr K delta / sqrt(v_hat)`` per step, with ``delta`` the
gradient round-off (~128 u max|g|, tests/roundoff.py), i.e. ~1e-9..1e-7 over these 8 steps; the median difference of
every tensor must stay below 1e-6, while a real bug (a wrong row, a missing reduction) moves elements by ~lr = 3e-3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from roundoff import U, adam_direction_bound

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "scripts" / "launch_local.py"
STEPS, LR, WARMUP, DECAY = 8, 3e-3, 1, 200
B1, B2, EPS = 0.9, 0.95, 1e-8  # the optimizer defaults the runs use


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_local", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_args(data: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["train", "--config-preset", "tiny", "--config", "n_layer=2", "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", "8", "--seq-len", "32", "--mesh-model", "2", "--strategy",
            "fsdp", "--lr", str(LR), "--warmup-steps", str(WARMUP), "--decay-steps", str(DECAY), "--save-every",
            "2", "--keep", "10", "--no-progress", "--no-plot"]


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"}


def _cli(args: list[str], devices: int, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2_jax.cli", *args], cwd=REPO, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _weights(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(out / "final" / "model.safetensors")


def _assert_weights_match(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """Every element within the AdamW bound, and the bulk of each tensor at round-off (module docstring)."""
    assert ref.keys() == ours.keys()
    bound = _adam_bound(ref)
    for name in ref:
        diff = np.abs(ours[name].astype(np.float64) - ref[name].astype(np.float64))
        np.testing.assert_array_less(diff, bound[name], err_msg=name)
        assert np.median(diff) < 1e-6, (name, float(np.median(diff)))


def _adam_bound(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per element: sum over steps of ``2 R_t lr_t`` (the largest possible disagreement of two AdamW directions)
    plus the float32 rounding of each update on both sides."""
    lrs = [LR * min(1.0, t / WARMUP) for t in range(1, STEPS + 1)]  # cosine decay over 200 steps: <= the peak
    moves = sum(lr * float(adam_direction_bound(t, np.zeros(1), np.full(1, np.inf), B1, B2, EPS)[0])
                for t, lr in enumerate(lrs, start=1))
    return {k: moves + 4 * STEPS * U * (np.abs(v.astype(np.float64)) + moves) for k, v in params.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun".split()
    path = tmp_path_factory.mktemp("mp-data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, size=6000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    """The run as 1 process x 4 devices (same mesh, data=2 x model=2)."""
    out = tmp_path_factory.mktemp("mp-ref") / "run"
    proc = _cli(_train_args(corpus, out), devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("mp-two") / "run"
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--num-processes", "2", "--devices-per-process", "2", "--",
                           *_train_args(corpus, out)], cwd=REPO, env=_env(2), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc


def test_two_processes_equal_one_process(reference_run, two_process_run):
    out, proc = two_process_run
    ref_losses, losses = _losses(reference_run), _losses(out)
    assert len(losses) == STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0] - 0.05  # it trains (updates matter: a wrong one would move later losses)
    _assert_weights_match(_weights(out), _weights(reference_run))
    # process 0 alone wrote the run's files, every process wrote its share of each checkpoint
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
    assert (out / "run.json").is_file() and (out / "final" / "config.json").is_file()
    assert proc.stdout.splitlines()[-1].startswith('{"step": 8, "loss"')  # process 0's summary, as is
    assert '[p1] {"step": 8, "loss"' in proc.stderr  # the launcher prefixes the other processes' lines


def _pid_of(process_id: int, out: Path, timeout: float = 60) -> int:
    """PID of the launched ``gpt2_jax.cli`` process ``process_id`` writing to ``out`` (read from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gpt2_jax.cli" in argv and str(out).encode() in argv and \
                    argv[argv.index(b"--process-id") + 1] == str(process_id).encode():
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"process {process_id} of the run in {out} did not start")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert proc.poll() is None, f"the launcher ended ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the launched processes through /proc")
def test_killed_process_stops_the_run_and_one_process_resumes_it(corpus, reference_run, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, str(LAUNCHER), "--num-processes", "2", "--devices-per-process",
                                 "2", "--", *_train_args(corpus, out, steps=DECAY)], cwd=REPO, env=_env(2),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _pid_of(1, out)
        _wait_for(out / "checkpoints" / "2", launcher)
        os.kill(victim, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)  # the launcher stops process 0 and exits
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 128 + signal.SIGKILL, stderr[-2000:]
    assert "process 1 exited with status -9; stopping the others" in stderr
    from gpt2_jax.training import CheckpointManager

    saved = CheckpointManager(out / "checkpoints").all_steps()
    assert saved and saved[-1] < STEPS, saved  # killed early: the resumed run has steps left to redo

    # one process x 4 devices continues the 2-process run from its newest complete checkpoint
    proc = _cli(["train", "--out", str(out), "--resume", "--steps", str(STEPS), "--no-progress", "--no-plot"],
                devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {out} from step {saved[-1]}" in proc.stderr
    np.testing.assert_allclose(_losses(out), _losses(reference_run), rtol=1e-5)
    _assert_weights_match(_weights(out), _weights(reference_run))


def _free_port() -> int:
    return _launcher().free_port()


@pytest.mark.parametrize("process_id, expected", [
    (1, "process 1 of 2 could not reach the coordinator at 127.0.0.1:{port} within 3 s"),
    (0, "process 0 of 2: not all 2 processes joined the coordinator at 127.0.0.1:{port} within 3 s"),
])
def test_a_process_that_cannot_join_fails_within_its_timeout(corpus, tmp_path, process_id, expected):
    port = _free_port()
    started = time.monotonic()
    proc = _cli(_train_args(corpus, tmp_path / "run") + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                         "--process-id", str(process_id), "--coordinator-timeout", "3"],
                devices=2, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected.format(port=port) in proc.stderr
    assert "Check failure stack trace" not in proc.stderr  # our line, not jaxlib's abort
    assert elapsed < 60  # 3 s of waiting plus starting Python and JAX
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("options, message", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, 1] for --num-processes 2, got 2"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "go together: give all three"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be at least 1"),
    (["--distributed", "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"],
     "do not combine it with --coordinator"),
    (["--coordinator-timeout", "5"], "--coordinator-timeout needs --coordinator"),
])
def test_inconsistent_process_options_are_refused(corpus, tmp_path, capsys, options, message):
    from gpt2_jax.cli import main

    code = main(_train_args(corpus, tmp_path / "run") + options)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gpt2-jax train: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()
