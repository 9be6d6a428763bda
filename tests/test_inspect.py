"""The research tools: next-token table, logit lens, model info; checked against the model itself, against Hugging
Face PyTorch on the same weights, and through the ``gpt2-jax`` commands (bad input included)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import VECTORS
from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.config import GPT2Config
from gpt2_jax.inspect import (
    format_logit_lens,
    format_model_info,
    format_next_token_table,
    logit_lens,
    model_info,
    next_token_probs,
    next_token_table,
    plot_logit_lens,
)
from gpt2_jax.inspect._cli import random_params
from gpt2_jax.model import GPT2LMHeadModel, init_params
from gpt2_jax.tokenizer import GPT2Tokenizer
from hf_reference import hf_model, to_numpy
from inspect_helpers import TINY, peaked_params, run_cli

TEXT = "The theory of relativity is"


@pytest.fixture(scope="module")
def params():
    return peaked_params()


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, params, tok):
    """The tiny model saved as a Hugging Face directory with the GPT-2 tokenizer files (what --model takes)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-gpt2"
    save_hf_directory(path, params, TINY, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def hf(params):
    return hf_model(params, TINY)


def _hf_outputs(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)


# next-token table ----------------------------------------------------------------------------------------------
def test_next_token_table_matches_hf_softmax(params, tok, hf):
    ids = tok.encode(TEXT)
    probs = next_token_probs(params, TINY, ids)
    assert probs.shape == (TINY.vocab_size,)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=0, atol=1e-5)
    reference = torch.softmax(_hf_outputs(hf, ids).logits[0, -1], -1).numpy()
    np.testing.assert_allclose(probs, reference, rtol=1e-4, atol=1e-7)

    rows = next_token_table(params, TINY, tok, TEXT, top=10)
    assert len(rows) == 10
    assert [r.id for r in rows] == list(np.argsort(-reference, kind="stable")[:10])
    assert all(a.prob >= b.prob for a, b in zip(rows, rows[1:]))
    for row in rows:
        assert row.token == tok.decode([row.id], errors="backslashreplace")
        np.testing.assert_allclose(row.prob, reference[row.id], rtol=1e-4)
    assert rows[0].prob > 0.05  # peaked weights: the table is not a flat 1/vocab
    table = format_next_token_table(rows)
    assert repr(rows[0].token) in table.splitlines()[1] and str(rows[0].id) in table.splitlines()[1]


def test_next_token_table_bad_input(params, tok):
    with pytest.raises(ValueError, match="n_positions=32"):
        next_token_table(params, TINY, tok, "word " * 40)
    with pytest.raises(ValueError, match="empty"):
        next_token_table(params, TINY, tok, "")
    with pytest.raises(ValueError, match="top"):
        next_token_table(params, TINY, tok, TEXT, top=0)
    with pytest.raises(ValueError, match="exceeds the vocabulary size"):
        next_token_table(params, TINY, tok, TEXT, top=TINY.vocab_size + 1)


# logit lens ----------------------------------------------------------------------------------------------------
def test_logit_lens_last_layer_is_the_models_logits(params, tok):
    ids = tok.encode(TEXT)
    lens = logit_lens(params, TINY, ids, top=4, return_logits=True)
    logits = np.asarray(GPT2LMHeadModel(TINY).apply({"params": params}, np.array([ids])).logits[0])
    L = TINY.n_layer
    assert lens.logits.shape == (L + 1, len(ids), TINY.vocab_size)
    np.testing.assert_allclose(lens.logits[L], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lens.top_ids[L, :, 0], logits.argmax(-1))
    # the other layers are not the final logits (the lens really reads intermediate states)
    assert not np.allclose(lens.logits[0], logits, atol=1e-2)
    assert lens.layer_names == ("embeddings", "layer 1", "layer 2")


def test_logit_lens_matches_hf_hidden_states_through_ln_f_and_head(params, tok, hf):
    ids = tok.encode(TEXT)
    lens = logit_lens(params, TINY, ids, top=5, return_logits=True)
    out = _hf_outputs(hf, ids)
    states = out.hidden_states  # HF: embeddings, blocks 1..L-1, then the final state already through ln_f
    with torch.no_grad():
        expected = [hf.lm_head(hf.transformer.ln_f(h))[0] for h in states[:-1]] + [hf.lm_head(states[-1])[0]]
    expected = np.stack([to_numpy(e) for e in expected])  # [L + 1, seq, vocab]
    np.testing.assert_allclose(lens.logits, expected, rtol=1e-4, atol=1e-4)
    logprobs = expected - np.log(np.exp(expected - expected.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - expected.max(-1, keepdims=True)
    np.testing.assert_allclose(lens.top_probs, np.take_along_axis(np.exp(logprobs), lens.top_ids, -1), rtol=1e-4,
                               atol=1e-6)
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 1e-7)
    target = np.exp(np.take_along_axis(logprobs[:, :-1], np.array(ids[1:])[None, :, None], -1))[..., 0]
    np.testing.assert_allclose(lens.target_probs, target, rtol=1e-4, atol=1e-7)


def test_logit_lens_table_and_png(params, tok, tmp_path):
    ids = tok.encode(TEXT)
    lens = logit_lens(params, TINY, ids, top=1)
    assert lens.logits is None
    table = format_logit_lens(lens, tok, probs=True)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["pos", "input", "emb", "1", "2"]
    assert len(lines) == 1 + len(ids)
    last_top = tok.decode([int(lens.top_ids[-1, 0, 0])]).replace(" ", "\u2423")[:7]
    assert last_top in lines[1]
    path = tmp_path / "deep" / "lens.png"
    plot_logit_lens(lens, tok, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["lens.png"]  # atomic: no temp file left


def test_logit_lens_bad_input(params, tmp_path):
    with pytest.raises(ValueError, match="n_positions=32"):
        logit_lens(params, TINY, list(range(33)))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        logit_lens(params, TINY, [1, TINY.vocab_size])
    with pytest.raises(ValueError, match="top"):
        logit_lens(params, TINY, [1, 2], top=0)
    with pytest.raises(OSError, match="not a directory"):
        not_a_directory = tmp_path / "file"
        not_a_directory.write_text("")
        plot_logit_lens(logit_lens(params, TINY, [1, 2]), None, not_a_directory / "x.png")


# model info ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, total", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                           ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_model_info_presets(preset, total):
    config = GPT2Config.from_preset(preset)
    info = model_info(random_params(config, abstract=True), config)
    assert info.total_params == total
    assert info.total_bytes == 4 * total
    assert info.dtypes == {"float32": total}
    assert sum(m.params for m in info.modules) == total
    d, L = config.n_embd, config.n_layer
    names = [m.name for m in info.modules]
    assert names == ["wte", "wpe", *(f"h/{i}" for i in range(L)), "ln_f"]
    block = 12 * d * d + 13 * d  # attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d, two norms 4 d
    assert all(m.params == block for m in info.modules if m.name.startswith("h/"))
    assert {m.name: m.params for m in info.per_block} == {
        "ln_1": 2 * d, "attn/c_attn": 3 * d * d + 3 * d, "attn/c_proj": d * d + d, "ln_2": 2 * d,
        "mlp/c_fc": 4 * d * d + 4 * d, "mlp/c_proj": 4 * d * d + d,
    }


def test_model_info_real_arrays_depths_and_dtypes():
    params = init_params(jax.random.PRNGKey(0), TINY, param_dtype=jnp.bfloat16)
    info = model_info(params, TINY, depth=1)
    assert [m.name for m in info.modules] == ["wte", "wpe", "h", "ln_f"]
    assert info.dtypes == {"bfloat16": info.total_params}
    assert info.total_bytes == 2 * info.total_params
    deep = model_info(params, TINY, depth=4)
    assert "h/1/attn/c_attn" in [m.name for m in deep.modules]
    assert sum(m.params for m in deep.modules) == info.total_params
    text = format_model_info(info, "tiny")
    assert f"{info.total_params:,}" in text and "bfloat16" in text and '"n_embd": 16' in text
    with pytest.raises(ValueError, match="depth"):
        model_info(params, TINY, depth=0)


# the commands --------------------------------------------------------------------------------------------------
def test_cli_next_lens_info(monkeypatch, model_dir, params, tok, tmp_path):
    code, out, err = run_cli(monkeypatch, "next", TEXT, "--model", str(model_dir), "--top", "3", "--json")
    assert code == 0, err
    rows = json.loads(out)
    expected = next_token_table(params, TINY, tok, TEXT, top=3)
    assert [r["id"] for r in rows] == [r.id for r in expected]

    png = tmp_path / "lens.png"
    code, out, err = run_cli(monkeypatch, "lens", TEXT, "--model", str(model_dir), "--png", str(png))
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out
    assert len(out.splitlines()) == 1 + len(tok.encode(TEXT)) + 1

    code, out, err = run_cli(monkeypatch, "info", "--model", str(model_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["total_params"] == model_info(params, TINY).total_params

    code, out, err = run_cli(monkeypatch, "info", "--model", "gpt2", "--random-weights")
    assert code == 0, err
    assert "124,439,808" in out


@pytest.mark.parametrize("argv, message", [
    (["next", "word " * 40], "the text is 41 tokens, longer than the model's context of n_positions=32"),
    (["lens", "word " * 40], "n_positions=32"),
    (["next", TEXT, "--top", "0"], "--top must be at least 1"),
    (["info", "--depth", "0"], "--depth must be at least 1"),
])
def test_cli_bad_input_is_one_clear_line(monkeypatch, model_dir, argv, message):
    code, out, err = run_cli(monkeypatch, *argv, "--model", str(model_dir))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_unwritable_output(monkeypatch, model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(monkeypatch, "lens", TEXT, "--model", str(model_dir), "--png", str(blocker / "x.png"))
    assert code == 2 and "is not a directory" in err
    code, _, err = run_cli(monkeypatch, "lens", TEXT, "--model", str(model_dir), "--png", str(tmp_path))
    assert code == 2 and "it is a directory" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli(monkeypatch, "lens", TEXT, "--model", str(model_dir), "--png", str(locked / "x.png"))
        assert code == 2 and "not writable" in err


def test_cli_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    code, _, err = run_cli(monkeypatch, "next", TEXT, "--model", str(tmp_path / "nowhere"), "--local-files-only")
    assert code == 2 and "nowhere" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, "info", "--model", "gpt3", "--random-weights")
    assert code == 2 and "neither a preset" in err


# the released model (skipped where its weights are not on disk) ------------------------------------------------
def test_next_token_table_golden_figures():
    if not VECTORS.exists():
        pytest.skip(f"reference vectors not found at {VECTORS}")
    from gpt2_jax.checkpoints.pretrained import from_pretrained

    source = os.environ.get("GPT2_JAX_WEIGHTS") or "gpt2"
    try:
        released = from_pretrained(source, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to find local weights means: skip
        pytest.skip(f"real gpt2 weights are not available locally ({source!r}: {str(e).splitlines()[0]}); "
                    "set GPT2_JAX_WEIGHTS to a Hugging Face gpt2 directory to run this test")
    case = json.loads(VECTORS.read_text())["pretrained_gpt2"]["next_token_top10"]
    rows = next_token_table(released.params, released.config, released.tokenizer, case["prompt"], top=10)
    assert rows[0].id == case["argmax_id"]
    for row, (text, prob) in zip(rows, case["probs_rounded_3"]):
        assert row.token == text
        assert abs(row.prob - prob) <= 6e-4
    lens = logit_lens(released.params, released.config, released.tokenizer.encode(case["prompt"]), top=1)
    assert int(lens.top_ids[-1, -1, 0]) == case["argmax_id"]
