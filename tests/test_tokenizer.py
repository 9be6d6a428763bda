"""Tests for gpt2_jax.tokenizer: bundled asset, golden vectors, parity with HF `tokenizers`, batch API."""

import hashlib
import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2_jax import tokenizer as tokmod
from gpt2_jax.tokenizer import EOT_TOKEN, GPT2Tokenizer, StreamingDecoder

SHARED = Path(__file__).resolve().parents[2] / "shared"
VECTORS = SHARED / "testdata" / "gpt2_vectors.json"
ASSET_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

CORPUS = [
    "",
    "Hello world",
    " Hello world. This is Agney",
    "The quick brown fox jumps over the lazy dog!?",
    "I'm sure you'll see they've done what we'd said; it's 'quoted' and DON'T SHOUT",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، هذه جملة عربية.",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "नमस्ते दुनिया, यह देवनागरी है।",
    "emoji 😀😃 👍🏽 family 👨‍👩‍👧‍👦 flag 🇩🇪 heart ❤️‍🔥",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs\nnew\n\nlines\r\nwindows\u00a0nbsp\u2003em space",
    "\n\n\n    \t  \n",
    "digits 0123456789 3.14159 1,000,000 2024-01-01 ٣٤٥ ४५६",
    "def f(x):\n    return {'a': [1, 2, 3]} if x else None  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "control \x00\x01\x07\x1b[31mred\x1b[0m \x7f end",
    "<|endoftext|> literal special token text <|endoftext|>",
    "combining e\u0301 a\u0308 and zero\u200bwidth\u200djoiner \ufeffbom",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!!!!!!",
    "Ĝġ Ġ Ċ – byte-level lookalikes",
]

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="session")
def tok():
    return GPT2Tokenizer()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    GPT2Tokenizer().save_pretrained(directory)
    return directory


def _hf_bpe(directory, add_prefix_space=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.fixture(scope="session")
def hf(hf_dir):
    return _hf_bpe(hf_dir)


# --------------------------------------------------------------------------- asset and golden vectors


def test_bundled_asset_sha256():
    data = importlib.resources.files("gpt2_jax").joinpath("assets", "gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == ASSET_SHA256


def test_bundled_asset_equals_shared_copy():
    shared = SHARED / "data" / "gpt2.tiktoken"
    if not shared.exists():
        pytest.skip(f"{shared} not present")
    data = importlib.resources.files("gpt2_jax").joinpath("assets", "gpt2.tiktoken").read_bytes()
    assert data == shared.read_bytes()


def _vector_cases():
    if not VECTORS.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{VECTORS} not present"))]
    return [pytest.param(c, id=c["text"][:30]) for c in json.loads(VECTORS.read_text())["tokenizer"]]


@pytest.mark.parametrize("case", _vector_cases())
def test_golden_vectors(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["text"]
    if "tokens" in case:
        assert tok.tokenize(case["text"]) == case["tokens"]
        assert tok.convert_ids_to_tokens(case["ids"]) == case["tokens"]
        assert tok.convert_tokens_to_ids(case["tokens"]) == case["ids"]


def test_golden_special_tokens(tok):
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} not present")
    special = json.loads(VECTORS.read_text())["special_tokens"]
    assert tok.vocab_size == len(tok) == special["vocab_size"]
    assert tok.encode(EOT_TOKEN, allowed_special="all") == [special[EOT_TOKEN]]


def test_special_token_attributes(tok):
    assert tok.vocab_size == len(tok) == 50257
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(tok, f"{name}_token") == EOT_TOKEN
        assert getattr(tok, f"{name}_token_id") == 50256
    assert tok.convert_ids_to_tokens(50256) == EOT_TOKEN
    assert tok.convert_tokens_to_ids(EOT_TOKEN) == 50256


def test_special_text_is_plain_by_default(tok):
    text = f"a{EOT_TOKEN}b"
    plain = tok.encode(text)
    assert 50256 not in plain and tok.decode(plain) == text
    assert tok.encode(text, allowed_special="all") == [64, 50256, 65]
    assert tok.encode(text, allowed_special={EOT_TOKEN}) == [64, 50256, 65]
    assert tok.decode([64, 50256, 65]) == text
    assert tok.decode([64, 50256, 65], skip_special_tokens=True) == "ab"
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode(text, allowed_special={"<|im_start|>"})


# --------------------------------------------------------------------------- parity with HF tokenizers


@pytest.mark.parametrize("text", CORPUS)
def test_parity_with_hf_tokenizers(tok, hf, text):
    enc = hf.encode(text)
    assert tok.encode(text) == enc.ids
    assert tok.tokenize(text) == enc.tokens
    assert tok.decode(enc.ids) == hf.decode(enc.ids) == text


def test_add_prefix_space_parity(hf_dir):
    hf = _hf_bpe(hf_dir, add_prefix_space=True)
    ours = GPT2Tokenizer(add_prefix_space=True)
    for text in CORPUS:
        if EOT_TOKEN not in text:  # HF re-adds the space after every special-token split
            assert ours.encode(text) == hf.encode(text).ids, text
    assert ours.encode("Hello") == GPT2Tokenizer().encode(" Hello")


def test_hf_files_round_trip(tok, hf_dir, tmp_path):
    assert (hf_dir / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"
    loaded = GPT2Tokenizer.from_hf_files(hf_dir / "vocab.json", hf_dir / "merges.txt")
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert GPT2Tokenizer.from_directory(hf_dir).mergeable_ranks == tok.mergeable_ranks
    # OpenAI checkpoint names for the same two formats
    shutil.copy(hf_dir / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(hf_dir / "merges.txt", tmp_path / "vocab.bpe")
    assert GPT2Tokenizer.from_directory(tmp_path).mergeable_ranks == tok.mergeable_ranks
    assert not [p for p in hf_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_transformers_loads_saved_directory(tok, hf_dir):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert auto.eos_token_id == auto.pad_token_id == tok.eos_token_id
    for text in CORPUS:
        assert auto(text)["input_ids"] == tok.encode(text, allowed_special="all"), text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_round_trip_property(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_parity_property(tok, hf, text):
    assert tok.encode(text) == hf.encode(text).ids


# --------------------------------------------------------------------------- vocabulary helpers


def test_vocab_helpers(tok):
    vocab = tok.get_vocab()
    assert len(vocab) == 50257 and vocab["Ġloves"] == 10408 and vocab[EOT_TOKEN] == 50256
    tokens = tok.tokenize("Agney loves 世界")
    assert tok.convert_tokens_to_string(tokens) == "Agney loves 世界"
    assert tok.convert_tokens_to_ids("not-a-token-!!") == tok.unk_token_id
    assert tok.convert_ids_to_tokens(np.array([10408])) == ["Ġloves"]


# --------------------------------------------------------------------------- batch call


def test_batch_right_and_left_padding(tok):
    texts = ["Hello world, how are you?", "Hi"]
    long, short = tok.encode(texts[0]), tok.encode(texts[1])
    pad = [50256] * (len(long) - len(short))
    right = tok(texts, padding=True)
    assert right.input_ids == [long, short + pad]
    assert right.attention_mask == [[1] * len(long), [1] * len(short) + [0] * len(pad)]
    left = tok(texts, padding="longest", padding_side="left")
    assert left["input_ids"] == [long, pad + short]
    assert left["attention_mask"][1] == [0] * len(pad) + [1] * len(short)
    left_default = GPT2Tokenizer(padding_side="left")(texts, padding=True)
    assert left_default == left
    assert tok(texts) == {"input_ids": [long, short], "attention_mask": [[1] * len(long), [1] * len(short)]}


def test_batch_truncation_max_length_and_length(tok):
    texts = ["one two three four five six", "one"]
    out = tok(texts, truncation=True, max_length=4, padding="max_length", return_length=True)
    assert out["input_ids"] == [tok.encode(texts[0])[:4], tok.encode("one") + [50256] * 3]
    assert out["attention_mask"] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert out["length"] == [4, 1]
    assert tok(texts, padding="max_length", max_length=8)["attention_mask"][1] == [1] + [0] * 7
    long = tok("word " * 2000, truncation=True)
    assert len(long["input_ids"]) == tok.model_max_length == 1024


def test_batch_tensors(tok):
    import jax.numpy as jnp

    texts = ["Hello world", "a b c d e"]
    out = tok(texts, padding=True, padding_side="left", return_tensors="np", return_length=True)
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, 5)
    assert out["length"].tolist() == [2, 5]
    jout = tok(texts, padding=True, padding_side="left", return_tensors="jax")
    assert isinstance(jout["input_ids"], jnp.ndarray) and jout["input_ids"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(jout["input_ids"]), out["input_ids"])
    np.testing.assert_array_equal(np.asarray(jout["attention_mask"]), out["attention_mask"])
    single = tok("Hello world", return_tensors="np")
    assert single["input_ids"].shape == (1, 2)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    with pytest.raises(ValueError, match="padding_side"):
        tok(texts, padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="different lengths"):
        tok(texts, return_tensors="np")
    assert tok.batch_decode(out["input_ids"], skip_special_tokens=True) == texts


# --------------------------------------------------------------------------- decoding and streaming


def test_decode_mid_character(tok):
    ids = tok.encode("emoji 😀")
    cut = ids[:-1]  # 😀 is two tokens; drop the last
    assert tok.decode(cut).endswith("\ufffd")
    with pytest.raises(UnicodeDecodeError, match="not valid UTF-8"):
        tok.decode(cut, errors="strict")
    assert tok.decode(np.array(ids)) == tok.decode(ids) == "emoji 😀"


@pytest.mark.parametrize("text", [t for t in CORPUS if t])
def test_streaming_matches_full_decode(tok, text):
    ids = tok.encode(text)
    stream = StreamingDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_streaming_mid_character_end(tok):
    ids = tok.encode("世界😀")
    stream = StreamingDecoder(tok)
    text = "".join(stream.push(i) for i in ids[:-1])
    assert text == "世界"  # the incomplete emoji is held back
    assert stream.flush() == "\ufffd" == tok.decode(ids[:-1])[len(text):]
    assert stream.push(ids[0]) + stream.flush() == tok.decode(ids[:1])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 50256), max_size=30))
def test_streaming_property(tok, ids):
    stream = StreamingDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [123, None, b"bytes", ["list"]])
def test_non_string_input(tok, bad):
    for fn in (tok.encode, tok.tokenize):
        with pytest.raises(TypeError, match=type(bad).__name__):
            fn(bad)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["fine", bad])


@pytest.mark.parametrize("bad_id", [50257, -1, 10**30])
def test_decode_out_of_range(tok, bad_id):
    with pytest.raises(ValueError, match=rf"{bad_id}.*50257"):
        tok.decode([1, bad_id])
    with pytest.raises(ValueError, match="50257"):
        StreamingDecoder(tok).push(bad_id)


def test_decode_non_integer_ids(tok):
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.decode("hello")


def test_bad_vocab_files(hf_dir, tmp_path):
    merges, vocab = hf_dir / "merges.txt", hf_dir / "vocab.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        GPT2Tokenizer.from_hf_files(tmp_path / "missing.json", merges)
    broken = tmp_path / "vocab.json"
    broken.write_text('{"a": 1,')
    with pytest.raises(ValueError, match=r"vocab\.json.*not valid JSON"):
        GPT2Tokenizer.from_hf_files(broken, merges)
    broken.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        GPT2Tokenizer.from_hf_files(broken, merges)
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nĠ t\nthis line is bad\n")
    with pytest.raises(ValueError, match=r"merges\.txt:3"):
        GPT2Tokenizer.from_hf_files(vocab, bad_merges)
    bad_merges.write_text("#version: 0.2\nĠ t\n")
    with pytest.raises(ValueError, match="1 merges"):
        GPT2Tokenizer.from_hf_files(vocab, bad_merges)
    shifted = json.loads(vocab.read_text())
    shifted[EOT_TOKEN] = 60000
    broken.write_text(json.dumps(shifted))
    with pytest.raises(ValueError, match="60000"):
        GPT2Tokenizer.from_hf_files(broken, merges)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        GPT2Tokenizer.from_directory(tmp_path / "empty")
    with pytest.raises(NotADirectoryError, match="does-not-exist"):
        GPT2Tokenizer.from_directory(tmp_path / "does-not-exist")


def test_corrupt_tiktoken_file(tmp_path):
    path = tmp_path / "ranks.tiktoken"
    path.write_text("IQ== 0\nnot!base64 1\n")
    with pytest.raises(ValueError, match=r"ranks\.tiktoken:2"):
        GPT2Tokenizer.from_tiktoken_file(path)
    path.write_text("IQ== 0\n")
    with pytest.raises(ValueError, match="single-byte"):
        GPT2Tokenizer.from_tiktoken_file(path)
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        GPT2Tokenizer.from_tiktoken_file(tmp_path / "nope.tiktoken")


def test_corrupt_bundled_asset(monkeypatch):
    data = tokmod._asset_bytes()
    monkeypatch.setattr(tokmod, "_asset_bytes", lambda: data[:-10] + b"corrupted\n")
    tokmod._bundled_ranks.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="corrupted.*reinstall"):
            GPT2Tokenizer()
    finally:
        monkeypatch.undo()
        tokmod._bundled_ranks.cache_clear()
    assert GPT2Tokenizer().vocab_size == 50257
