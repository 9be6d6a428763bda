"""GPT2Config: presets, validation, hashability, and the round trip with Hugging Face's config.json."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
import transformers

from gpt2_jax.config import GPT2Config


def test_defaults_are_the_released_gpt2():
    config = GPT2Config()
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (50257, 1024, 768, 12, 12)
    assert config.inner_dim == 3072 and config.head_dim == 64 and config.n_ctx == 1024
    assert GPT2Config.from_preset("gpt2") == config


@pytest.mark.parametrize("name,width,layers,heads", [
    ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("openai-community/gpt2-xl", 1600, 48, 25),
])
def test_presets(name, width, layers, heads):
    config = GPT2Config.from_preset(name)
    assert (config.n_embd, config.n_layer, config.n_head) == (width, layers, heads)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'"):
        GPT2Config.from_preset("gpt3")


def test_frozen_hashable_and_a_static_jit_argument():
    config = GPT2Config(n_layer=2)
    with pytest.raises(AttributeError):
        config.n_layer = 3
    assert hash(config) == hash(GPT2Config(n_layer=2)) and {config: 1}[GPT2Config(n_layer=2)] == 1
    f = jax.jit(lambda x, c: x * c.n_layer, static_argnums=1)
    assert int(f(jnp.int32(3), config)) == 6


@pytest.mark.parametrize("changes,field", [
    (dict(n_embd=100, n_head=12), "n_embd"),
    (dict(activation_function="gelu_newest"), "activation_function"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(n_head=0), "n_head"),
    (dict(n_positions=0), "n_positions"),
    (dict(n_inner=0), "n_inner"),
    (dict(attn_pdrop=1.5), "attn_pdrop"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
    (dict(summary_type="attn"), "summary_type"),
])
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GPT2Config(**changes)


def test_hf_config_json_round_trip(tmp_path):
    hf = transformers.GPT2Config(n_layer=3, n_embd=48, n_head=3, n_inner=100, activation_function="relu",
                                 scale_attn_by_inverse_layer_idx=True, summary_activation="tanh")
    hf.save_pretrained(tmp_path)
    config = GPT2Config.from_json_file(tmp_path / "config.json")
    assert (config.n_layer, config.n_embd, config.n_head, config.n_inner) == (3, 48, 3, 100)
    assert config.activation_function == "relu" and config.scale_attn_by_inverse_layer_idx
    assert config.summary_activation == "tanh"
    # ours -> json -> transformers -> json -> ours is the identity
    (tmp_path / "config.json").write_text(config.to_json_string())
    again = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (again.n_layer, again.n_embd, again.n_inner, again.num_labels) == (3, 48, 100, config.num_labels)
    again.save_pretrained(tmp_path / "again")
    assert GPT2Config.from_json_file(tmp_path / "again" / "config.json") == config
    assert GPT2Config.from_hf_dict(config.to_hf_dict()) == config


def test_n_ctx_alias_and_hf_attribute_names():
    assert GPT2Config.from_hf_dict({"n_ctx": 256}).n_positions == 256
    assert GPT2Config.from_hf_dict({"n_positions": 128, "n_ctx": 256}).n_positions == 128
    config = GPT2Config.from_hf_dict({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2})
    assert (config.n_embd, config.n_head, config.n_layer) == (64, 4, 2)
    assert GPT2Config().replace(n_ctx=64).n_positions == 64
    assert GPT2Config.from_hf_dict({"eos_token_id": [7, 8]}).eos_token_id == 7


def test_config_file_errors(tmp_path):
    with pytest.raises(OSError, match="cannot read config file"):
        GPT2Config.from_json_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT2Config.from_json_file(bad)
    bad.write_text(json.dumps({"n_embd": 10, "n_head": 3}))
    with pytest.raises(ValueError, match="bad.json.*n_embd"):
        GPT2Config.from_json_file(bad)


def test_config_of_another_model_type_is_refused():
    with pytest.raises(ValueError, match="'llama' model, not GPT-2"):
        GPT2Config.from_hf_dict({"model_type": "llama", "n_embd": 64})
