"""The training loop and ``gpt2-jax train``: overfitting a small text, outputs, bad input, and kill -9 + --resume
giving exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_jax.checkpoints.pretrained import from_pretrained
from gpt2_jax.cli import main
from gpt2_jax.training import TrainConfig, read_metrics, train

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def byte_tokens(path: Path, n_bytes: int) -> Path:
    """The first ``n_bytes`` of a repository file as byte-level tokens (vocabulary 256) in a .bin token file."""
    text = (REPO / "gpt2_jax" / "config.py").read_bytes()[:n_bytes]
    np.frombuffer(text, np.uint8).astype(np.uint16).tofile(path)
    return path


def overfit(tmp_path, n_bytes, steps, width, lr=5e-3, **extra):
    data = byte_tokens(tmp_path / "bytes.bin", n_bytes)
    cfg = TrainConfig(
        out=str(tmp_path / "run"), data=[str(data)], config_preset="tiny", **extra,
        config_overrides=dict(vocab_size=256, n_positions=64, n_embd=width, n_layer=2, n_head=4, **NO_DROPOUT),
        seq_len=64, batch_size=16, steps=steps, learning_rate=lr, warmup_steps=20, weight_decay=0.0,
        save_every=10_000, progress=False,
    )
    result = train(cfg)
    return result, read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_tiny_model_overfits_a_small_text(tmp_path):
    """800 bytes of gpt2_jax/config.py, 200 steps: the loss falls from ln(256) = 5.55 to below 0.5 nats/byte
    (a unigram model of this text would be ~3.3), i.e. the text is memorised."""
    held_out = byte_tokens(tmp_path / "held.bin", 800)  # the same text: its eval loss must fall too
    result, metrics = overfit(tmp_path, 800, 200, 96, eval_data=[str(held_out)], eval_every=100, eval_windows=4)
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [100, 200] and evals[1]["eval_loss"] < evals[0]["eval_loss"] < 3.0
    assert result.eval == evals[1] and evals[1]["eval_loss"] < 0.7
    assert len(losses) == 200 and abs(losses[0] - np.log(256)) < 0.3
    assert np.mean(losses[-10:]) < 0.5, losses[-10:]
    # outputs: final HF directory equal to the trained params, loss curve, run settings, metrics fields
    out = tmp_path / "run"
    loaded = from_pretrained(out / "final")
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run.json").read_text())["train"]["steps"] == 200
    last = [m for m in metrics if "loss" in m][-1]
    assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "skipped"} <= set(last)
    assert last["step"] == 200 and last["tokens"] == 200 * 16 * 64 and last["skipped"] == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [200]


@pytest.mark.slow
def test_tiny_model_overfits_a_longer_text(tmp_path):
    """2000 bytes, 600 steps, width 128: below 0.3 nats/byte."""
    _, metrics = overfit(tmp_path, 2000, 600, 128, lr=3e-3)
    assert np.mean([m["loss"] for m in metrics[-10:]]) < 0.3


# ------------------------------------------------------------------------------------------------ bad input
def tiny_args(out, data, *extra):
    return ["train", "--config-preset", "tiny", "--config", "n_embd=16", "--config", "n_layer=1",
            "--config", "n_head=2", "--config", "n_positions=32", "--data", str(data), "--out", str(out),
            "--seq-len", "16", "--batch-size", "2", "--no-progress", "--no-plot", "--no-final", *extra]


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_empty_and_too_short_data(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(tiny_args(tmp_path / "r1", tmp_path / "empty.txt"), capsys)
    assert code == 2 and "no text found" in err
    (tmp_path / "short.txt").write_text("Just a few words.")
    code, err = run_cli(tiny_args(tmp_path / "r2", tmp_path / "short.txt"), capsys)
    assert code == 2 and "one training window needs seq_len + 1 = 17" in err
    code, err = run_cli(tiny_args(tmp_path / "r3", tmp_path / "missing.txt"), capsys)
    assert code == 2 and "does not exist" in err


def test_unknown_model_and_bad_settings(tmp_path, capsys):
    data = byte_tokens(tmp_path / "bytes.bin", 500)
    args = ["train", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--out", str(tmp_path / "r")]
    code, err = run_cli(args, capsys)
    assert code == 2 and "cannot load model" in err and "no-such-model" in err
    code, err = run_cli(["train", "--config-preset", "gpt3", "--data", str(data), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown GPT-2 preset 'gpt3'" in err and "tiny" in err
    code, err = run_cli(tiny_args(tmp_path / "r", data, "--config", "n_layers=3"), capsys)
    assert code == 2 and "n_layers" in err
    code, err = run_cli(tiny_args(tmp_path / "r", data, "--batch-size", "6", "--accum-steps", "4"), capsys)
    assert code == 2 and "batch size 6 is not divisible by accum_steps=4" in err
    code, err = run_cli(tiny_args(tmp_path / "r", data, "--seq-len", "64"), capsys)
    assert code == 2 and "--seq-len 64 must be in [1, n_positions=32]" in err
    code, err = run_cli(["train", "--config-preset", "tiny", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--data is required" in err
    # byte tokens up to 255 exceed a 100-entry vocabulary
    code, err = run_cli(tiny_args(tmp_path / "r", data, "--config", "vocab_size=100"), capsys)
    assert code == 2 and "vocabulary has 100 entries" in err
    with pytest.raises(SystemExit):  # argparse: --resume and --overwrite exclude each other
        main(tiny_args(tmp_path / "r", data, "--resume", "--overwrite"))


def test_persistently_non_finite_loss_stops_with_a_clear_error(tmp_path, capsys):
    """lr 1e30 blows the weights up after one update; later steps are skipped (counted) until the limit."""
    data = byte_tokens(tmp_path / "bytes.bin", 500)
    out = tmp_path / "run"
    code, err = run_cli(tiny_args(out, data, "--config", "vocab_size=256", "--lr", "1e30", "--warmup-steps", "0",
                                  "--steps", "50", "--max-consecutive-skips", "3", "--log-every", "100"), capsys)
    assert code == 2 and "non-finite for 3 consecutive steps" in err and "Lower --learning-rate" in err
    records = read_metrics(out / "metrics.jsonl")  # skipped steps are always logged, whatever --log-every
    assert [(m["step"], m["finite"], m["skipped"]) for m in records][-3:] == [(s, 0, s - 1) for s in (2, 3, 4)]


def test_output_directory_holding_another_run(tmp_path, capsys):
    data = byte_tokens(tmp_path / "bytes.bin", 500)
    out = tmp_path / "run"
    assert main(tiny_args(out, data, "--config", "vocab_size=256", "--steps", "2")) == 0
    code, err = run_cli(tiny_args(out, data, "--config", "vocab_size=256", "--steps", "2"), capsys)
    assert code == 2 and "holds another training run; pass --resume to continue it or --overwrite" in err
    # --resume with a different trajectory-defining setting is refused, naming it
    code, err = run_cli(tiny_args(out, data, "--config", "vocab_size=256", "--steps", "3", "--lr", "0.1",
                                  "--resume"), capsys)
    assert code == 2 and "learning_rate: run has 0.0003, command line gives 0.1" in err
    # --overwrite with bad input fails before touching the old run
    (tmp_path / "empty.txt").write_text("")
    before = (out / "metrics.jsonl").read_text()
    code, err = run_cli(tiny_args(out, tmp_path / "empty.txt", "--overwrite"), capsys)
    assert code == 2 and "no text found" in err
    assert (out / "metrics.jsonl").read_text() == before and (out / "checkpoints").is_dir()
    # --resume with more steps continues; --overwrite starts over
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert main(tiny_args(out, data, "--config", "vocab_size=256", "--steps", "1", "--overwrite")) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run_cli(tiny_args(other, data, "--config", "vocab_size=256"), capsys)
    assert code == 2 and "is not empty" in err
    code, err = run_cli(tiny_args(other, data, "--config", "vocab_size=256", "--resume"), capsys)
    assert code == 2 and "holds no gpt2-jax run" in err


# ---------------------------------------------------------------------------------------------- kill + resume
def cli(out, data, *extra):
    return [sys.executable, "-m", "gpt2_jax.cli", "train", "--config-preset", "tiny",
            "--config", "vocab_size=256", "--config", "n_embd=32", "--config", "n_layer=2", "--config", "n_head=2",
            "--config", "n_positions=32", "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--steps", "40", "--save-every", "5", "--warmup-steps", "5", "--lr", "1e-3",
            "--no-progress", "--no-plot", "--seed", "7", *extra]


def cached_env(tmp_path):
    """Subprocess environment sharing a persistent compilation cache, so the runs of one test compile once."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def test_kill_9_then_resume_gives_identical_losses(tmp_path):
    """Dropout on (0.1 in the tiny preset), so the per-step dropout keys must be restored too."""
    ENV = cached_env(tmp_path)
    data = byte_tokens(tmp_path / "bytes.bin", 3000)
    subprocess.run(cli(tmp_path / "full", data), check=True, env=ENV, cwd=REPO, capture_output=True)
    reference = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    assert sorted(reference) == list(range(1, 41))

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(out, data), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 18:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(metrics))
    assert 18 <= killed_at < 40, "the kill must land mid-run"
    last_ckpt = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert last_ckpt <= killed_at

    resumed = subprocess.run([sys.executable, "-m", "gpt2_jax.cli", "train", "--out", str(out), "--resume"],
                             env=ENV, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} from step {last_ckpt}" in resumed.stderr
    records = read_metrics(metrics)
    assert [m["step"] for m in records] == list(range(1, 41))  # the steps after the checkpoint were redone once
    # bit-identical in practice (same program, same inputs); the bound allows float round-off
    np.testing.assert_allclose([m["loss"] for m in records], [reference[s] for s in range(1, 41)], rtol=1e-6, atol=0)
    print("max loss difference after resume:", max(abs(m["loss"] - reference[m["step"]]) for m in records))
    a, b = from_pretrained(tmp_path / "full" / "final"), from_pretrained(out / "final")
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    ENV = cached_env(tmp_path)
    data = byte_tokens(tmp_path / "bytes.bin", 3000)
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out, data, "--steps", "100000", "--save-every", "100000"), env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    done = read_metrics(metrics)[-1]["step"]
    saved = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [done] and not (out / "final").exists()


def test_scan_layers_and_remat_run_export_per_layer_and_resume(tmp_path):
    """--scan-layers --remat full: the same losses as the unrolled run (same seed: the same initial params and
    batches), and final/ is an ordinary per-layer HF directory holding the trained (stacked) params."""
    from gpt2_jax.stacking import params_are_stacked, unstack_layers

    result, metrics = overfit(tmp_path, 400, 12, 32, scan_layers=True, remat="full")
    (tmp_path / "plain").mkdir()
    plain, plain_metrics = overfit(tmp_path / "plain", 400, 12, 32)
    assert params_are_stacked(result.state.params)
    losses = [m["loss"] for m in metrics if "loss" in m]
    plain_losses = [m["loss"] for m in plain_metrics if "loss" in m]
    # Same initial params and batches; float32 round-off amplified by 12 Adam steps stays far below the fall.
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-3)
    loaded = from_pretrained(tmp_path / "run" / "final")
    assert not params_are_stacked(loaded.params) and not loaded.config.scan_layers
    ours = unstack_layers(result.state.params)
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="--remat must be one of"):
        overfit(tmp_path / "bad", 400, 2, 32, remat="sometimes")
