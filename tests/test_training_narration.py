"""``gpt2-jax train`` tells the user what it is doing: a time estimate, the compile phase before the progress bar,
and Ctrl-C stopping after the step in flight with a checkpoint (a real process and a real SIGINT, bounded waits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_jax.config import GPT2Config
from gpt2_jax.training.narration import estimate_line, format_duration, train_flops_per_token

WAIT_S = 420  # bound on every wait: a loaded 2-core machine imports jax and compiles in well under this


def _metrics_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait_for(predicate, proc, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_compile_phase_and_ctrl_c_stops_after_the_step_in_flight(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(__file__).read_text() * 3)
    out = tmp_path / "run"
    stderr_path = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2_jax.cli", "train", "--config-preset", "tiny", "--config", "n_layer=1",
             "--data", str(corpus), "--out", str(out), "--steps", "100000", "--save-every", "100000",
             "--batch-size", "8", "--seq-len", "64", "--no-progress", "--no-plot", "--no-final"],
            stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        proc.stderr = open(stderr_path)  # for _wait_for's message
        try:
            metrics = out / "metrics.jsonl"
            _wait_for(lambda: len(_metrics_steps(metrics)) >= 3, proc, "three training steps")
            seen = max(_metrics_steps(metrics))
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = stderr_path.read_text()
    assert code == 130, log
    # The estimate, then the compile phase, before the first step's metrics.
    assert log.index("estimate:") < log.index("compiling the train step (first call)...") < \
        log.index("compiled the train step and ran the first step in")
    assert "Ctrl-C again aborts" in log and "stopping after step" in log
    # Stopped after the step in flight (seen + 1; seen + 2 if a step finished between reading the metrics and the
    # signal): never a further step, and that step is checkpointed.
    last = max(_metrics_steps(out / "metrics.jsonl"))
    assert seen <= last <= seen + 2, (seen, last)
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == last, (saved, last)
    assert f"stopped at step {last}" in log


def test_estimate_line_counts_flops():
    config = GPT2Config()  # gpt2: 124,439,808 params
    per_token = train_flops_per_token(config, 124_439_808, 1024)
    # 6 N (blocks) + 6 d V (the tied head) + 12 L T d (attention), per token
    blocks = 124_439_808 - 50257 * 768 - 1024 * 768
    assert per_token == 6 * blocks + 6 * 768 * 50257 + 12 * 12 * 1024 * 768
    assert train_flops_per_token(config, 124_439_808, 1024, remat="full") == per_token * 4 / 3
    import jax

    params = jax.eval_shape(lambda: {"w": jax.numpy.zeros((124_439_808,))})
    line = estimate_line(config, params, 8, 1024, 1000, tflops=0.1, platform="cpu")
    seconds = per_token * 8 * 1024 / 0.1e12
    assert "124M params" in line and "8,192 tokens/step" in line and format_duration(seconds) in line
    assert format_duration(seconds * 1000) in line and "100 GFLOP/s" in line


def test_format_duration():
    assert [format_duration(s) for s in (0.25, 5, 42, 600, 7200, 3 * 86400)] == \
        ["0.25 s", "5.0 s", "42 s", "10.0 min", "2.0 h", "3.0 days"]
