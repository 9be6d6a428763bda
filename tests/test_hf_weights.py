"""Hugging Face weights both ways: our params <-> config.json + model.safetensors, and clear mapping errors."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from gpt2_jax.checkpoints.hf_directory import load_hf_directory, load_hf_safetensors, save_hf_directory
from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict, state_dict_to_params
from gpt2_jax.checkpoints.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import GPT2DoubleHeadsModel, GPT2ForSequenceClassification, GPT2LMHeadModel, count_params, init_params
from hf_reference import hf_config, to_numpy, to_torch
from test_model_parity import TINY, random_params

IDS = np.array([[3, 14, 15, 92, 65, 35, 8]], np.int32)


def test_gpt2_preset_has_the_released_parameter_count():
    shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), GPT2Config()))
    assert count_params(shapes) == 124_439_808


def test_init_follows_gpt2_scheme():
    config = TINY.replace(n_layer=8, n_embd=64, initializer_range=0.05)
    params = init_params(jax.random.PRNGKey(0), config)
    block = params["h"]["3"]
    np.testing.assert_allclose(np.std(block["attn"]["c_attn"]["kernel"]), 0.05, rtol=0.1)
    np.testing.assert_allclose(np.std(block["mlp"]["c_proj"]["kernel"]), 0.05 / np.sqrt(16), rtol=0.1)
    np.testing.assert_allclose(np.std(block["attn"]["c_proj"]["kernel"]), 0.05 / np.sqrt(16), rtol=0.15)
    np.testing.assert_allclose(np.std(params["wte"]["embedding"]), 0.05, rtol=0.1)
    assert np.all(block["ln_1"]["scale"] == 1) and np.all(block["attn"]["c_attn"]["bias"] == 0)


def test_ours_to_hf_directory_loads_in_transformers_with_same_logits(tmp_path):
    params = random_params(TINY)
    save_hf_directory(tmp_path / "model", params, TINY)
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        ref_logits = to_numpy(ref(to_torch(IDS).long()).logits)
    ours = GPT2LMHeadModel(TINY).apply({"params": params}, IDS).logits
    np.testing.assert_allclose(np.asarray(ours), ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hf_cls", ["GPT2LMHeadModel", "GPT2Model", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification"])
def test_hf_to_ours_to_hf_is_byte_identical(tmp_path, hf_cls):
    torch.manual_seed(0)
    model = getattr(transformers, hf_cls)(hf_config(TINY)).eval()
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf_directory(tmp_path / "hf")
    save_hf_directory(tmp_path / "ours", params, config)
    theirs, _ = read_safetensors(tmp_path / "hf" / "model.safetensors")
    ours, metadata = read_safetensors(tmp_path / "ours" / "model.safetensors")
    assert metadata == {"format": "pt"}
    theirs = {("transformer." + k if hf_cls == "GPT2Model" else k): v for k, v in theirs.items()}
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, value in theirs.items():
        if name != "lm_head.weight":
            assert ours[name].dtype == value.dtype and ours[name].tobytes() == value.tobytes(), name


def test_head_models_load_with_their_heads(tmp_path):
    for hf_cls, ours_cls, key in [("GPT2DoubleHeadsModel", GPT2DoubleHeadsModel, "multiple_choice_head"),
                                  ("GPT2ForSequenceClassification", GPT2ForSequenceClassification, "score")]:
        torch.manual_seed(1)
        model = getattr(transformers, hf_cls)(hf_config(TINY)).eval()
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        params = state_dict_to_params(state, TINY)
        assert key in params
        kernel = params[key]["summary" if key != "score" else key]["kernel"] if key != "score" else params["score"]["kernel"]
        assert kernel.shape[0] == TINY.n_embd  # nn.Linear [out, in] transposed to [in, out]
        back = params_to_state_dict(params)
        for name, value in back.items():
            np.testing.assert_array_equal(value, state[name])


def test_prefix_optional_and_buffers_ignored():
    params = random_params(TINY)
    state = {k.removeprefix("transformer."): np.asarray(v) for k, v in params_to_state_dict(params).items()}
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), bool))
    state["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    state["lm_head.weight"] = state["wte.weight"]
    loaded = state_dict_to_params(state, TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.tree_util.tree_map(np.asarray, params))


def test_mapping_errors_name_key_and_shapes():
    state = {k: np.asarray(v) for k, v in params_to_state_dict(random_params(TINY)).items()}
    bad = dict(state)
    bad["transformer.h.0.mlp.c_fc.weight"] = np.zeros((32, 99), np.float32)
    with pytest.raises(CheckpointError, match=r"transformer.h.0.mlp.c_fc.weight.*\[32, 99\].*\[32, 128\]"):
        state_dict_to_params(bad, TINY)
    missing = {k: v for k, v in state.items() if k != "transformer.ln_f.bias"}
    with pytest.raises(CheckpointError, match="missing key 'transformer.ln_f.bias'"):
        state_dict_to_params(missing, TINY)
    unknown = dict(state, **{"transformer.h.0.attn.q_proj.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown key 'transformer.h.0.attn.q_proj.weight' with shape \[2, 2\]"):
        state_dict_to_params(unknown, TINY)
    twice = dict(state, **{"h.0.ln_1.weight": state["transformer.h.0.ln_1.weight"]})
    with pytest.raises(CheckpointError, match="key set twice"):
        state_dict_to_params(twice, TINY)
    untied = dict(state, **{"lm_head.weight": state["transformer.wte.weight"] + 1})
    with pytest.raises(CheckpointError, match="tied"):
        state_dict_to_params(untied, TINY)


def test_checkpoint_of_another_shape_than_the_config(tmp_path):
    save_hf_directory(tmp_path / "m", random_params(TINY), TINY)
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors.*wrong shape.*transformer.wte.weight.*\[97, 32\].*\[100, 32\]"):
        load_hf_safetensors(tmp_path / "m" / "model.safetensors", TINY.replace(vocab_size=100))
    with pytest.raises(CheckpointError, match="missing key 'transformer.h.2"):
        load_hf_safetensors(tmp_path / "m" / "model.safetensors", TINY.replace(n_layer=3))


def test_corrupt_and_truncated_safetensors(tmp_path):
    save_hf_directory(tmp_path / "m", random_params(TINY), TINY)
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated: tensor"):
        load_hf_safetensors(path, TINY)
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_hf_safetensors(path, TINY)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf_safetensors(path, TINY)
    path.write_bytes(data[:8] + b"#" + data[9:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf_safetensors(path, TINY)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_hf_safetensors(tmp_path / "nowhere.safetensors", TINY)


def test_safetensors_writer_matches_the_reference_library(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
               "c": np.ones((2, 2), ml_dtypes.bfloat16), "empty": np.zeros((0, 3), np.float16)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = load_file(str(tmp_path / "t.safetensors"))
    for name in ("a", "b", "empty"):
        np.testing.assert_array_equal(back[name], tensors[name])
    ours, _ = read_safetensors(tmp_path / "t.safetensors")
    assert ours["c"].dtype == ml_dtypes.bfloat16 and ours["c"].tobytes() == tensors["c"].tobytes()


def test_interrupted_write_leaves_the_old_directory(tmp_path, monkeypatch):
    params = random_params(TINY)
    save_hf_directory(tmp_path / "m", params, TINY)
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def explode(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_hf_directory(tmp_path / "m", random_params(TINY, seed=9), TINY, progress=explode)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_model_inputs_raise_clear_errors():
    params = random_params(TINY)
    model = GPT2LMHeadModel(TINY)
    apply = lambda *a, **k: model.apply({"params": params}, *a, **k)
    with pytest.raises(ValueError, match=r"id 97, outside the vocabulary \[0, 97\)"):
        apply(np.array([[1, 97]]))
    with pytest.raises(ValueError, match="id -1"):
        apply(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence length 33 exceeds n_positions"):
        apply(np.ones((1, 33), np.int32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[1, 4\], expected"):
        apply(np.ones((1, 5), np.int32), attention_mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        apply()
    with pytest.raises(ValueError, match="empty"):
        apply(np.ones((1, 0), np.int32))
    with pytest.raises(ValueError, match=r"labels contains 200"):
        apply(np.ones((1, 3), np.int32), labels=np.array([[1, 2, 200]]))
    with pytest.raises(ValueError, match="head_mask must have shape"):
        apply(np.ones((1, 3), np.int32), head_mask=np.ones(3))


def test_next_write_removes_work_directories_of_a_killed_write(tmp_path):
    (tmp_path / ".m.tmp-abc123").mkdir()  # what a SIGKILL during save_hf_directory leaves behind
    (tmp_path / ".m.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    save_hf_directory(tmp_path / "m", random_params(TINY), TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
