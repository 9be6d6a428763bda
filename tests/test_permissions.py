"""Every writer leaves what a plain create would: files ``0o666 & ~umask``, directories ``0o777 & ~umask``.

``tempfile`` creates 0600 files and 0700 directories; the atomic writers build their output there and must give it
the usual permissions before renaming it into place, and they must read the umask without setting it (setting it,
even briefly, races with other threads creating files). Each test runs under umask 0o022 and 0o027 and, while the
writers run, ``os.umask`` is replaced by a function that fails: no writer may touch the process umask.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_jax import atomic
from gpt2_jax.atomic import atomic_directory, atomic_write_path, current_umask
from gpt2_jax.checkpoints.convert import convert_checkpoint
from gpt2_jax.checkpoints.flax_msgpack import write_flax_msgpack
from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.safetensors_io import write_safetensors
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import GPT2Tokenizer

CONFIG = GPT2Config(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2)
UMASKS = [0o022, 0o027]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request, monkeypatch):
    """Set the process umask for the test (restored after) and forbid any further ``os.umask`` call."""
    previous = os.umask(request.param)

    def forbidden(_mask):
        raise AssertionError("a writer called os.umask (racy with other threads): read the umask instead")

    monkeypatch.setattr(os, "umask", forbidden)
    yield request.param
    monkeypatch.undo()
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_tree_modes(root: Path, mask: int) -> int:
    """Every file under ``root`` (and ``root``) has the plain-create mode; returns how many paths were checked."""
    paths = [root, *root.rglob("*")]
    for path in paths:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode(path) == want, f"{path}: {mode(path):o}, want {want:o} (umask {mask:03o})"
    return len(paths)


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.PRNGKey(0), CONFIG)


def test_umask_is_read_without_setting_it(umask, tmp_path):
    assert current_umask() == umask
    assert atomic._probe_umask(tmp_path) == umask  # the fallback where /proc is missing
    assert not list(tmp_path.iterdir())  # the probe is removed


def test_atomic_file_and_directory(umask, tmp_path):
    with atomic_write_path(tmp_path / "sub" / "file.txt") as tmp:
        tmp.write_text("x")
    with atomic_directory(tmp_path / "dir") as tmp:
        (tmp / "inner.txt").write_text("y")
    with atomic_directory(tmp_path / "dir") as tmp:  # replacing an existing directory
        (tmp / "inner.txt").write_text("z")
    assert assert_tree_modes(tmp_path / "sub", umask) == 2
    assert assert_tree_modes(tmp_path / "dir", umask) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "sub"]  # no work directories left


def test_tokenizer_save_pretrained(umask, tmp_path):
    GPT2Tokenizer().save_pretrained(tmp_path / "tok")
    assert assert_tree_modes(tmp_path / "tok", umask) == 5


def test_checkpoint_writers(umask, tmp_path, params):
    hf = save_hf_directory(tmp_path / "hf", params, CONFIG, tokenizer=GPT2Tokenizer())
    assert assert_tree_modes(hf, umask) == 7  # the directory, config.json, model.safetensors, 4 tokenizer files
    convert_checkpoint(str(hf), tmp_path / "converted", dtype="bfloat16", progress=False)
    assert assert_tree_modes(tmp_path / "converted", umask) == 7
    write_safetensors(tmp_path / "t.safetensors", {"a": np.zeros(3, np.float32)})
    write_flax_msgpack(tmp_path / "flax_model.msgpack", params)
    for name in ("t.safetensors", "flax_model.msgpack"):
        assert mode(tmp_path / name) == 0o666 & ~umask


def test_plots_and_pages(umask, tmp_path):
    from gpt2_jax.inspect.attention_view import AttentionMaps, plot_attention, write_attention_html
    from gpt2_jax.inspect.lens import LogitLens, plot_logit_lens
    from gpt2_jax.training.loop import plot_losses

    tokenizer = GPT2Tokenizer()
    ids = np.asarray(tokenizer.encode("one two three"))
    seq = len(ids)
    attentions = np.tril(np.ones((1, 1, seq, seq), np.float32))
    maps = AttentionMaps(ids, attentions / attentions.sum(-1, keepdims=True))
    plot_attention(maps, tokenizer, tmp_path / "attention.png", 0, 0)
    write_attention_html(tmp_path / "attention.html", maps, tokenizer)
    lens = LogitLens(ids, np.zeros((2, seq, 1), np.int64), np.full((2, seq, 1), 0.5, np.float32),
                     np.full((2, seq - 1), 0.5, np.float32), None, ("embeddings", "layer 1"))
    plot_logit_lens(lens, tokenizer, tmp_path / "lens.png")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    for name in ("attention.png", "attention.html", "lens.png", "loss.png"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name


@pytest.mark.parametrize("umask", [0o027], indirect=True, ids=["umask027"])  # one umask: a run costs ~30 s
def test_training_run_outputs(umask, tmp_path):
    """A two-step run on text data: run.json, metrics, the token cache, tokenizer/, orbax checkpoints, final/,
    loss.png."""
    from gpt2_jax.training import TrainConfig, train

    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = TrainConfig(out=str(tmp_path / "run"), data=[str(data)], config_preset="tiny",
                      config_overrides=dict(n_positions=16, n_embd=8, n_layer=1, n_head=2),
                      seq_len=16, batch_size=2, steps=2, save_every=1, progress=False)
    train(cfg)
    out = tmp_path / "run"
    assert {"run.json", "metrics.jsonl", "data", "tokenizer", "checkpoints", "final", "loss.png"} <= \
        {p.name for p in out.iterdir()}
    assert assert_tree_modes(out, umask) > 20
