"""Runs that cannot be corrupted and settings that cannot silently fail: the run-directory and convert-destination
locks (two processes racing, stale lock of a kill -9), every bad numeric option refused with one line (CLI and
Python API), no non-finite weights ever saved or exported, a failed start leaving nothing that blocks the rerun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax.cli import main
from gpt2_jax.locking import LOCK_NAME, DirectoryLock, DirectoryLockedError
from gpt2_jax.training import TrainConfig, read_metrics, train
from gpt2_jax.training.loop import TrainingError

REPO = Path(__file__).resolve().parents[1]


def byte_tokens(path: Path, n_bytes: int = 600) -> Path:
    """Bytes of a repository file as a .bin token file (vocabulary 256)."""
    text = (REPO / "gpt2_jax" / "config.py").read_bytes()[:n_bytes]
    np.frombuffer(text, np.uint8).astype(np.uint16).tofile(path)
    return path


TINY = ["--config-preset", "tiny", "--config", "vocab_size=256", "--config", "n_embd=16", "--config", "n_layer=1",
        "--config", "n_head=2", "--config", "n_positions=32", "--seq-len", "16", "--batch-size", "2",
        "--no-progress", "--no-plot"]


def train_args(out, data, *extra):
    return ["train", *TINY, "--data", str(data), "--out", str(out), *extra]


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ locks
def test_lock_excludes_a_second_holder_and_names_it(tmp_path):
    target = tmp_path / "run"
    with DirectoryLock.for_directory(target, what="training run") as lock:
        assert lock.held and (target / LOCK_NAME).is_file()
        with pytest.raises(DirectoryLockedError) as e:  # another open file description, even in this process
            DirectoryLock.for_directory(target, what="training run").acquire()
        msg = str(e.value)
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in msg and "training run" in msg
        assert "\n" not in msg
    assert not (target / LOCK_NAME).exists()  # released: the file is gone, the directory is clean
    DirectoryLock.for_directory(target).acquire().release()
    beside = DirectoryLock.beside(tmp_path / "dst", what="convert destination")
    assert beside.path == tmp_path / ".dst.lock"
    with beside:
        with pytest.raises(DirectoryLockedError, match="dst is in use by PID"):
            DirectoryLock.beside(tmp_path / "dst").acquire()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gpt2_jax.locking import DirectoryLock; "
         f"DirectoryLock.for_directory({str(target)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLockedError, match=f"PID {holder.pid} on host"):
            DirectoryLock.for_directory(target).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (target / LOCK_NAME).is_file()  # the dead holder's record is still there ...
    with DirectoryLock.for_directory(target) as lock:  # ... and is taken over
        assert lock.took_over["pid"] == holder.pid


def wait_for_metrics(path: Path, n: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    raise AssertionError("the first run did not start in time")


def test_two_runs_racing_for_one_directory(tmp_path, capsys):
    """A live run's directory refuses a second run, --overwrite and --resume (exit 2, one line naming the PID);
    after kill -9 a --resume takes the stale lock over and continues."""
    data = byte_tokens(tmp_path / "bytes.bin", 2000)
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen([sys.executable, "-m", "gpt2_jax.cli", *train_args(out, data, "--steps", "100000",
                                                                                "--save-every", "5")],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metrics(out / "metrics.jsonl", 6, first)
        for extra in ([], ["--overwrite"], ["--resume"]):
            code, err = run_cli(train_args(out, data, "--steps", "3", *extra), capsys)
            assert code == 2, err
            assert error_lines(err) == [error_lines(err)[0]] and f"in use by PID {first.pid} on host" in err, err
        code, err = run_cli(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
        assert code == 2 and f"PID {first.pid}" in err
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    assert (out / "final").exists() is False
    last = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    code, err = run_cli(["train", "--out", str(out), "--resume", "--steps", str(last + 1), "--no-progress",
                         "--no-final"], capsys)
    assert code == 0, err
    assert f"took over the stale lock of PID {first.pid}" in err and f"from step {last}" in err
    assert not (out / LOCK_NAME).exists()
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == last + 1


def test_two_converts_to_one_destination(tmp_path, capsys, monkeypatch):
    """While one convert writes DST a second one to the same DST fails at once naming the first (the second runs
    inside the first's write, so the race is deterministic)."""
    from gpt2_jax.checkpoints import convert as convert_module

    data = byte_tokens(tmp_path / "bytes.bin")
    assert main(train_args(tmp_path / "run", data, "--steps", "1")) == 0
    capsys.readouterr()
    src, dst = tmp_path / "run" / "final", tmp_path / "converted"
    real_save, seen = convert_module.save_hf_directory, {}

    def save_and_race(*args, **kwargs):
        seen["second"] = run_cli(["convert", str(src), str(dst), "--quiet"], capsys)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(convert_module, "save_hf_directory", save_and_race)
    code, _ = run_cli(["convert", str(src), str(dst), "--quiet"], capsys)
    assert code == 0 and (dst / "model.safetensors").is_file()
    code, err = seen["second"]
    assert code == 2 and f"convert destination {dst} is in use by PID {os.getpid()}" in err
    assert len(error_lines(err)) == 1
    assert not (tmp_path / ".converted.lock").exists()


# ------------------------------------------------------------------------------------------- option validation
BAD_TRAIN_OPTIONS = [
    (["--lr", "nan"], "--lr (learning_rate, peak learning rate) must be a finite float32 number"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "1e39"], "finite float32"),
    (["--lr", "0"], "must be > 0"),
    (["--lr=-1e-3"], "must be > 0"),
    (["--b1", "1"], "--b1 (Adam beta1, the first-moment decay) must be in [0, 1)"),
    (["--b2", "2"], "--b2 (Adam beta2, the second-moment decay) must be in [0, 1), got 2"),
    (["--b2=-0.1"], "--b2"),
    (["--min-lr-ratio", "5"], "--min-lr-ratio (min_lr_ratio, final lr / peak lr) must be in (0, 1]"),
    (["--min-lr-ratio", "0"], "--min-lr-ratio"),
    (["--eps", "0"], "--eps"),
    (["--weight-decay=-1"], "--weight-decay"),
    (["--grad-clip=-1"], "--grad-clip"),
    (["--accum-steps", "0"], "--accum-steps (accum_steps, micro-batches per step) must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size=-1"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--keep", "0"], "--keep (checkpoints kept; --resume needs at least one) must be >= 1"),
    (["--seq-len", "0"], "--seq-len (seq_len, tokens per training window) must be >= 1, got 0"),
    (["--seq-len", "33"], "--seq-len 33 must be in [1, n_positions=32]"),
    (["--save-every", "0"], "--save-every"),
    (["--eval-windows", "0"], "--eval-windows"),
    (["--eval-every=-1"], "--eval-every"),
    (["--log-every", "0"], "--log-every"),
    (["--warmup-steps=-1"], "--warmup-steps"),
    (["--decay-steps", "0"], "--decay-steps"),
    (["--max-consecutive-skips", "0"], "--max-consecutive-skips"),
    (["--mesh-model", "0"], "--mesh-model"),
]


@pytest.mark.parametrize("extra,message", BAD_TRAIN_OPTIONS, ids=[" ".join(e) for e, _ in BAD_TRAIN_OPTIONS])
def test_bad_train_option_exits_2_with_one_line(tmp_path, capsys, extra, message):
    data = byte_tokens(tmp_path / "bytes.bin")
    out = tmp_path / "run"
    code, err = run_cli(train_args(out, data, "--steps", "2", *extra), capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err
    assert err.startswith("gpt2-jax train: error: ")
    assert not out.exists()  # refused before anything was written


def test_python_api_validates_too(tmp_path):
    for kwargs, message in [(dict(learning_rate=float("nan")), "--lr"), (dict(b2=2.0), "--b2"),
                            (dict(min_lr_ratio=5.0), "min_lr_ratio"), (dict(accum_steps=0), "accum_steps"),
                            (dict(keep=0), "--keep"), (dict(seq_len=0), "seq_len"), (dict(steps=2.5), "integer"),
                            (dict(remat="sometimes"), "--remat must be one of")]:
        with pytest.raises(ValueError, match=message.replace("-", r"\-")):
            TrainConfig(out=str(tmp_path / "r"), data=[], **kwargs)
    from gpt2_jax.training import OptimizerConfig

    with pytest.raises(ValueError, match="b1"):
        OptimizerConfig(b1=1.5)


BAD_EVAL_OPTIONS = [
    (["--batch-size=-1"], "--batch-size (batch_size, windows per forward pass) must be >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-windows", "0"], "--max-windows (max_windows, evaluate only the first N windows) must be >= 1"),
    (["--max-windows=-1"], "--max-windows"),
    (["--seq-len", "1"], "--seq-len (seq_len, tokens per evaluation window) must be >= 2"),
    (["--stride", "0"], "--stride"),
]


@pytest.mark.parametrize("extra,message", BAD_EVAL_OPTIONS, ids=[" ".join(e) for e, _ in BAD_EVAL_OPTIONS])
def test_bad_eval_option_exits_2_with_one_line(tmp_path, capsys, extra, message):
    # the model does not exist: the options are refused before anything is loaded
    code, err = run_cli(["eval", "--model", str(tmp_path / "none"), "--data", "x.txt", "--no-progress", *extra],
                        capsys)
    assert code == 2 and len(error_lines(err)) == 1 and message in err, err


# -------------------------------------------------------------------------------------------- non-finite guard
def test_non_finite_weights_are_never_saved_or_exported(tmp_path, monkeypatch):
    """An optimizer whose third update is inf while loss and gradients are finite: the run stops naming step 3;
    the checkpoint of step 2 is the newest, no final/ is exported, and the saved weights are finite."""
    from gpt2_jax.training import loop

    real = loop.make_optimizer

    def overflowing_optimizer(cfg):
        optimizer, schedule = real(cfg)

        def init(params):
            return optimizer.init(params), jnp.zeros([], jnp.int32)

        def update(updates, state, params=None):
            inner, count = state
            updates, inner = optimizer.update(updates, inner, params)
            count = count + 1  # this update's step, 1-based
            updates = jax.tree_util.tree_map(lambda u: jnp.where(count == 3, u * jnp.inf, u), updates)
            return updates, (inner, count)

        return optax.GradientTransformation(init, update), schedule

    monkeypatch.setattr(loop, "make_optimizer", overflowing_optimizer)
    loop._compiled_functions.cache_clear()
    data = byte_tokens(tmp_path / "bytes.bin")
    cfg = TrainConfig(out=str(tmp_path / "run"), data=[str(data)], config_preset="tiny", seq_len=16, batch_size=2,
                      steps=6, save_every=2, learning_rate=1.234e-3, progress=False, plot=False,
                      config_overrides=dict(vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    try:
        with pytest.raises(TrainingError, match=r"step 3 produced non-finite weights \(its loss and gradients were "
                                                r"finite.*the newest checkpoint is step 2"):
            train(cfg)
    finally:
        loop._compiled_functions.cache_clear()
    out = tmp_path / "run"
    assert not (out / "final").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert "params_finite" not in read_metrics(out / "metrics.jsonl")[0]
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------- failed start, data
def test_failed_start_leaves_nothing_that_blocks_the_rerun(tmp_path, capsys):
    data = byte_tokens(tmp_path / "bytes.bin")
    (tmp_path / "short.txt").write_text("Just a few words.")
    out = tmp_path / "run"
    code, err = run_cli(train_args(out, tmp_path / "missing.txt", "--steps", "1"), capsys)
    assert code == 2 and "does not exist" in err and not out.exists()
    code, err = run_cli(train_args(out, tmp_path / "short.txt", "--steps", "1"), capsys)  # tokenised, then refused
    assert code == 2 and "vocabulary has 256" in err and not out.exists()
    out.mkdir()  # an existing empty directory stays, and stays empty
    code, err = run_cli(train_args(out, tmp_path / "short.txt", "--steps", "1"), capsys)
    assert code == 2 and os.listdir(out) == []
    assert main(train_args(out, data, "--steps", "1", "--no-final")) == 0  # the corrected command just runs
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 1


def test_data_directory_and_resume_of_nothing_get_right_messages(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    code, err = run_cli(train_args(tmp_path / "run", tmp_path / "texts", "--steps", "1"), capsys)
    assert code == 2 and "is a directory; give the files in it instead" in err
    code, err = run_cli(["train", "--out", str(tmp_path / "missing"), "--resume"], capsys)
    assert code == 2 and "holds no training run to resume (run.json missing)" in err
    assert "exactly one of" not in err and not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------------ messages
def test_unwritable_output_is_refused_before_any_work(tmp_path):
    """/proc accepts no new files, even for root (for whom access() says yes): the probe names the directory."""
    from gpt2_jax.inspect._common import check_output_path

    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    with pytest.raises(OSError, match=r"cannot write the attention page to '/proc/x.html': cannot create files in "
                                      r"'/proc'"):
        check_output_path("/proc/x.html", "attention page")
    assert check_output_path(tmp_path / "a.html") == tmp_path / "a.html" and os.listdir(tmp_path) == []


def test_undecodable_prompt_bytes_are_warned_about(capsys):
    import argparse

    from gpt2_jax.cli import _warn_undecodable_text

    prompt = b"caf\xe9 ok".decode("utf-8", "surrogateescape")  # how Python hands non-UTF-8 argv bytes over
    _warn_undecodable_text(argparse.Namespace(command="generate", prompt=prompt))
    err = capsys.readouterr().err
    assert "warning: the PROMPT argument holds 1 byte(s) that are not valid UTF-8 (\\xe9)" in err and "U+FFFD" in err
    _warn_undecodable_text(argparse.Namespace(command="generate", prompt="café ok"))
    assert capsys.readouterr().err == ""


def test_notes_name_ignored_weight_files(tmp_path):
    from gpt2_jax.checkpoints.pretrained import from_pretrained

    data = byte_tokens(tmp_path / "bytes.bin")
    assert main(train_args(tmp_path / "run", data, "--steps", "1")) == 0
    final = tmp_path / "run" / "final"
    assert not any("ignored" in n for n in from_pretrained(final).notes)
    (final / "pytorch_model.bin").write_bytes(b"not read")
    notes = from_pretrained(final).notes
    assert any("loaded model.safetensors and ignored pytorch_model.bin" in n for n in notes), notes


def test_failed_checkpoint_write_prints_one_line_not_tracebacks(tmp_path):
    """A checkpoint write that the file system refuses. A full disk (ENOSPC) needs a small file system that only
    root can mount; RLIMIT_FSIZE makes every write past 1.2 MB fail with EFBIG ("File too large") instead, which
    takes the same path through orbax and tensorstore (errors logged from several threads, then dozens of
    "Event loop is closed" tracebacks printed by tensorstore's callbacks). The run must end with status 2 and one
    line naming the step, the reason and what is left; GPT2_JAX_DEBUG=1 shows the full traceback."""
    resource = pytest.importorskip("resource")
    # above the tokenizer's vocab.json (1.04 MB), below each of c_fc's kernel and its two Adam moments (4.2 MB each):
    # tensorstore may spread a checkpoint over several data files, so every file of a smaller state can stay under it
    limit = 1_200_000
    data = byte_tokens(tmp_path / "bytes.bin", 2000)
    args = [sys.executable, "-m", "gpt2_jax.cli", "train", "--config-preset", "tiny", "--config", "vocab_size=256",
            "--config", "n_embd=512", "--config", "n_layer=1", "--config", "n_head=2", "--config", "n_positions=32",
            "--seq-len", "16", "--batch-size", "2", "--no-progress", "--no-plot", "--steps", "2", "--save-every", "2",
            "--data", str(data), "--out", str(tmp_path / "run")]

    def limit_file_size():  # Python ignores SIGXFSZ, so an oversized write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("GPT2_JAX_DEBUG", None)
    proc = subprocess.run(args, cwd=REPO, env=env, preexec_fn=limit_file_size, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("gpt2-jax train: error: could not write the checkpoint of step 2 to ")
    assert "File too large (errno 27); there is no complete checkpoint yet; set GPT2_JAX_DEBUG=1" in errors[0]
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_os_reason_of_a_tensorstore_error():
    from gpt2_jax.training.checkpointing import _os_reason, drop_event_loop_closed

    error = ValueError('OUT_OF_RANGE: Error writing "x" in OCDBT database: Failed to write 121032 bytes to file 19: '
                       "No space left on device [os_error_code='28']")
    assert _os_reason(error) == f"{os.strerror(28)} (errno 28)"
    assert _os_reason(OSError(28, "x")) == f"{os.strerror(28)} (errno 28)"
    noise = ('Traceback (most recent call last):\n  File "base_events.py", line 806, in call_soon_threadsafe\n'
             "    self._check_closed()\nRuntimeError: Event loop is closed\n")
    assert drop_event_loop_closed("before\n" + noise * 3 + "after\n") == "before\nafter\n"
    # two threads printing at once (as a CI run printed them): pieces interleaved, even within a line
    base = '  File "/usr/lib/python3.11/asyncio/base_events.py", line {}, in {}\n'
    interleaved = ("before\nTraceback (most recent call last):\n" + base.format(806, "call_soon_threadsafe") +
                   "Traceback (most recent call last):\n" + base.format(806, "call_soon_threadsafe") +
                   "        self._check_closed()\n    self._check_closed()Traceback (most recent call last):\n" +
                   base.format(519, "_check_closed") + "    raise RuntimeError('Event loop is closed')    raise "
                   "RuntimeError('Event loop is closed')\n\nRuntimeError: Event loop is closed\nRuntimeError: Event "
                   "loop is closed\nafter\n")
    assert drop_event_loop_closed(interleaved) == "before\nafter\n"
    assert drop_event_loop_closed("Traceback (most recent call last):\nValueError: x\n") == \
        "Traceback (most recent call last):\nValueError: x\n"  # other tracebacks are left alone
