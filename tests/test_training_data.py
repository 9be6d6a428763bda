"""Data pipeline: tokenising text / JSONL into a token file, bad input, the deterministic window loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gpt2_jax.tokenizer import GPT2Tokenizer
from gpt2_jax.training.data import (DataError, WindowLoader, _safe_cuts, iter_eval_windows, load_or_tokenize,
                                    load_tokens, tokenize_files)

TOK = GPT2Tokenizer()
EOS = TOK.eos_token_id


def test_text_and_jsonl_with_eos_between_documents(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world.\nSecond line of the first document.", encoding="utf-8")
    records = [{"text": "Doc two"}, {"text": ""}, {"text": "Doc three, with ünïcode"}, {"id": 4, "text": "four"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    meta = tokenize_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out.bin", progress=False)
    docs = ["Hello world.\nSecond line of the first document.", "Doc two", "Doc three, with ünïcode", "four"]
    expected = []
    for i, doc in enumerate(docs):
        expected += ([EOS] if i else []) + TOK.encode(doc)
    tokens = load_tokens(tmp_path / "out.bin")
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    assert tokens.tolist() == expected
    assert meta["n_tokens"] == len(expected) and meta["n_documents"] == 4 and meta["eos_id"] == EOS
    assert json.loads((tmp_path / "out.bin.json").read_text())["dtype"] == "uint16"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_custom_text_field_and_eos(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n', encoding="utf-8")
    tokenize_files(tmp_path / "c.jsonl", tmp_path / "c.bin", text_field="body", eos_id=7, progress=False)
    assert load_tokens(tmp_path / "c.bin").tolist() == TOK.encode("x y") + [7] + TOK.encode("z")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", " ", "\n", "\n\n", "  ", "'s", "7", ".", "\t", "é", "\r\n"]),
                max_size=80),
       st.integers(1, 12))
def test_chunked_tokenising_is_exact(pieces, every):
    text = "".join(pieces)
    chunks = list(_safe_cuts(text, every))
    assert "".join(chunks) == text
    assert sum((TOK.encode(c) for c in chunks), []) == TOK.encode(text)


def test_long_text_is_chunked_exactly(tmp_path, monkeypatch):
    import gpt2_jax.training.data as data

    monkeypatch.setattr(data, "_CHUNK_CHARS", 64)
    text = "".join(f"Line {i}:  some words\n\n  indented {i}\nnext\n" for i in range(200))
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    tokenize_files(tmp_path / "long.txt", tmp_path / "long.bin", progress=False)
    assert load_tokens(tmp_path / "long.bin").tolist() == TOK.encode(text)


@pytest.mark.parametrize("content, suffix, message", [
    ("", ".txt", "no text found"),
    ("\n\n", ".jsonl", "no text found"),
    ('{"text": "ok"}\nnot json\n', ".jsonl", r"bad\.jsonl:2: not valid JSON"),
    ('{"title": "no text"}\n', ".jsonl", r"bad\.jsonl:1: no 'text' field"),
    ('{"text": 5}\n', ".jsonl", "is int, not a string"),
    (b"\xff\xfe bytes", ".txt", "not UTF-8"),
])
def test_bad_input_files(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(DataError, match=message):
        tokenize_files(path, tmp_path / "out.bin", progress=False)
    assert not (tmp_path / "out.bin").exists()  # atomic: nothing left behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.bin")]


def test_failed_tokenising_keeps_the_previous_file(tmp_path):
    (tmp_path / "good.txt").write_text("good text")
    tokenize_files(tmp_path / "good.txt", tmp_path / "out.bin", progress=False)
    before = (tmp_path / "out.bin").read_bytes()
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError):
        tokenize_files([tmp_path / "good.txt", tmp_path / "bad.jsonl"], tmp_path / "out.bin", progress=False)
    assert (tmp_path / "out.bin").read_bytes() == before


def test_missing_and_malformed_token_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        tokenize_files(tmp_path / "nope.txt", tmp_path / "o.bin", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        load_tokens(tmp_path / "nope.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_tokens(tmp_path / "empty.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a multiple of uint16"):
        load_tokens(tmp_path / "odd.bin")


def test_load_or_tokenize_caches_until_the_source_changes(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("one two three")
    cache = tmp_path / "cache"
    first = load_or_tokenize(src, cache, progress=False)
    stamp = (cache / "corpus.bin").stat().st_mtime_ns
    again = load_or_tokenize(src, cache, progress=False)
    assert (cache / "corpus.bin").stat().st_mtime_ns == stamp and again.tolist() == first.tolist()
    src.write_text("one two three four five")
    assert load_or_tokenize(src, cache, progress=False).tolist() == TOK.encode("one two three four five")
    raw = tmp_path / "raw.bin"  # a nanoGPT-style uint16 file without sidecar is memory-mapped as is
    np.arange(10, dtype=np.uint16).tofile(raw)
    assert load_or_tokenize(raw, cache, progress=False).tolist() == list(range(10))


TOKENS = np.arange(1000, dtype=np.uint16)  # token i at offset i: windows show their offsets


@pytest.mark.parametrize("shuffle", ["random", "epoch"])
def test_loader_is_a_pure_function_of_seed_and_step(shuffle):
    loader = WindowLoader(TOKENS, batch_size=6, seq_len=16, seed=3, shuffle=shuffle)
    b = loader.batch(5)
    assert b.shape == (6, 17) and b.dtype == np.int32
    np.testing.assert_array_equal(b[:, 1:] - b[:, :-1], 1)  # each row is a contiguous slice of the tokens
    np.testing.assert_array_equal(b, WindowLoader(TOKENS, 6, 16, seed=3, shuffle=shuffle).batch(5))
    assert not np.array_equal(b, loader.batch(6))
    assert not np.array_equal(b, WindowLoader(TOKENS, 6, 16, seed=4, shuffle=shuffle).batch(5))
    # process slices concatenate to the global batch
    np.testing.assert_array_equal(np.concatenate([loader.batch(5, p, 3) for p in range(3)]), b)
    with pytest.raises(ValueError, match="not divisible by 4 processes"):
        loader.batch(0, 0, 4)


def test_loader_accepts_jax_keys():
    import jax

    a = WindowLoader(TOKENS, 4, 8, seed=jax.random.PRNGKey(1)).batch(0)
    b = WindowLoader(TOKENS, 4, 8, seed=jax.random.key(1)).batch(0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, WindowLoader(TOKENS, 4, 8, seed=jax.random.PRNGKey(2)).batch(0))


def test_epoch_mode_visits_every_window_once_per_epoch():
    loader = WindowLoader(TOKENS, batch_size=7, seq_len=10, seed=0, shuffle="epoch")
    n = loader.num_windows
    assert n == 99
    steps = -(-3 * n // 7)  # at least three epochs
    starts = np.concatenate([loader.starts(s) for s in range(steps)])
    for epoch in range(3):
        assert sorted(starts[epoch * n:(epoch + 1) * n]) == [i * 10 for i in range(n)]
    assert list(starts[:n]) != list(starts[n:2 * n])  # reshuffled per epoch
    assert loader.batch(steps - 1).max() < len(TOKENS)


def test_random_mode_reaches_the_last_token():
    loader = WindowLoader(np.arange(20, dtype=np.uint16), batch_size=64, seq_len=10, seed=0)
    starts = np.concatenate([loader.starts(s) for s in range(5)])
    assert starts.min() == 0 and starts.max() == 9  # window [9, 20) ends on the last token


def test_too_short_and_empty_data():
    with pytest.raises(DataError, match="holds 10 tokens; one training window needs seq_len \\+ 1 = 11"):
        WindowLoader(np.arange(10, dtype=np.uint16), batch_size=2, seq_len=10)
    WindowLoader(np.arange(11, dtype=np.uint16), batch_size=2, seq_len=10)  # exactly one window is enough
    with pytest.raises(DataError, match="the data is empty"):
        WindowLoader(np.zeros(0, np.uint16), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="shuffle"):
        WindowLoader(TOKENS, 2, 8, shuffle="sorted")


@pytest.mark.parametrize("n, seq_len, stride", [(100, 32, 8), (100, 32, 32), (100, 32, 31), (32, 32, 16), (5, 32, 4)])
def test_eval_windows_score_every_token_once(n, seq_len, stride):
    windows = list(iter_eval_windows(np.zeros(n), seq_len, stride))
    assert all(0 < end - begin <= seq_len and 0 < new <= end - begin for begin, end, new in windows)
    assert windows[-1][1] == n
    assert sum(new for _, _, new in windows) == n  # the new parts tile the text
    assert [b for b, _, _ in windows] == list(range(0, stride * len(windows), stride))
    with pytest.raises(ValueError, match="stride"):
        list(iter_eval_windows(np.zeros(n), seq_len, seq_len + 1))
