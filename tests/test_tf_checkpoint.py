"""Reading OpenAI's TensorFlow GPT-2 checkpoints without TensorFlow.

The fixtures in tests/fixtures/openai_tf_tiny/ were written by real TensorFlow (tests/fixtures/make_openai_tf_tiny.py);
``expected.npz`` holds the same weights under Hugging Face state-dict names, produced from the generator's numpy
arrays, not by reading the checkpoint back. Corruption tests work on copies in ``tmp_path``.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from gpt2_jax.checkpoints import tf_bundle
from gpt2_jax.checkpoints.openai_tf import (
    find_tf_checkpoint_prefix,
    is_bookkeeping_variable,
    is_openai_tf_checkpoint,
    load_openai_tf_params,
    read_openai_hparams,
)
from gpt2_jax.checkpoints.safetensors_io import CheckpointError
from gpt2_jax.checkpoints.tf_bundle import (
    TFBundleError,
    TFChecksumError,
    crc32c,
    load_tensor_bundle,
    masked_crc32c,
    read_bundle_header,
    read_bundle_index,
    read_tensor,
    unmask_crc32c,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "openai_tf_tiny")
WITH_OPTIMIZER = os.path.join(TINY, "variants", "with_optimizer")
DTYPES = os.path.join(TINY, "variants", "dtypes")
TINY_HPARAMS = {"n_vocab": 96, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}
D = TINY_HPARAMS["n_embd"]


def expected_state(directory: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, "expected.npz")) as data:
        return {k: data[k] for k in data.files}


def openai_to_hf(name: str) -> str:
    """``model/h1/mlp/c_fc/w`` -> ``transformer.h.1.mlp.c_fc.weight`` (the test's own, independent table)."""
    parts = name.split("/")
    assert parts[0] == "model", name
    parts = parts[1:]
    if parts in (["wte"], ["wpe"]):
        return f"transformer.{parts[0]}.weight"
    leaf = {"w": "weight", "g": "weight", "b": "bias"}[parts[-1]]
    if parts[0].startswith("h"):
        return ".".join(["transformer", "h", parts[0][1:], *parts[1:-1], leaf])
    return ".".join(["transformer", *parts[:-1], leaf])


def hf_to_params_path(name: str) -> tuple[str, ...]:
    """``transformer.h.0.attn.c_attn.weight`` -> ``('h', '0', 'attn', 'c_attn', 'kernel')`` per the brief's table."""
    *module, leaf = name.removeprefix("transformer.").split(".")
    if leaf == "bias":
        return (*module, "bias")
    if module[-1] in ("wte", "wpe"):
        return (*module, "embedding")
    if module[-1].startswith("ln_"):
        return (*module, "scale")
    return (*module, "kernel")


def flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def copy_fixture(tmp_path, source=TINY) -> str:
    target = str(tmp_path / "ckpt")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("variants"))
    return target


def write_hparams(directory: str, **changes) -> None:
    with open(os.path.join(directory, "hparams.json"), "w") as f:
        json.dump({**TINY_HPARAMS, **changes}, f)


# ---------------------------------------------------------------------------------------------------------------
# CRC32C
# ---------------------------------------------------------------------------------------------------------------
def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI) appendix B.4 test vectors.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(np.arange(32, dtype=np.uint8)) == 0x46DD794E
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283
    for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        assert unmask_crc32c(masked_crc32c(value)) == value


@pytest.mark.parametrize("n", [tf_bundle._SCALAR_LIMIT, 4 * tf_bundle._LANES * 9 + 13])
def test_crc32c_vectorised_path_matches_scalar_loop(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    scalar = tf_bundle._crc_raw_scalar(0xFFFFFFFF, memoryview(data)) ^ 0xFFFFFFFF
    assert tf_bundle._crc_raw_vectorized(0xFFFFFFFF, data) ^ 0xFFFFFFFF == scalar
    assert crc32c(data) == scalar
    assert crc32c(data[n // 3 :], crc32c(data[: n // 3])) == scalar
    assert crc32c(data.view(np.uint8)[1:].copy()) != scalar


# ---------------------------------------------------------------------------------------------------------------
# The tensor-bundle reader
# ---------------------------------------------------------------------------------------------------------------
def test_bundle_index_lists_every_variable_with_dtype_shape_and_location():
    prefix = os.path.join(TINY, "model.ckpt")
    header = read_bundle_header(prefix)
    assert (header.num_shards, header.little_endian, header.version) == (1, True, 1)
    index = read_bundle_index(prefix)
    expected = expected_state(TINY)
    assert sorted(openai_to_hf(n) for n in index) == sorted(expected)
    assert len(index) == 4 + 12 * TINY_HPARAMS["n_layer"]
    data_size = os.path.getsize(os.path.join(TINY, "model.ckpt.data-00000-of-00001"))
    spans = []
    for name, entry in index.items():
        assert entry.name == name
        assert entry.dtype == np.float32 and entry.tf_dtype == "float32"
        assert entry.shard == 0 and not entry.sliced and entry.crc32c is not None
        hf_shape = expected[openai_to_hf(name)].shape
        assert entry.shape == ((1, *hf_shape) if name.endswith("/w") else hf_shape)
        assert entry.size == 4 * math.prod(entry.shape)
        spans.append((entry.offset, entry.offset + entry.size))
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == data_size
    assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))  # contiguous, no overlap
    assert index["model/h0/attn/c_attn/w"].shape == (1, D, 3 * D)


@pytest.mark.parametrize("mmap", [False, True])
def test_load_tensor_bundle_exact_values(mmap):
    tensors = load_tensor_bundle(os.path.join(TINY, "model.ckpt"), mmap=mmap)
    expected = expected_state(TINY)
    assert len(tensors) == len(expected)
    for name, array in tensors.items():
        want = expected[openai_to_hf(name)]
        assert array.dtype == np.float32
        if name.endswith("/w"):
            assert array.shape == (1, *want.shape)
            array = array[0]
        np.testing.assert_array_equal(array, want, err_msg=name)


def test_every_supported_dtype_reads_exactly():
    prefix = os.path.join(DTYPES, "bundle")
    index = read_bundle_index(prefix)
    expected = {k.replace("__", "/"): v for k, v in expected_state(DTYPES).items()}
    assert set(index) == set(expected) | {"text"}
    wanted_dtypes = {
        "f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i32": "int32", "i64": "int64",
        "u8": "uint8", "i8": "int8", "i16": "int16", "flags": "bool", "scalar": "float32", "empty": "float32",
    }  # fmt: skip
    for name, want in expected.items():
        array = read_tensor(prefix, index[name])
        if name in wanted_dtypes:
            assert array.dtype.name == wanted_dtypes[name], name
        assert array.shape == want.shape, name
        np.testing.assert_array_equal(array.astype(want.dtype), want, err_msg=name)
    assert index["scalar"].shape == () and index["empty"].shape == (0, 4) and index["empty"].size == 0
    assert index["i64"].dtype == np.int64 and read_tensor(prefix, index["i64"])[-1] == 2**62 + 12345
    # Unsupported dtypes are listed but refused with their TF name.
    assert index["text"].dtype is None and index["text"].tf_dtype == "string"
    with pytest.raises(TFBundleError, match="tensor 'text' has TensorFlow dtype string"):
        read_tensor(prefix, index["text"])
    with pytest.raises(TFBundleError, match="'text'"):
        load_tensor_bundle(prefix)


def test_missing_index_and_missing_data_shard(tmp_path):
    directory = copy_fixture(tmp_path)
    prefix = os.path.join(directory, "model.ckpt")
    with pytest.raises(FileNotFoundError, match=r"model\.ckpt-nope\.index. does not exist"):
        read_bundle_index(prefix + "-nope")
    with pytest.raises(FileNotFoundError, match="without the '.index' suffix"):
        read_bundle_index(prefix + ".index")
    os.remove(prefix + ".data-00000-of-00001")
    index = read_bundle_index(prefix)  # the index alone is fine
    with pytest.raises(FileNotFoundError, match=r"data shard .*model\.ckpt\.data-00000-of-00001' does not exist"):
        read_tensor(prefix, index["model/wte"])
    with pytest.raises(FileNotFoundError, match="data-00000-of-00001"):
        load_openai_tf_params(directory)
    os.remove(prefix + ".index")
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint|does not exist"):
        load_openai_tf_params(directory)


def test_truncated_data_file_names_tensor_byte_range_and_file_size(tmp_path):
    directory = copy_fixture(tmp_path)
    prefix = os.path.join(directory, "model.ckpt")
    data_path = prefix + ".data-00000-of-00001"
    wte = read_bundle_index(prefix)["model/wte"]
    assert (wte.offset, wte.size) == (28416, 96 * 16 * 4)
    with open(data_path, "r+b") as f:
        f.truncate(30000)
    message = rf"tensor 'model/wte' needs bytes \[28416, 34560\) of {data_path} but the file has 30000 bytes"
    with pytest.raises(TFBundleError, match=message):
        read_tensor(prefix, wte)
    with pytest.raises(TFBundleError, match=message):
        load_tensor_bundle(prefix)
    with pytest.raises(TFBundleError, match=message):
        load_openai_tf_params(directory)
    with pytest.raises(TFBundleError, match=message):
        load_openai_tf_params(directory, verify_checksums=False)


def test_corrupted_index_magic_and_truncated_index(tmp_path):
    directory = copy_fixture(tmp_path)
    index_path = os.path.join(directory, "model.ckpt.index")
    with open(index_path, "rb") as f:
        original = f.read()
    with open(index_path, "wb") as f:
        f.write(original[:-1] + b"\x00")
    with pytest.raises(TFBundleError, match=r"bad table magic number 0x00.*expected 0xdb4775248b80fb57"):
        read_bundle_index(os.path.join(directory, "model.ckpt"))
    with pytest.raises(CheckpointError, match="bad table magic"):
        load_openai_tf_params(directory)
    with open(index_path, "wb") as f:
        f.write(original[: len(original) // 2])
    with pytest.raises(TFBundleError, match="magic"):
        read_bundle_index(os.path.join(directory, "model.ckpt"))
    with open(index_path, "wb") as f:
        f.write(original[:20])
    with pytest.raises(TFBundleError, match="too short"):
        read_bundle_index(os.path.join(directory, "model.ckpt"))


def _first_data_block(index_bytes: bytes) -> tuple[int, int]:
    footer = index_bytes[-tf_bundle.FOOTER_SIZE :]
    _, _, pos = tf_bundle._read_block_handle(footer, 0, "metaindex")
    offset, size, _ = tf_bundle._read_block_handle(footer, pos, "index")
    index_block = index_bytes[offset : offset + size]
    _, handle = next(tf_bundle._iter_block_entries(index_block, "index", "index block"))
    offset, size, _ = tf_bundle._read_block_handle(handle, 0, "data block")
    return offset, size


def test_corrupted_index_block_fails_its_checksum(tmp_path):
    directory = copy_fixture(tmp_path)
    prefix = os.path.join(directory, "model.ckpt")
    with open(prefix + ".index", "rb") as f:
        data = bytearray(f.read())
    offset, size = _first_data_block(bytes(data))
    position = data.index(b"model/h0/attn/c_attn/b", offset)  # the first key is stored whole
    data[position + 9] ^= 0x20  # 'attn' -> 'Attn'
    with open(prefix + ".index", "wb") as f:
        f.write(data)
    with pytest.raises(TFChecksumError, match=r"data block at offset 0 .*fails its CRC32C check"):
        read_bundle_index(prefix)
    assert "model/h0/Attn/c_attn/b" in read_bundle_index(prefix, verify_checksums=False)


def test_compressed_index_block_is_refused(tmp_path):
    directory = copy_fixture(tmp_path)
    prefix = os.path.join(directory, "model.ckpt")
    with open(prefix + ".index", "rb") as f:
        data = bytearray(f.read())
    offset, size = _first_data_block(bytes(data))
    assert data[offset + size] == 0  # TensorFlow wrote it uncompressed
    data[offset + size] = 1  # claim snappy, with a valid trailer checksum
    crc = masked_crc32c(crc32c(bytes(data[offset : offset + size + 1])))
    data[offset + size + 1 : offset + size + 5] = crc.to_bytes(4, "little")
    with open(prefix + ".index", "wb") as f:
        f.write(data)
    with pytest.raises(TFBundleError, match=r"compression type 1 \(snappy\); only uncompressed blocks"):
        read_bundle_index(prefix)


def test_flipped_data_byte_fails_checksum_naming_the_tensor(tmp_path):
    directory = copy_fixture(tmp_path)
    prefix = os.path.join(directory, "model.ckpt")
    entry = read_bundle_index(prefix)["model/h0/attn/c_attn/w"]
    data_path = prefix + ".data-00000-of-00001"
    with open(data_path, "r+b") as f:
        f.seek(entry.offset + 101)
        byte = f.read(1)
        f.seek(entry.offset + 101)
        f.write(bytes([byte[0] ^ 0x01]))
    message = r"tensor 'model/h0/attn/c_attn/w' in .* fails its CRC32C check"
    with pytest.raises(TFChecksumError, match=message):
        read_tensor(prefix, entry)
    with pytest.raises(TFChecksumError, match=message):
        read_tensor(prefix, entry, mmap=True)
    with pytest.raises(TFChecksumError, match=message):
        load_openai_tf_params(directory)
    # Without verification the (corrupt) bytes come back: only that one float differs.
    corrupt = read_tensor(prefix, entry, verify_checksums=False)
    _, params = load_openai_tf_params(directory, verify_checksums=False)
    want = expected_state(TINY)["transformer.h.0.attn.c_attn.weight"]
    assert np.count_nonzero(corrupt[0] != want) == 1
    assert np.count_nonzero(params["h"]["0"]["attn"]["c_attn"]["kernel"] != want) == 1


# ---------------------------------------------------------------------------------------------------------------
# OpenAI checkpoint directories
# ---------------------------------------------------------------------------------------------------------------
def test_read_openai_hparams_converts_to_hugging_face_keys():
    config = read_openai_hparams(TINY)
    assert config == {
        "vocab_size": 96,
        "n_positions": 32,
        "n_embd": 16,
        "n_head": 2,
        "n_layer": 2,
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
    }


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"hparams\.json' does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"n_vocab": 96, "n_ctx": 32, "n_embd": 16}), "lacks n_head, n_layer"),
        (json.dumps({**TINY_HPARAMS, "n_embd": "16"}), "n_embd must be a positive integer, got '16'"),
        (json.dumps({**TINY_HPARAMS, "n_layer": 0}), "n_layer must be a positive integer, got 0"),
        (json.dumps({**TINY_HPARAMS, "n_head": 3}), r"n_embd \(16\) is not divisible by n_head \(3\)"),
    ],
)
def test_read_openai_hparams_errors(tmp_path, content, message):
    directory = copy_fixture(tmp_path)
    path = os.path.join(directory, "hparams.json")
    if content is None:
        os.remove(path)
        error = FileNotFoundError
    else:
        with open(path, "w") as f:
            f.write(content)
        error = CheckpointError
    with pytest.raises(error, match=message):
        read_openai_hparams(directory)
    with pytest.raises(error, match=message):
        load_openai_tf_params(directory)


def test_load_openai_tf_params_nested_layout_and_exact_values():
    config, params = load_openai_tf_params(TINY)
    assert config == read_openai_hparams(TINY)
    assert set(params) == {"wte", "wpe", "h", "ln_f"}
    assert set(params["h"]) == {"0", "1"}
    assert set(params["h"]["0"]) == {"ln_1", "attn", "ln_2", "mlp"}
    assert set(params["h"]["0"]["attn"]) == {"c_attn", "c_proj"}
    assert set(params["h"]["0"]["mlp"]) == {"c_fc", "c_proj"}
    assert params["h"]["1"]["attn"]["c_attn"]["kernel"].shape == (D, 3 * D)
    assert params["h"]["1"]["mlp"]["c_fc"]["kernel"].shape == (D, 4 * D)
    assert params["h"]["1"]["mlp"]["c_proj"]["kernel"].shape == (4 * D, D)
    assert params["wte"]["embedding"].shape == (96, D) and params["wpe"]["embedding"].shape == (32, D)
    assert params["ln_f"]["scale"].shape == (D,)
    flat = dict(flatten(params))
    expected = expected_state(TINY)
    assert sorted(flat) == sorted(hf_to_params_path(name) for name in expected)
    for name, want in expected.items():
        got = flat[hf_to_params_path(name)]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_params_match_the_project_hugging_face_mapping():
    """Our layout is the one the Flax model and the HF-state-dict mapping use."""
    from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict, state_dict_to_params
    from gpt2_jax.config import GPT2Config

    config, params = load_openai_tf_params(TINY)
    expected = expected_state(TINY)
    from_hf = state_dict_to_params(expected, GPT2Config.from_hf_dict(config))
    assert dict(flatten(from_hf)).keys() == dict(flatten(params)).keys()
    state = params_to_state_dict(params)
    assert sorted(state) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(state[name], want, err_msg=name)


def test_checkpoint_with_optimizer_state_skips_bookkeeping():
    index = read_bundle_index(find_tf_checkpoint_prefix(WITH_OPTIMIZER))
    skipped = sorted(n for n in index if is_bookkeeping_variable(n))
    assert {"global_step", "beta1_power", "beta2_power", "model/wte/Adam", "model/wte/Adam_1"} <= set(skipped)
    assert len(skipped) == 3 + 2 * (len(index) - len(skipped))
    assert index["global_step"].dtype == np.int64
    assert read_tensor(find_tf_checkpoint_prefix(WITH_OPTIMIZER), index["global_step"]) == 1
    config, params = load_openai_tf_params(WITH_OPTIMIZER)
    assert (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"]) == (16, 8, 8, 1)
    flat = dict(flatten(params))
    expected = expected_state(WITH_OPTIMIZER)
    assert sorted(flat) == sorted(hf_to_params_path(name) for name in expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(flat[hf_to_params_path(name)], want, err_msg=name)


def test_is_bookkeeping_variable_is_exact():
    for name in ("global_step", "beta1_power", "beta2_power_1", "model/h0/mlp/c_fc/w/Adam", "model/wpe/Adam_12",
                 "_CHECKPOINTABLE_OBJECT_GRAPH"):  # fmt: skip
        assert is_bookkeeping_variable(name), name
    for name in ("model/wte", "model/h0/ln_1/g", "global_step_2", "model/wte/Adamax", "model/wte/Momentum",
                 "model/Adam/wte", "beta3_power", "model/global_step"):  # fmt: skip
        assert not is_bookkeeping_variable(name), name


def test_find_tf_checkpoint_prefix(tmp_path):
    assert find_tf_checkpoint_prefix(TINY) == os.path.join(TINY, "model.ckpt")
    assert find_tf_checkpoint_prefix(WITH_OPTIMIZER) == os.path.join(WITH_OPTIMIZER, "model.ckpt-1")
    assert find_tf_checkpoint_prefix(DTYPES) == os.path.join(DTYPES, "bundle")  # no checkpoint file: single *.index
    directory = copy_fixture(tmp_path)
    state = os.path.join(directory, "checkpoint")
    # An absolute path from the machine that saved it: retried by base name.
    with open(state, "w") as f:
        f.write('model_checkpoint_path: "/somewhere/else/model.ckpt"\nall_model_checkpoint_paths: "/x/model.ckpt"\n')
    assert find_tf_checkpoint_prefix(directory) == os.path.join(directory, "model.ckpt")
    with open(state, "w") as f:
        f.write('model_checkpoint_path: "/somewhere/else/model.ckpt-5"\n')
    with pytest.raises(
        FileNotFoundError, match=r"but neither '/somewhere/else/model\.ckpt-5\.index' nor '.*/ckpt/model"
    ):
        find_tf_checkpoint_prefix(directory)
    with open(state, "w") as f:
        f.write('model_checkpoint_path: "model.ckpt-999"\n')
    with pytest.raises(
        FileNotFoundError, match=r"names checkpoint 'model\.ckpt-999', but '.*model\.ckpt-999\.index' does not exist"
    ):
        find_tf_checkpoint_prefix(directory)
    os.remove(state)
    assert find_tf_checkpoint_prefix(directory) == os.path.join(directory, "model.ckpt")
    shutil.copy(os.path.join(directory, "model.ckpt.index"), os.path.join(directory, "other.index"))
    with pytest.raises(FileNotFoundError, match=r"holds 2 checkpoints \(model\.ckpt\.index, other\.index\)"):
        find_tf_checkpoint_prefix(directory)
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        find_tf_checkpoint_prefix(os.path.join(directory, "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint"):
        find_tf_checkpoint_prefix(empty)


def test_is_openai_tf_checkpoint(tmp_path):
    assert is_openai_tf_checkpoint(TINY)
    assert is_openai_tf_checkpoint(WITH_OPTIMIZER)
    assert not is_openai_tf_checkpoint(DTYPES)  # no hparams.json
    assert not is_openai_tf_checkpoint(tmp_path)
    assert not is_openai_tf_checkpoint(tmp_path / "missing")
    directory = copy_fixture(tmp_path)
    os.remove(os.path.join(directory, "model.ckpt.index"))
    assert not is_openai_tf_checkpoint(directory)
    with open(os.path.join(tmp_path, "hparams.json"), "w") as f:
        json.dump({"vocab_size": 96}, f)  # a Hugging Face style file is not OpenAI's
    assert not is_openai_tf_checkpoint(tmp_path)
    directory = copy_fixture(tmp_path / "again")
    with open(os.path.join(directory, "hparams.json"), "w") as f:
        f.write("{not json")
    assert not is_openai_tf_checkpoint(directory)


def test_missing_variable(tmp_path):
    directory = copy_fixture(tmp_path)
    write_hparams(directory, n_layer=3)
    with pytest.raises(CheckpointError, match=r"lacks 12 variable\(s\) of a GPT-2 with n_layer=3: 'model/h2/"):
        load_openai_tf_params(directory)


def test_variable_beyond_n_layer_is_unknown(tmp_path):
    directory = copy_fixture(tmp_path)
    write_hparams(directory, n_layer=1)
    with pytest.raises(
        CheckpointError,
        match=r"not part of OpenAI's GPT-2 layout: 'model/h1/attn/c_attn/b' \(layer 1, but hparams.json says "
        r"n_layer=1\).* and 2 more",
    ):
        load_openai_tf_params(directory)


def test_unknown_variable_fails_loudly(tmp_path, monkeypatch):
    from gpt2_jax.checkpoints import openai_tf

    real = openai_tf.read_bundle_index

    def with_extra(prefix, **kwargs):
        index = real(prefix, **kwargs)
        entry = index["model/ln_f/b"]
        index["model/h0/attn/c_attn/w/Momentum"] = entry
        return index

    monkeypatch.setattr(openai_tf, "read_bundle_index", with_extra)
    with pytest.raises(CheckpointError, match=r"not part of OpenAI's GPT-2 layout: 'model/h0/attn/c_attn/w/Momentum'"):
        load_openai_tf_params(TINY)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_vocab": 95}, r"variable 'model/wte' has shape \[96, 16\], but hparams.json .* implies \[95, 16\]"),
        ({"n_ctx": 64}, r"variable 'model/wpe' has shape \[32, 16\], but hparams.json .* implies \[64, 16\]"),
        ({"n_embd": 32}, r"variable 'model/wte' has shape \[96, 16\], but hparams.json .* implies \[96, 32\]"),
    ],
)
def test_shape_that_disagrees_with_hparams(tmp_path, changes, message):
    directory = copy_fixture(tmp_path)
    write_hparams(directory, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_openai_tf_params(directory)


def test_kernel_shape_error_shows_tf_shape(monkeypatch):
    import dataclasses

    from gpt2_jax.checkpoints import openai_tf

    real = openai_tf.read_bundle_index

    def with_bad_kernel(prefix, **kwargs):
        index = real(prefix, **kwargs)
        name = "model/h1/attn/c_attn/w"
        index[name] = dataclasses.replace(index[name], shape=(D, 3 * D))  # [in, out] without the leading 1
        return index

    monkeypatch.setattr(openai_tf, "read_bundle_index", with_bad_kernel)
    with pytest.raises(
        CheckpointError, match=r"variable 'model/h1/attn/c_attn/w' has shape \[16, 48\], .* implies \[1, 16, 48\]"
    ):
        load_openai_tf_params(TINY)


# ---------------------------------------------------------------------------------------------------------------
# The mapping, proved by logits: OpenAI's model.py semantics (numpy) vs Hugging Face's GPT2LMHeadModel.
# ---------------------------------------------------------------------------------------------------------------
def openai_forward(variables: dict[str, np.ndarray], hparams: dict, tokens: np.ndarray) -> np.ndarray:
    """OpenAI's gpt-2 ``src/model.py`` forward pass in float64 numpy, on the raw TF variables."""
    v = {k: np.asarray(a, dtype=np.float64) for k, a in variables.items()}
    n_head = hparams["n_head"]

    def norm(x, scope):
        u = x.mean(-1, keepdims=True)
        s = np.square(x - u).mean(-1, keepdims=True)
        return (x - u) / np.sqrt(s + 1e-5) * v[f"{scope}/g"] + v[f"{scope}/b"]

    def conv1d(x, scope):
        return x @ v[f"{scope}/w"][0] + v[f"{scope}/b"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    t = len(tokens)
    h = v["model/wte"][tokens] + v["model/wpe"][np.arange(t)]
    causal = np.tril(np.ones((t, t)))
    for i in range(hparams["n_layer"]):
        scope = f"model/h{i}"
        c = conv1d(norm(h, f"{scope}/ln_1"), f"{scope}/attn/c_attn")
        q, k, val = (x.reshape(t, n_head, -1).transpose(1, 0, 2) for x in np.split(c, 3, axis=-1))
        w = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        w = w * causal - 1e10 * (1 - causal)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = (w @ val).transpose(1, 0, 2).reshape(t, -1)
        h = h + conv1d(a, f"{scope}/attn/c_proj")
        m = gelu(conv1d(norm(h, f"{scope}/ln_2"), f"{scope}/mlp/c_fc"))
        h = h + conv1d(m, f"{scope}/mlp/c_proj")
    h = norm(h, "model/ln_f")
    return h @ v["model/wte"].T


def test_logits_of_hugging_face_model_loaded_from_our_params():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config, params = load_openai_tf_params(TINY)
    hf_config = transformers.GPT2Config(
        **{k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")},
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    state_from_reader = {
        "transformer." + ".".join(p for p in path[:-1]) + (".bias" if path[-1] == "bias" else ".weight"): a
        for path, a in flatten(params)
    }
    expected = expected_state(TINY)
    assert sorted(state_from_reader) == sorted(expected)

    def logits(state, tokens):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(hf_config).eval()
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in state.items()},
                                                    strict=False)  # fmt: skip
        assert not unexpected
        assert all(k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), missing
        model.tie_weights()
        with torch.no_grad():
            return model(torch.from_numpy(tokens)[None]).logits[0].double().numpy()

    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], config["n_positions"]).astype(np.int64)
    ours = logits(state_from_reader, tokens)
    reference = logits(expected, tokens)
    np.testing.assert_array_equal(ours, reference)
    # And both agree with OpenAI's own model.py semantics on the raw TF variables.
    raw = load_tensor_bundle(os.path.join(TINY, "model.ckpt"))
    openai = openai_forward(raw, {**TINY_HPARAMS}, tokens)
    assert np.abs(openai).max() > 1.0  # the fixture's weights are large enough to matter
    np.testing.assert_allclose(ours, openai, rtol=0, atol=2e-4)
