"""Parity of our Flax GPT-2 with Hugging Face's PyTorch GPT-2 on the same random weights, in float32.

Weights are drawn at a scale where activations are O(1), so a wrong layer-norm epsilon, GELU variant, scaling
or mask shows up far above the tolerances (logits: rtol=atol=1e-5 for the small configs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import (
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    init_params,
)
from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict
from gpt2_jax.stacking import params_for, unstack_layers
from hf_reference import hf_model, to_numpy, to_torch

TINY = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
CONFIGS = {
    "tiny": TINY,
    "inner_relu": TINY.replace(n_inner=72, activation_function="relu", n_layer=3),
    "odd_heads_inverse_layer_idx": TINY.replace(
        n_embd=30, n_head=5, n_layer=3, scale_attn_by_inverse_layer_idx=True, activation_function="gelu"
    ),
    "upcast_unscaled_eps": TINY.replace(reorder_and_upcast_attn=True, scale_attn_weights=False, layer_norm_epsilon=1e-3),
}
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def random_params(config: GPT2Config, seed: int = 0, model_cls=GPT2LMHeadModel):
    """Params with every leaf random (layer-norm scales around 1), large enough to make activations O(1); stacked
    when ``config.scan_layers`` (the same values as the per-layer tree)."""
    if config.scan_layers:
        return params_for(config, random_params(config.replace(scan_layers=False), seed, model_cls))
    params = init_params(jax.random.PRNGKey(seed), config, model_cls)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        elif "embedding" in name:
            value = 0.5 * rng.standard_normal(leaf.shape)
        else:
            fan_in = leaf.shape[0] if leaf.ndim == 2 else 4
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in) * (1.0 if leaf.ndim == 2 else 0.2)
        new.append(jnp.asarray(value, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, new)


def assert_close(ours, ref, what, **tol):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    np.testing.assert_allclose(ours, ref, err_msg=what, **(tol or TOL))


def _ids(config, shape, seed=1):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape).astype(np.int32)


@pytest.fixture(scope="module", params=[(name, scan) for scan in (False, True) for name in CONFIGS],
                ids=lambda p: p[0] + ("-scan" if p[1] else ""))
def setup(request):
    """Every config unrolled and with ``scan_layers`` (params stacked; the parity suite is otherwise the same)."""
    name, scan = request.param
    config = CONFIGS[name].replace(scan_layers=scan)
    params = random_params(config)
    return config, params, hf_model(params, config)


def test_logits_hidden_states_attentions_and_loss(setup):
    config, params, ref_model = setup
    ids = _ids(config, (2, 11))
    labels = ids.copy()
    labels[0, :3] = -100
    out = GPT2LMHeadModel(config).apply(
        {"params": params}, ids, labels=labels, output_hidden_states=True, output_attentions=True
    )
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long(), labels=to_torch(labels).long(), output_hidden_states=True,
                        output_attentions=True)
    assert_close(out.logits, to_numpy(ref.logits), "logits")
    assert float(np.abs(np.asarray(out.logits)).max()) > 1.0, "weights too small for a sensitive test"
    assert len(out.hidden_states) == config.n_layer + 1 == len(ref.hidden_states)
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(h, to_numpy(r), f"hidden_states[{i}]")
    assert len(out.attentions) == config.n_layer
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, to_numpy(r), f"attentions[{i}]", rtol=1e-5, atol=1e-6)
    assert_close(out.loss, to_numpy(ref.loss), "loss")


def test_base_model_matches_gpt2model(setup):
    config, params, _ = setup
    ref_model = hf_model(params, config, "GPT2Model")
    ids = _ids(config, (3, 7), seed=5)
    out = GPT2Model(config).apply({"params": params}, ids)
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long())
    assert_close(out.last_hidden_state, to_numpy(ref.last_hidden_state), "last_hidden_state")


def test_gradients_of_the_loss_match(setup):
    config, params, ref_model = setup
    ids = _ids(config, (2, 9), seed=2)
    model = GPT2LMHeadModel(config)
    loss_fn = lambda p: model.apply({"params": p}, ids, labels=ids).loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    ref_model.zero_grad()
    ref = ref_model(to_torch(ids).long(), labels=to_torch(ids).long())
    ref.loss.backward()
    assert_close(loss, to_numpy(ref.loss), "loss")
    ref_grads = {name: p.grad for name, p in ref_model.named_parameters()}
    ours = params_to_state_dict(grads)
    assert set(ours) == set(ref_grads) - {"lm_head.weight"} or set(ours) == set(ref_grads)
    for name, grad in ours.items():
        assert_close(grad, to_numpy(ref_grads[name]), f"grad {name}", **GRAD_TOL)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_with_attention_mask(setup, side):
    config, params, ref_model = setup
    ids = _ids(config, (3, 10), seed=3)
    lengths = [10, 6, 3]
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, -n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # what HF's generate passes
    out = GPT2LMHeadModel(config).apply({"params": params}, ids, attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long(), attention_mask=to_torch(mask).long(),
                        position_ids=to_torch(positions).long(), output_attentions=True)
    valid = mask.astype(bool)
    assert_close(np.asarray(out.logits)[valid], to_numpy(ref.logits)[valid], "logits at real tokens")
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        a, r = np.asarray(a).transpose(0, 2, 1, 3)[valid], to_numpy(r).transpose(0, 2, 1, 3)[valid]
        assert_close(a, r, f"attentions[{i}] of real queries", rtol=1e-5, atol=1e-6)
    # Each padded row equals the same tokens alone, unpadded.
    for row, n in enumerate(lengths):
        alone = ids[row][valid[row]][None]
        single = GPT2LMHeadModel(config).apply({"params": params}, alone).logits
        assert_close(np.asarray(out.logits)[row][valid[row]], np.asarray(single)[0], f"row {row} alone")


def test_position_ids_token_type_ids_and_inputs_embeds(setup):
    config, params, ref_model = setup
    ids = _ids(config, (2, 8), seed=4)
    positions = np.tile(np.arange(5, 13), (2, 1)).astype(np.int32)
    token_types = _ids(config, (2, 8), seed=6)
    model = GPT2LMHeadModel(config)
    out = model.apply({"params": params}, ids, position_ids=positions, token_type_ids=token_types)
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long(), position_ids=to_torch(positions).long(),
                        token_type_ids=to_torch(token_types).long())
    assert_close(out.logits, to_numpy(ref.logits), "logits with position_ids and token_type_ids")

    embeds = np.asarray(params["wte"]["embedding"])[ids] * 0.7
    out = model.apply({"params": params}, inputs_embeds=embeds)
    with torch.no_grad():
        ref = ref_model(inputs_embeds=to_torch(embeds))
    assert_close(out.logits, to_numpy(ref.logits), "logits from inputs_embeds")


def test_head_mask(setup):
    """transformers 5 dropped head_mask, so check its defining property: masking head h of layer l equals
    zeroing the rows of that layer's ``c_proj`` kernel that read head h."""
    config, params, _ = setup
    ids = _ids(config, (2, 7), seed=7)
    model = GPT2LMHeadModel(config)
    plain = model.apply({"params": params}, ids).logits
    ones = model.apply({"params": params}, ids, head_mask=np.ones(config.n_head)).logits
    assert_close(ones, plain, "all-ones head mask")
    layer, head = config.n_layer - 1, 1
    head_mask = np.ones((config.n_layer, config.n_head), np.float32)
    head_mask[layer, head] = 0.0
    masked = model.apply({"params": params}, ids, head_mask=head_mask, output_attentions=True)
    assert np.all(np.asarray(masked.attentions[layer])[:, head] == 0)
    edited = unstack_layers(jax.tree_util.tree_map(lambda x: x, params))
    kernel = np.array(edited["h"][str(layer)]["attn"]["c_proj"]["kernel"])
    kernel[head * config.head_dim:(head + 1) * config.head_dim] = 0
    edited["h"][str(layer)]["attn"]["c_proj"]["kernel"] = jnp.asarray(kernel)
    edited = params_for(config, edited)
    assert_close(masked.logits, model.apply({"params": edited}, ids).logits, "head mask vs zeroed projection")
    assert not np.allclose(np.asarray(masked.logits), np.asarray(plain), atol=1e-4)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu", "silu", "swish", "gelu_fast", "quick_gelu", "tanh"])
def test_each_activation(activation):
    config = TINY.replace(activation_function=activation)
    params = random_params(config, seed=3)
    ids = _ids(config, (2, 6))
    out = GPT2LMHeadModel(config).apply({"params": params}, ids)
    with torch.no_grad():
        ref = hf_model(params, config)(to_torch(ids).long())
    assert_close(out.logits, to_numpy(ref.logits), f"logits with {activation}")


def test_double_heads_model():
    config = TINY.replace(summary_activation="tanh", summary_first_dropout=0.1)
    params = random_params(config, seed=4, model_cls=GPT2DoubleHeadsModel)
    ref_model = hf_model(params, config, "GPT2DoubleHeadsModel")
    ids = _ids(config, (2, 3, 8))
    mc_token_ids = np.array([[7, 5, 3], [2, 7, 6]], np.int32)
    mc_labels = np.array([2, 0], np.int32)
    out = GPT2DoubleHeadsModel(config).apply(
        {"params": params}, ids, mc_token_ids=mc_token_ids, labels=ids, mc_labels=mc_labels, output_hidden_states=True,
        output_attentions=True,
    )
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long(), mc_token_ids=to_torch(mc_token_ids).long(), labels=to_torch(ids).long(),
                        mc_labels=to_torch(mc_labels).long(), output_hidden_states=True, output_attentions=True)
    assert_close(out.logits, to_numpy(ref.logits), "lm logits")
    assert_close(out.mc_logits, to_numpy(ref.mc_logits), "mc logits")
    assert_close(out.loss, to_numpy(ref.loss), "lm loss")
    assert_close(out.mc_loss, to_numpy(ref.mc_loss), "mc loss")
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(h, to_numpy(r).reshape(h.shape), f"hidden_states[{i}]")
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, to_numpy(r), f"attentions[{i}]", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_labels,label_kind", [(3, "int"), (1, "regression"), (3, "multi")])
def test_sequence_classification(num_labels, label_kind):
    pad = 5
    config = TINY.replace(num_labels=num_labels, pad_token_id=pad)
    params = random_params(config, seed=5, model_cls=GPT2ForSequenceClassification)
    ref_model = hf_model(params, config, "GPT2ForSequenceClassification")
    ids = _ids(config, (3, 9))
    ids[ids == pad] = pad + 1
    ids[0, 6:] = pad  # right padding
    ids[1, :2] = pad  # left padding
    mask = (ids != pad).astype(np.int32)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    rng = np.random.default_rng(0)
    labels = {
        "int": np.array([0, 2, 1], np.int32),
        "regression": rng.standard_normal(3).astype(np.float32),
        "multi": (rng.random((3, num_labels)) > 0.5).astype(np.float32),
    }[label_kind]
    out = GPT2ForSequenceClassification(config).apply({"params": params}, ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long(), attention_mask=to_torch(mask).long(),
                        position_ids=to_torch(positions).long(),
                        labels=to_torch(labels).long() if label_kind == "int" else to_torch(labels))
    assert_close(out.logits, to_numpy(ref.logits), "pooled logits")
    assert_close(out.loss, to_numpy(ref.loss), "classification loss")


def test_dropout_is_driven_by_the_key():
    config = TINY.replace(resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    params = random_params(config)
    ids = _ids(config, (2, 8))
    model = GPT2LMHeadModel(config)
    run = lambda seed: model.apply({"params": params}, ids, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(seed)}).logits
    np.testing.assert_array_equal(np.asarray(run(1)), np.asarray(run(1)))
    assert not np.allclose(np.asarray(run(1)), np.asarray(run(2)))
    assert not np.allclose(np.asarray(run(1)), np.asarray(model.apply({"params": params}, ids).logits))


@pytest.mark.slow
def test_full_gpt2_size_parity():
    config = GPT2Config.from_preset("gpt2")
    params = init_params(jax.random.PRNGKey(0), config)
    ref_model = hf_model(params, config)
    ids = _ids(config, (2, 64))
    out = GPT2LMHeadModel(config).apply({"params": params}, ids, labels=ids, output_hidden_states=True)
    with torch.no_grad():
        ref = ref_model(to_torch(ids).long(), labels=to_torch(ids).long(), output_hidden_states=True)
    assert_close(out.logits, to_numpy(ref.logits), "gpt2 logits", rtol=1e-4, atol=1e-4)
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(h, to_numpy(r), f"gpt2 hidden_states[{i}]", rtol=1e-4, atol=1e-4)
    assert_close(out.loss, to_numpy(ref.loss), "gpt2 loss", rtol=1e-5, atol=1e-5)
