"""The text API (``generate_text`` / ``stream_text``) and the ``gpt2-jax generate`` command on a tiny local
checkpoint with the real GPT-2 tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.pretrained import from_pretrained
from gpt2_jax.cli import main
from gpt2_jax.config import GPT2Config
from gpt2_jax.generation import generate_text, stream_text
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import GPT2Tokenizer

CFG = GPT2Config(vocab_size=50257, n_positions=96, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    save_hf_directory(path, init_params(jax.random.PRNGKey(0), CFG), CFG, tokenizer=GPT2Tokenizer())
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint)


@pytest.fixture(autouse=True)
def no_persistent_cache(monkeypatch):
    monkeypatch.setenv("GPT2_JAX_COMPILATION_CACHE", "off")  # the in-process CLI must not reconfigure JAX


def test_generate_text_shapes_and_full_text(model):
    one = generate_text("Hello there", model, max_new_tokens=8)
    assert isinstance(one, str) and one
    full = generate_text("Hello there", model, max_new_tokens=8, return_full_text=True)
    assert full == "Hello there" + one
    batch = generate_text(["Hi", "A much longer prompt than the first"], model, max_new_tokens=5)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0] == generate_text("Hi", model, max_new_tokens=5)  # padded rows equal rows alone
    several = generate_text("Hi", model, max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=1)
    assert isinstance(several, list) and len(several) == 3


def test_generate_text_from_empty_prompt_and_seed(model):
    a = generate_text("", model, max_new_tokens=6, do_sample=True, seed=3)
    b = generate_text("", model, max_new_tokens=6, do_sample=True, seed=3)
    assert a == b and a


def test_stream_text_concatenates_to_generate_text(model):
    for kwargs in (dict(), dict(do_sample=True, top_k=20, seed=5)):
        streamed = "".join(stream_text("Once upon a time", model, max_new_tokens=12, **kwargs))
        assert streamed == generate_text("Once upon a time", model, max_new_tokens=12, **kwargs)


def test_cli_generate_prints_prompt_and_continuation(checkpoint, model, capsys):
    assert main(["generate", "Hello there", "--model", str(checkpoint), "--max-new-tokens", "8", "--greedy"]) == 0
    printed = capsys.readouterr().out
    assert printed == "Hello there" + generate_text("Hello there", model, max_new_tokens=8) + "\n"
    assert main(["generate", "Hello there", "--model", str(checkpoint), "--max-new-tokens", "8", "--greedy",
                 "--stream"]) == 0
    assert capsys.readouterr().out == printed


def test_cli_sampling_beams_and_sequences(checkpoint, capsys):
    args = ["generate", "The", "--model", str(checkpoint), "--max-new-tokens", "6"]
    assert main(args + ["--seed", "4", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--seed", "4", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert main(args + ["--num-beams", "3", "--num-return-sequences", "2", "--no-repeat-ngram-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "=== 1 ===" in out and "=== 2 ===" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--num-beams", "2", "--num-return-sequences", "3"], "must be <= num_beams"),
        (["--top-k", "-1"], "top_k must be an integer >= 0"),
        (["--max-new-tokens", "200"], r"beyond the model's n_positions \(96\)"),
        (["--min-p", "1.5"], r"min_p must be a number in \[0, 1\]"),
        (["--prompt-lookup", "0"], "prompt_lookup_num_tokens must be an integer >= 1"),
        (["--assistant-model", "x", "--num-assistant-tokens", "0"], "num_assistant_tokens must be an integer >= 1"),
        (["--prompt-lookup", "2", "--num-beams", "2"], "do not combine"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(checkpoint, capsys, extra, message):
    import re

    assert main(["generate", "Hello", "--model", str(checkpoint)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-jax generate: error:") and re.search(message, err)
    assert err.count("\n") == 1


def test_cli_missing_model_is_a_clean_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "Hello", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-jax generate: error:") and "Traceback" not in err


def test_cli_persistent_cache_serves_a_second_process(checkpoint, tmp_path):
    """Two fresh processes: the first fills the compilation cache, the second reuses it (same output)."""
    cache = tmp_path / "jax-cache"
    env = dict(os.environ, GPT2_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "gpt2_jax.cli", "generate", "Hello", "--model", str(checkpoint),
           "--max-new-tokens", "5", "--greedy"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    entries = {p.name for p in cache.iterdir()}
    assert any("sample_program" in name for name in entries)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert {p.name for p in cache.iterdir()} == entries  # nothing new compiled


def test_cli_samplers_stop_and_scores(checkpoint, capsys, tmp_path):
    import numpy as np

    scores = tmp_path / "scores.npy"
    args = ["generate", "The", "--model", str(checkpoint), "--max-new-tokens", "6", "--seed", "2"]
    assert main(args + ["--min-p", "0.05", "--typical-p", "0.95", "--stop", "zzz", "--scores", str(scores)]) == 0
    assert capsys.readouterr().out.startswith("The")
    saved = np.load(scores)
    assert saved.shape[0] == 1 and saved.shape[2] == CFG.vocab_size and 1 <= saved.shape[1] <= 6


def test_cli_prompt_lookup_and_assistant_give_the_greedy_text(checkpoint, capsys):
    args = ["generate", "one two one two one two", "--model", str(checkpoint), "--max-new-tokens", "8", "--greedy"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main(args + ["--prompt-lookup", "3"]) == 0
    assert capsys.readouterr().out == greedy
    assert main(args + ["--assistant-model", str(checkpoint), "--num-assistant-tokens", "3"]) == 0
    assert capsys.readouterr().out == greedy


def test_cli_drafting_takes_scores_and_stop(checkpoint, capsys, tmp_path):
    """--scores and --stop with --prompt-lookup / --assistant-model: the plain greedy text and scores."""
    import numpy as np

    args = ["generate", "one two one two one two", "--model", str(checkpoint), "--max-new-tokens", "6", "--greedy",
            "--stop", "zzz"]
    assert main(args + ["--scores", str(tmp_path / "plain.npy")]) == 0
    plain = capsys.readouterr().out
    for i, extra in enumerate((["--prompt-lookup", "3"], ["--assistant-model", str(checkpoint)])):
        path = tmp_path / f"drafted{i}.npy"
        assert main(args + extra + ["--scores", str(path)]) == 0
        assert capsys.readouterr().out == plain
        np.testing.assert_allclose(np.load(path), np.load(tmp_path / "plain.npy"), rtol=1e-5, atol=1e-5)
