"""LoRA: our adapters against PEFT on the transformers model (both directions), the merge formula, the dropout
path, gradients only into adapters, scan-stacked adapters, and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpt2_jax import GPT2Config, GPT2LMHeadModel, init_params
from gpt2_jax.checkpoints.adapters import apply_adapter, load_adapter, save_adapter
from gpt2_jax.checkpoints.safetensors_io import CheckpointError
from gpt2_jax.lora import (
    LORA_COLLECTION, LORA_DROPOUT_RNG, LoraConfig, count_lora_params, init_lora, lora_targets, lora_variables,
    merge_lora,
)
from gpt2_jax.stacking import stack_layers
from hf_reference import hf_model, to_numpy

peft = pytest.importorskip("peft", reason="peft is in the test extra")

CONFIG = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
IDS = np.array([[5, 17, 3, 60, 2, 9, 41], [1, 2, 3, 4, 5, 6, 7]])
# Float32 logits of two implementations of the same function: O(10) ulps of |logits| ~ 1 (see tests/roundoff.py).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.PRNGKey(0), CONFIG)


def trained_like(adapters, key=1, std=0.05):
    """Adapters with non-zero B (a fresh adapter is the identity, which would hide a wrong layout)."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def lora_logits(params, adapters, config, lora, **kwargs):
    variables = {"params": params, LORA_COLLECTION: lora_variables(adapters, lora)}
    return GPT2LMHeadModel(config).apply(variables, jnp.asarray(IDS), **kwargs).logits


def test_targets_and_init(params):
    lora = LoraConfig(rank=4, alpha=8)
    names = list(lora_targets(params))
    assert names == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj",
                     "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    assert list(lora_targets(params, r"attn\.c_attn")) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    adapters = init_lora(jax.random.PRNGKey(0), params, lora)
    a, b = adapters["h"]["0"]["attn"]["c_attn"]["lora_A"], adapters["h"]["0"]["attn"]["c_attn"]["lora_B"]
    assert a.shape == (32, 4) and b.shape == (4, 96) and not np.any(b)
    assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).std() > 0.1 / np.sqrt(32)
    assert count_lora_params(adapters) == 2 * (4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32))
    # an untrained adapter changes nothing
    plain = GPT2LMHeadModel(CONFIG).apply({"params": params}, jnp.asarray(IDS)).logits
    np.testing.assert_array_equal(lora_logits(params, adapters, CONFIG, lora), plain)


def test_merge_equals_the_low_rank_path_and_the_formula(params):
    lora = LoraConfig(rank=4, alpha=12)
    adapters = trained_like(init_lora(jax.random.PRNGKey(0), params, lora))
    merged = merge_lora(params, adapters, lora)
    kernel = params["h"]["1"]["mlp"]["c_fc"]["kernel"]
    ad = adapters["h"]["1"]["mlp"]["c_fc"]
    np.testing.assert_allclose(merged["h"]["1"]["mlp"]["c_fc"]["kernel"],
                               kernel + ad["lora_A"] @ ad["lora_B"] * 3.0, rtol=1e-6, atol=1e-7)
    assert merged["wte"]["embedding"] is params["wte"]["embedding"] and params["h"]["1"]["mlp"]["c_fc"]["kernel"] is kernel  # not mutated
    plain_merged = GPT2LMHeadModel(CONFIG).apply({"params": merged}, jnp.asarray(IDS)).logits
    np.testing.assert_allclose(lora_logits(params, adapters, CONFIG, lora), plain_merged, **TOL)


def test_our_adapter_loads_in_peft_with_our_logits(params, tmp_path):
    lora = LoraConfig(rank=4, alpha=8, targets=r"c_attn|mlp\.c_proj")
    adapters = trained_like(init_lora(jax.random.PRNGKey(3), params, lora))
    save_adapter(tmp_path / "adapter", adapters, lora, base_model="tiny-base")
    document = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert document["target_modules"] == ["c_attn", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"] \
        or document["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                                          "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    assert document["fan_in_fan_out"] is True and document["base_model_name_or_path"] == "tiny-base"
    reference = peft.PeftModel.from_pretrained(hf_model(params, CONFIG), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = to_numpy(reference(torch.from_numpy(IDS)).logits)
    np.testing.assert_allclose(lora_logits(params, adapters, CONFIG, lora), theirs, **TOL)


def test_a_peft_adapter_loads_in_ours_with_their_logits(params, tmp_path):
    model = hf_model(params, CONFIG)
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                  fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, peft_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    wrapped.eval()
    with torch.no_grad():
        theirs = to_numpy(wrapped(torch.from_numpy(IDS)).logits)
    wrapped.save_pretrained(str(tmp_path / "peft"))
    adapters, lora, document = load_adapter(tmp_path / "peft", params)
    assert (lora.rank, lora.scale) == (4, 4.0) and len(list(lora_targets(params, lora.targets))) == 8
    np.testing.assert_allclose(lora_logits(params, adapters, CONFIG, lora), theirs, **TOL)
    merged, _, _ = apply_adapter(params, tmp_path / "peft")
    np.testing.assert_allclose(GPT2LMHeadModel(CONFIG).apply({"params": merged}, jnp.asarray(IDS)).logits, theirs,
                               **TOL)


def test_gradients_reach_only_the_adapters_and_dropout_is_the_adapters_input(params):
    lora = LoraConfig(rank=2, alpha=4, dropout=0.5)
    adapters = trained_like(init_lora(jax.random.PRNGKey(0), params, lora))
    model = GPT2LMHeadModel(CONFIG)

    def loss(adapters, key):
        variables = {"params": params, LORA_COLLECTION: lora_variables(adapters, lora)}
        out = model.apply(variables, jnp.asarray(IDS), labels=jnp.asarray(IDS), rngs={LORA_DROPOUT_RNG: key})
        return out.loss

    grads = jax.grad(loss)(adapters, jax.random.PRNGKey(5))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
    assert all(np.all(np.isfinite(g)) and np.any(g) for g in jax.tree_util.tree_leaves(grads))
    # dropout draws per key; without the rng stream the adapter path is deterministic
    assert loss(adapters, jax.random.PRNGKey(5)) == loss(adapters, jax.random.PRNGKey(5))
    assert loss(adapters, jax.random.PRNGKey(5)) != loss(adapters, jax.random.PRNGKey(6))
    deterministic = model.apply({"params": params, LORA_COLLECTION: lora_variables(adapters, lora)},
                                jnp.asarray(IDS)).logits
    np.testing.assert_allclose(deterministic, lora_logits(params, adapters, CONFIG, lora), rtol=0, atol=0)


def test_scanned_layers_take_stacked_adapters(params):
    lora = LoraConfig(rank=3, alpha=6)
    adapters = trained_like(init_lora(jax.random.PRNGKey(0), params, lora))
    scan_config = CONFIG.replace(scan_layers=True)
    stacked = stack_layers(params)
    stacked_adapters = stack_layers(adapters)
    assert stacked_adapters["h"]["attn"]["c_attn"]["lora_A"].shape == (2, 32, 3)
    np.testing.assert_allclose(lora_logits(stacked, stacked_adapters, scan_config, lora),
                               lora_logits(params, adapters, CONFIG, lora), **TOL)
    fresh = init_lora(jax.random.PRNGKey(0), stacked, lora)  # stacked params give stacked adapters
    assert fresh["h"]["mlp"]["c_fc"]["lora_A"].shape == (2, 32, 3)
    merged = merge_lora(stacked, stacked_adapters, lora)
    np.testing.assert_allclose(merged["h"]["attn"]["c_attn"]["kernel"][1],
                               merge_lora(params, adapters, lora)["h"]["1"]["attn"]["c_attn"]["kernel"],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(alpha=float("nan")), "alpha must be a positive finite number"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(targets="("), "is not a regular expression"),
])
def test_bad_lora_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_bad_targets_and_mismatched_adapters(params, tmp_path):
    with pytest.raises(ValueError, match="match no dense layer; the layers are named like h.0.attn.c_attn"):
        lora_targets(params, "q_proj")
    lora = LoraConfig(rank=2)
    save_adapter(tmp_path / "a", init_lora(jax.random.PRNGKey(0), params, lora), lora, base_model="tiny")
    wider = init_params(jax.random.PRNGKey(0), CONFIG.replace(n_embd=48, n_head=4))
    with pytest.raises(CheckpointError, match="does not fit the base model's layer .* another model size"):
        load_adapter(tmp_path / "a", wider)
    deeper_adapter = init_lora(jax.random.PRNGKey(0), init_params(jax.random.PRNGKey(0), CONFIG.replace(n_layer=3)),
                               lora)
    save_adapter(tmp_path / "b", deeper_adapter, lora, base_model="tiny")
    with pytest.raises(CheckpointError, match="adapter for 'h.2.attn.c_attn', a layer the base model does not have"):
        load_adapter(tmp_path / "b", params)
    with pytest.raises(CheckpointError, match="is not a PEFT adapter directory"):
        load_adapter(tmp_path, params)
    document = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**document, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA adapters"):
        load_adapter(tmp_path / "a", params)


def test_a_lora_train_step_updates_only_the_adapters(params):
    """The step's gradient is jax.grad of the LoRA loss with respect to the adapters (read back through a recording
    optimizer: a comparison of gradients, tests/roundoff.py), training lowers the loss, the base is untouched."""
    import optax

    from gpt2_jax.training.step import TrainState, make_loss_fn, make_train_step
    from roundoff import assert_grads_close
    from test_training_optim import recording_optimizer

    lora = LoraConfig(rank=4, alpha=8)
    adapters = trained_like(init_lora(jax.random.PRNGKey(0), params, lora))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 9)))
    loss_fn = make_loss_fn(CONFIG, dropout=False, lora=lora)
    expected = jax.grad(lambda ad: loss_fn({"params": params, "lora": ad}, tokens, None))(adapters)
    recorder = recording_optimizer()
    record = make_train_step(CONFIG, recorder, lora=lora, dropout=False, donate=False)
    state, _ = record(TrainState.create_lora(params, adapters, recorder), tokens, jax.random.PRNGKey(0))
    assert_grads_close(state.opt_state, expected, "LoRA adapter gradient")

    optimizer = optax.adamw(1e-2)
    state = TrainState.create_lora(params, adapters, optimizer)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(optimizer.init(adapters))
    step = make_train_step(CONFIG, optimizer, lora=lora, dropout=False, donate=False)
    losses = []
    for _ in range(5):
        state, metrics = step(state, tokens, jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params["params"])):
        np.testing.assert_array_equal(before, after)  # the base is bit-identical


def test_from_pretrained_merges_an_adapter(params, tmp_path):
    from gpt2_jax import from_pretrained, save_hf_directory

    save_hf_directory(tmp_path / "base", params, CONFIG)
    lora = LoraConfig(rank=2, alpha=4)
    adapters = trained_like(init_lora(jax.random.PRNGKey(2), params, lora))
    save_adapter(tmp_path / "adapter", adapters, lora, base_model="some/other-base")
    loaded = from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    np.testing.assert_allclose(loaded.params["h"]["0"]["attn"]["c_attn"]["kernel"],
                               merge_lora(params, adapters, lora)["h"]["0"]["attn"]["c_attn"]["kernel"],
                               rtol=1e-6, atol=1e-7)
    assert any("LoRA adapter" in n and "rank 2" in n and "8 layers" in n and "some/other-base" in n
               for n in loaded.notes)
    with pytest.raises(CheckpointError, match="is not a directory"):
        from_pretrained(tmp_path / "base", adapter=tmp_path / "missing")


def _cli(*argv):
    import contextlib
    import io

    from gpt2_jax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_commands_take_an_adapter(tmp_path, monkeypatch):
    """--adapter DIR on generate, eval and the inspection commands merges the adapter: eval of base + adapter equals
    eval of the merged weights saved as a plain checkpoint, and differs from the base alone."""
    from gpt2_jax import save_hf_directory
    from inspect_helpers import TINY, peaked_params

    monkeypatch.setenv("GPT2_JAX_COMPILATION_CACHE", "off")  # the in-process CLI must not reconfigure JAX

    base = peaked_params(TINY)
    save_hf_directory(tmp_path / "base", base, TINY)
    lora = LoraConfig(rank=2, alpha=4)
    adapters = trained_like(init_lora(jax.random.PRNGKey(2), base, lora), std=0.5)
    save_adapter(tmp_path / "adapter", adapters, lora, base_model=str(tmp_path / "base"))
    save_hf_directory(tmp_path / "merged", merge_lora(base, adapters, lora), TINY)
    (tmp_path / "text.txt").write_text("The theory of relativity is a theory of gravitation. " * 8)
    data = ["--data", str(tmp_path / "text.txt"), "--seq-len", "16", "--no-progress"]

    losses = {}
    for name, model, extra in [("base", "base", []), ("adapter", "base", ["--adapter", str(tmp_path / "adapter")]),
                               ("merged", "merged", [])]:
        code, out, err = _cli("eval", "--model", str(tmp_path / model), *extra, *data)
        assert code == 0, err
        losses[name] = json.loads(out.strip().splitlines()[-1])["loss"]
        assert ("LoRA adapter" in err) == (name == "adapter")
    assert losses["adapter"] == pytest.approx(losses["merged"], rel=1e-6) and losses["adapter"] != losses["base"]

    code, out, err = _cli("generate", "Hello", "--model", str(tmp_path / "base"), "--adapter",
                          str(tmp_path / "adapter"), "--greedy", "--max-new-tokens", "3")
    assert code == 0 and "LoRA adapter" in err, err
    outputs = {}
    for name, extra in [("base", []), ("adapter", ["--adapter", str(tmp_path / "adapter")])]:
        code, outputs[name], err = _cli("next", "Hello there", "--model", str(tmp_path / "base"), *extra)
        assert code == 0, err
    assert outputs["base"] != outputs["adapter"]
    code, _, err = _cli("next", "Hello", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "nothing"))
    assert code == 2 and "is not a directory" in err and "Traceback" not in err, err


def test_gpt2_jax_train_with_lora(tmp_path, capsys, monkeypatch):
    """`gpt2-jax train --lora-rank` trains adapters on a frozen base: final/ is a PEFT adapter that peft loads onto
    the transformers base with our logits, final-merged/ equals base + B A alpha / r, the loss falls, the base in
    the state is bit-identical; a regex matching nothing and --merge-lora without a rank are refused."""
    from gpt2_jax import cli, from_pretrained, save_hf_directory
    from gpt2_jax.training import read_metrics

    monkeypatch.setenv("GPT2_JAX_COMPILATION_CACHE", "off")  # the in-process CLI must not reconfigure JAX

    base = init_params(jax.random.PRNGKey(0), CONFIG)
    save_hf_directory(tmp_path / "base", base, CONFIG)
    tokens = np.tile(np.arange(40, dtype=np.uint16) % CONFIG.vocab_size, 20)
    tokens.tofile(tmp_path / "data.bin")
    args = ["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.bin"), "--out",
            str(tmp_path / "run"), "--seq-len", "16", "--batch-size", "4", "--steps", "12", "--lr", "1e-2",
            "--warmup-steps", "1", "--no-progress", "--no-plot", "--lora-rank", "4", "--lora-alpha", "8",
            "--merge-lora"]
    assert cli.main(args) == 0, capsys.readouterr().err
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.1, losses

    adapters, lora, document = load_adapter(tmp_path / "run" / "final", base)
    assert (lora.rank, lora.scale) == (4, 2.0) and document["base_model_name_or_path"] == str(tmp_path / "base")
    assert np.any(adapters["h"]["1"]["mlp"]["c_fc"]["lora_B"])  # trained
    merged = from_pretrained(tmp_path / "run" / "final-merged")
    expected = merge_lora(base, adapters, lora)
    for a, b in zip(jax.tree_util.tree_leaves(merged.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    reference = peft.PeftModel.from_pretrained(hf_model(base, CONFIG), str(tmp_path / "run" / "final")).eval()
    with torch.no_grad():
        theirs = to_numpy(reference(torch.from_numpy(IDS)).logits)
    np.testing.assert_allclose(lora_logits(base, adapters, CONFIG, lora), theirs, **TOL)

    bad = args[:args.index("--out") + 1] + [str(tmp_path / "bad"), "--lora-rank", "2", "--lora-targets", "q_proj",
                                            "--steps", "1", "--no-progress"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert "match no dense layer" in err and "Traceback" not in err
    bad = args[:args.index("--out") + 1] + [str(tmp_path / "bad2"), "--merge-lora", "--steps", "1"]
    assert cli.main(bad) == 2 and "--merge-lora needs --lora-rank" in capsys.readouterr().err
