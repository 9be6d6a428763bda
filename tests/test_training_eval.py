"""Evaluation: loss / perplexity against the Hugging Face sliding-window recipe run on the PyTorch model, and the
``gpt2-jax eval`` command. Tolerance: rtol 1e-5 on the mean NLL (float32 forward passes of both frameworks)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import torch

from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.cli import main
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import GPT2Tokenizer
from gpt2_jax.training.evaluate import evaluate
from hf_reference import hf_model

CONFIG = GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=103).astype(np.uint16)


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.PRNGKey(0), CONFIG)


@pytest.fixture(scope="module")
def torch_model(params):
    return hf_model(params, CONFIG)


def hf_sliding_window(model, tokens, max_length, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity, with exact token counts (see
    gpt2_jax.training.evaluate: the page's ``num_valid_tokens - batch_size`` undercounts later windows by one)."""
    encodings = torch.from_numpy(tokens.astype(np.int64))[None]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [8, 16, 31, 32])
def test_sliding_window_matches_hugging_face(params, torch_model, stride):
    ours = evaluate(params, CONFIG, TOKENS, seq_len=32, stride=stride, batch_size=3, progress=False)
    ref_loss, ref_count = hf_sliding_window(torch_model, TOKENS, 32, stride)
    assert ours.n_tokens == ref_count
    np.testing.assert_allclose(ours.loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(ours.perplexity, math.exp(ref_loss), rtol=1e-5)
    if stride < 32:  # overlapping windows: every token after the first is scored exactly once
        assert ours.n_tokens == len(TOKENS) - 1
    else:  # disjoint windows: each window's first token is context only
        assert ours.n_tokens == len(TOKENS) - ours.n_windows


def test_batching_and_padding_do_not_change_the_result(params):
    # the last window is shorter and the last batch is padded with empty rows: neither may leak into the sums
    results = [evaluate(params, CONFIG, TOKENS, seq_len=32, stride=12, batch_size=b, progress=False) for b in (1, 4, 7)]
    assert len({r.n_tokens for r in results}) == 1
    np.testing.assert_allclose([r.loss for r in results], results[0].loss, rtol=1e-6)


def test_short_text_and_bad_arguments(params):
    short = TOKENS[:10]
    result = evaluate(params, CONFIG, short, progress=False)  # shorter than the context: one window
    assert result.n_windows == 1 and result.n_tokens == 9
    with pytest.raises(ValueError, match="seq_len"):
        evaluate(params, CONFIG, TOKENS, seq_len=64, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(params, CONFIG, TOKENS[:1], progress=False)


def test_eval_command(tmp_path, params, torch_model, capsys):
    save_hf_directory(tmp_path / "model", params, CONFIG, tokenizer=GPT2Tokenizer())
    TOKENS.tofile(tmp_path / "held.bin")
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "held.bin"),
                 "--stride", "16", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref_loss, ref_count = hf_sliding_window(torch_model, TOKENS, 32, 16)
    np.testing.assert_allclose(printed["loss"], ref_loss, rtol=1e-5)
    assert printed["n_tokens"] == ref_count

    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "held.bin")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    (tmp_path / "big.bin").write_bytes(np.array([1, 2, 500], np.uint16).tobytes())
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "big.bin")]) == 2
    assert "token id 500" in capsys.readouterr().err
