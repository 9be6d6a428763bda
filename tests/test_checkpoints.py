"""from_pretrained on local directories: every Hugging Face format, OpenAI TF, dtype on load, and helpful errors."""

from __future__ import annotations

import pickle
import shutil
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from checkpoint_helpers import TINY, assert_same_params, byte_tokenizer, flat, random_params
from conftest import REPO
from gpt2_jax.checkpoints.flax_msgpack import (
    flax_to_state_dict,
    params_to_flax,
    read_flax_msgpack,
    write_flax_msgpack,
)
from gpt2_jax.checkpoints.formats import find_weights, release_pages, resolve_dtype
from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict, state_dict_to_params
from gpt2_jax.checkpoints.pretrained import TokenizerFallbackWarning, from_pretrained
from gpt2_jax.checkpoints.safetensors_io import CheckpointError, read_safetensors
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import GPT2LMHeadModel

FIXTURES = REPO / "tests" / "fixtures"
HF_TINY = FIXTURES / "hf_tiny"
TF_TINY = FIXTURES / "openai_tf_tiny"

pytestmark = pytest.mark.filterwarnings("ignore::gpt2_jax.checkpoints.pretrained.TokenizerFallbackWarning")


def _logits(loaded, ids) -> np.ndarray:
    return np.asarray(GPT2LMHeadModel(loaded.config).apply({"params": loaded.params}, ids).logits)


def _hf_flax_tree(state_dict: dict[str, np.ndarray]) -> dict:
    """The tree transformers 4.x's FlaxGPT2LMHeadModel saves, built from a PyTorch state dict independently of
    our writer: ``transformer/<module path>/{kernel,bias,scale,embedding}``, Conv1D kernels as [out, in]."""
    tree: dict = {}
    for name, value in state_dict.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        *module, leaf = name.split(".")
        value = np.asarray(value)
        if leaf == "weight":
            kind = module[-1]
            if kind in ("wte", "wpe"):
                leaf = "embedding"
            elif kind.startswith("ln_"):
                leaf = "scale"
            else:
                leaf, value = "kernel", np.ascontiguousarray(value.T)
        node = tree
        for key in module:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------------------------------------------
# Every format, produced by transformers itself
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model_dirs(tmp_path_factory):
    """One random transformers-5 GPT2LMHeadModel, saved in each Hugging Face format."""
    tmp = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # biases and norms non-trivial too
    model.save_pretrained(tmp / "safetensors")
    model.save_pretrained(tmp / "sharded", max_shard_size="20KB")
    # transformers 5 writes only safetensors; pytorch_model.bin is what 4.x's save_pretrained(safe_serialization=
    # False) wrote: torch.save of the state dict (tests/fixtures/hf_tiny has real 4.46 files too).
    (tmp / "pytorch").mkdir()
    shutil.copy(tmp / "safetensors" / "config.json", tmp / "pytorch")
    torch.save(model.state_dict(), tmp / "pytorch" / "pytorch_model.bin")
    # flax_model.msgpack: what FlaxGPT2LMHeadModel.save_pretrained wrote (flax.serialization.to_bytes of the params)
    from flax.serialization import msgpack_serialize

    (tmp / "flax").mkdir()
    shutil.copy(tmp / "safetensors" / "config.json", tmp / "flax")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    (tmp / "flax" / "flax_model.msgpack").write_bytes(msgpack_serialize(_hf_flax_tree(state)))
    return tmp, model, state


def test_every_transformers_format_loads_identical_params(hf_model_dirs):
    tmp, model, state = hf_model_dirs
    assert len(list((tmp / "sharded").glob("model-*.safetensors"))) > 2
    assert (tmp / "sharded" / "model.safetensors.index.json").is_file()
    expected = state_dict_to_params(state, GPT2Config.from_json_file(tmp / "safetensors" / "config.json"))
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits.numpy()
    formats = {"safetensors": "safetensors", "sharded": "safetensors-sharded", "pytorch": "pytorch", "flax": "flax"}
    for sub, fmt in formats.items():
        loaded = from_pretrained(tmp / sub)
        assert loaded.format == fmt
        assert loaded.config.n_embd == 32 and loaded.config.vocab_size == 128
        assert_same_params(loaded.params, expected)
        np.testing.assert_allclose(_logits(loaded, ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sub", ["safetensors", "safetensors_sharded", "pytorch", "pytorch_sharded", "flax"])
def test_files_written_by_transformers_4(sub):
    """tests/fixtures/hf_tiny: real transformers 4.46.3 files, incl. FlaxGPT2LMHeadModel's flax_model.msgpack."""
    expected = np.load(HF_TINY / "expected.npz")
    reference = from_pretrained(HF_TINY / "safetensors")
    loaded = from_pretrained(HF_TINY / sub)
    assert_same_params(loaded.params, reference.params)
    logits = _logits(loaded, expected["input_ids"])
    np.testing.assert_allclose(logits, expected["logits_pt"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, expected["logits_flax"], rtol=1e-5, atol=1e-5)


def test_hf_flax_layout_has_out_in_kernels():
    """The fixture written by transformers 4.46 confirms the layout documented in flax_msgpack.py."""
    raw = read_flax_msgpack(HF_TINY / "flax" / "flax_model.msgpack")
    config = GPT2Config.from_json_file(HF_TINY / "flax" / "config.json")
    d, inner = config.n_embd, config.inner_dim
    assert raw["transformer/h/0/attn/c_attn/kernel"].shape == (3 * d, d)
    assert raw["transformer/h/1/mlp/c_fc/kernel"].shape == (inner, d)
    assert raw["transformer/h/1/mlp/c_proj/kernel"].shape == (d, inner)
    assert raw["transformer/wte/embedding"].shape == (config.vocab_size, d)
    assert {k.split("/")[-1] for k in raw} == {"kernel", "bias", "scale", "embedding"}


def test_our_flax_writer_matches_flax_serialization(tmp_path):
    from flax.serialization import msgpack_restore, msgpack_serialize

    params = random_params()
    path = write_flax_msgpack(tmp_path / "flax_model.msgpack", params)
    assert path.read_bytes() == msgpack_serialize(params_to_flax(params))
    restored = msgpack_restore(path.read_bytes())
    assert restored["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (3 * TINY.n_embd, TINY.n_embd)
    back = state_dict_to_params(flax_to_state_dict(read_flax_msgpack(path)), TINY)
    assert_same_params(back, params)


def test_flax_with_lm_head_and_without_transformer_prefix(tmp_path):
    params = random_params()
    tree = params_to_flax(params)
    from flax.serialization import msgpack_serialize

    (tmp_path / "config.json").write_text(TINY.to_json_string())
    # FlaxGPT2Model (no head) saves the body without the "transformer" level
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree["transformer"]))
    assert_same_params(from_pretrained(tmp_path).params, params)
    # an untied lm_head kernel [D, V] equal to wte is accepted; a different one is refused
    tree["lm_head"] = {"kernel": np.ascontiguousarray(params["wte"]["embedding"].T)}
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    assert_same_params(from_pretrained(tmp_path).params, params)
    tree["lm_head"]["kernel"] = tree["lm_head"]["kernel"] + 1
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match="tied to wte"):
        from_pretrained(tmp_path)


def test_double_heads_checkpoint_keeps_its_head(tmp_path):
    from gpt2_jax.model import GPT2DoubleHeadsModel

    params = random_params(TINY, 5, GPT2DoubleHeadsModel)
    save_hf_directory(tmp_path / "dh", params, TINY)
    loaded = from_pretrained(tmp_path / "dh")
    assert "multiple_choice_head" in loaded.params
    assert_same_params(loaded.params, params)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI's TensorFlow release
# ---------------------------------------------------------------------------------------------------------------
def test_openai_tf_checkpoint_logits_equal_hugging_face_on_the_same_weights():
    with pytest.warns(TokenizerFallbackWarning, match="bundled GPT-2 tokenizer"):
        loaded = from_pretrained(TF_TINY)
    assert loaded.format == "openai-tf"
    assert loaded.notes and "encoder.json" in loaded.notes[0]
    hparams = {"vocab_size": 96, "n_positions": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}
    assert {k: getattr(loaded.config, k) for k in hparams} == hparams
    with np.load(TF_TINY / "expected.npz") as data:
        expected_state = {k: torch.from_numpy(data[k]) for k in data.files}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hparams, bos_token_id=0, eos_token_id=0)).eval()
    missing, unexpected = hf.load_state_dict(expected_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    ids = np.random.default_rng(0).integers(0, 96, (2, 32))
    with torch.no_grad():
        reference = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(_logits(loaded, ids), reference, rtol=1e-5, atol=2e-5)


def test_openai_tf_tokenizer_files_and_dtype(tmp_path):
    directory = tmp_path / "tf"
    shutil.copytree(TF_TINY, directory, ignore=shutil.ignore_patterns("variants"))
    tok = tmp_path / "tok"
    byte_tokenizer().save_pretrained(tok)
    shutil.copy(tok / "vocab.json", directory / "encoder.json")  # OpenAI's encoder.json / vocab.bpe have the
    shutil.copy(tok / "merges.txt", directory / "vocab.bpe")  # same formats as vocab.json / merges.txt
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizerFallbackWarning)
        loaded = from_pretrained(directory, dtype=jnp.bfloat16)
    assert loaded.tokenizer.vocab_size == 257 and not loaded.notes
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    with np.load(TF_TINY / "expected.npz") as data:
        wte = data["transformer.wte.weight"]
    np.testing.assert_array_equal(np.asarray(loaded.params["wte"]["embedding"]), wte.astype(ml_dtypes.bfloat16))


def test_openai_tf_truncated_data_file(tmp_path):
    directory = tmp_path / "tf"
    shutil.copytree(TF_TINY, directory, ignore=shutil.ignore_patterns("variants"))
    data = directory / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------
# Dtype on load
# ---------------------------------------------------------------------------------------------------------------
def test_dtype_on_load(tmp_path):
    params = random_params()
    save_hf_directory(tmp_path / "f32", params, TINY)
    save_hf_directory(tmp_path / "f16", params, TINY, dtype=np.float16)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, "bfloat16", "fp16", np.float32):
        loaded = from_pretrained(tmp_path / "f32", dtype=dtype)
        want = resolve_dtype(dtype)
        assert {np.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(loaded.params)} == {want}
        for name, value in flat(params).items():
            np.testing.assert_array_equal(flat(loaded.params)[name], value.astype(want))
    kept = from_pretrained(tmp_path / "f16", dtype=None)  # None keeps the file's dtype
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(kept.params)} == {jnp.dtype(jnp.float16)}
    up = from_pretrained(tmp_path / "f16")  # default float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(up.params)} == {jnp.dtype(jnp.float32)}
    for bad in ("int8", np.float64, "float8", jnp.int32):
        with pytest.raises(ValueError, match="dtype|cannot load"):
            from_pretrained(tmp_path / "f32", dtype=bad)


def test_loaded_params_do_not_alias_the_file_and_pages_are_released(tmp_path):
    params = random_params()
    save_hf_directory(tmp_path / "m", params, TINY)
    loaded = from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 100)  # the file changes under us: params do not
    assert_same_params(loaded.params, params)
    save_hf_directory(tmp_path / "n", params, TINY)
    tensors, _ = read_safetensors(tmp_path / "n" / "model.safetensors")
    wte = tensors["transformer.wte.weight"]
    before = np.array(wte)
    assert release_pages(wte)
    np.testing.assert_array_equal(wte, before)  # pages come back from the file on the next access
    assert not release_pages(np.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# Errors that help
# ---------------------------------------------------------------------------------------------------------------
def test_directory_without_weights_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(TINY.to_json_string())
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "flax_model.msgpack",
                 "hparams.json"):
        assert name in str(info.value)
    (tmp_path / "tf_model.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="tf_model.h5.*not read"):
        from_pretrained(tmp_path)
    assert find_weights(HF_TINY / "pytorch").format == "pytorch"


def test_missing_or_foreign_config(tmp_path):
    save_hf_directory(tmp_path / "m", random_params(), TINY)
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has weights but no config.json"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}')
    with pytest.raises(CheckpointError, match="'llama' model, not GPT-2"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("sub", ["safetensors", "pytorch", "flax"])
def test_shapes_that_disagree_with_the_config(tmp_path, sub):
    directory = tmp_path / sub
    shutil.copytree(HF_TINY / sub, directory)
    config = GPT2Config.from_json_file(directory / "config.json")
    (directory / "config.json").write_text(config.replace(n_embd=12).to_json_string())
    with pytest.raises(CheckpointError) as info:
        from_pretrained(directory)
    message = str(info.value)
    assert "wrong shape for 'transformer.h.0.attn.c_attn.weight'" in message
    assert "checkpoint has [8, 24], the config expects [12, 36]" in message
    assert directory.name in message


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("sub", "file", "message"),
    [
        ("safetensors", "model.safetensors", "truncated"),
        ("pytorch", "pytorch_model.bin", "truncated or corrupt PyTorch checkpoint"),
        ("flax", "flax_model.msgpack", "truncated Flax msgpack checkpoint"),
        ("safetensors_sharded", "model-00002-of-00004.safetensors", "truncated"),
        ("safetensors_sharded", "model.safetensors.index.json", "not valid JSON"),
        ("pytorch_sharded", "pytorch_model-00003-of-00004.bin", "truncated or corrupt PyTorch checkpoint"),
    ],
)
def test_truncated_files(tmp_path, sub, file, message):
    directory = tmp_path / sub
    shutil.copytree(HF_TINY / sub, directory)
    _truncate(directory / file)
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(directory)
    assert file in str(info.value)


def test_corrupt_files(tmp_path):
    directory = tmp_path / "pytorch"
    shutil.copytree(HF_TINY / "pytorch", directory)
    (directory / "pytorch_model.bin").write_bytes(b"definitely not a torch file" * 20)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: corrupt, .*\(Unsupported operand"):
        from_pretrained(directory)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"transformer.wte.weight": Evil()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refused it \(Unsupported global: GLOBAL print"):
        from_pretrained(directory)
    with open(directory / "pytorch_model.bin", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(CheckpointError):
        from_pretrained(directory)

    flax_dir = tmp_path / "flax"
    shutil.copytree(HF_TINY / "flax", flax_dir)
    (flax_dir / "flax_model.msgpack").write_bytes(b"\xc1" * 64)  # 0xc1 is never used in msgpack
    with pytest.raises(CheckpointError, match="corrupt Flax msgpack"):
        from_pretrained(flax_dir)
    import msgpack

    (flax_dir / "flax_model.msgpack").write_bytes(msgpack.packb({"transformer": {"wte": {"embedding": 3}}}))
    with pytest.raises(CheckpointError, match="'transformer/wte/embedding' is a int, not an array"):
        from_pretrained(flax_dir)


def test_sharded_index_problems(tmp_path):
    directory = tmp_path / "s"
    shutil.copytree(HF_TINY / "safetensors_sharded", directory)
    (directory / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="1 are missing.*model-00003-of-00004.safetensors"):
        from_pretrained(directory)
    shutil.copy(HF_TINY / "safetensors_sharded" / "model-00004-of-00004.safetensors",
                directory / "model-00003-of-00004.safetensors")
    with pytest.raises(CheckpointError, match="lacks .* tensor"):
        from_pretrained(directory)
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        from_pretrained(directory)


def test_pytorch_without_torch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match="needs PyTorch, which is not installed: `pip install torch`"):
        from_pretrained(HF_TINY / "pytorch")


def test_missing_tensor_is_named(tmp_path):
    params = random_params()
    state = params_to_state_dict(params)
    del state["transformer.h.1.mlp.c_fc.bias"]
    from gpt2_jax.checkpoints.safetensors_io import write_safetensors

    (tmp_path / "config.json").write_text(TINY.to_json_string())
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError, match=r"missing key 'transformer.h.1.mlp.c_fc.bias' \(expected shape \[64\]\)"):
        from_pretrained(tmp_path)
