"""Low precision: bfloat16 computes in float32 where the backend says so (CPU), int8 weight-only quantization.

Tolerances are derived, not tuned: a weight ``w`` moved by at most ``e_w`` (bfloat16 rounding: ``|w| * 2**-9``;
int8: ``scale / 2``) moves a logit ``l`` by at most ``sum_w |dl/dw| e_w`` to first order. The tests compute that
bound from the model's Jacobian on random (seeded) prompts and assert the errors stay within twice it (the factor
covers second-order terms). Greedy tokens must agree wherever float32's top-1 margin over every other token is
beyond reach: beyond twice the worst-case bounds, or (a much tighter criterion) beyond 6 standard deviations of the
margin's change when each rounding error is uniform on ``[-e_w, e_w]`` and independent (variance ``e_w**2 / 3``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import backend
from gpt2_jax.backend import Tuning
from gpt2_jax.config import GPT2Config
from gpt2_jax.generation import generate
from gpt2_jax.generation.engine import init_cache, prefill
from gpt2_jax.generation.request import build_request
from gpt2_jax.generation.weight_layout import DecodeWeights, clear_cache, decode_weights
from gpt2_jax.layers import KERNELS_OUT_IN
from gpt2_jax.model import GPT2LMHeadModel, init_params
from gpt2_jax.precision import (
    QuantizedArray, compute_dtype, dequantize_params, is_quantized, params_are_quantized, precision_note,
    quantize_array, quantize_params, quantized_bytes,
)

CFG = GPT2Config(vocab_size=61, n_positions=96, n_embd=16, n_layer=2, n_head=2, initializer_range=0.2,
                 bos_token_id=0, eos_token_id=0)
PROMPT, NEW = 16, 64
BF16_UNIT_ROUNDOFF = 2.0**-9  # round to nearest with 8 significand bits


def on_cpu() -> bool:
    return backend.platform_of(None) == "cpu"


cpu_only = pytest.mark.skipif(not on_cpu(), reason="the CPU's float32-compute choice is what is tested")


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.PRNGKey(7), CFG)


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(20240611).integers(0, CFG.vocab_size, (1, PROMPT))


def bf16(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree)


def upcast(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)


def greedy(p, ids, **kwargs):
    out = generate(p, ids, model_config=CFG, max_new_tokens=NEW, do_sample=False, eos_token_id=(), **kwargs)
    return np.asarray(out.sequences)


def teacher_forced_logits(weights, seq, dtype="float32"):
    """``[NEW, vocab]`` logits predicting the generated tokens of ``seq`` (row 0), from prepared weights."""
    variables = weights.variables if isinstance(weights, DecodeWeights) else {"params": weights}
    logits = GPT2LMHeadModel(CFG, dtype=jnp.dtype(dtype)).apply(variables, jnp.asarray(seq)).logits
    return np.asarray(logits, np.float32)[0, PROMPT - 1:-1]


def logits_jacobian(params, seq):
    """d logits / d params at the teacher-forced positions: a params-shaped tree of ``[NEW, vocab, *w.shape]``."""
    model = GPT2LMHeadModel(CFG)
    return jax.jacrev(lambda p: model.apply({"params": p}, jnp.asarray(seq)).logits[0, PROMPT - 1:-1])(params)


def _summed(tree) -> np.ndarray:
    return np.asarray(sum(jax.tree_util.tree_leaves(tree)))


def first_order_bound(jac, weight_error) -> np.ndarray:
    """``[NEW, vocab]``: ``sum_w |d logit / d w| * weight_error[w]`` at every teacher-forced position."""
    return _summed(jax.tree_util.tree_map(
        lambda j, e: jnp.sum(jnp.abs(j) * e, axis=tuple(range(2, j.ndim))), jac, weight_error))


def margin_std(jac, weight_error, top) -> np.ndarray:
    """``[NEW, vocab]``: standard deviation of the change of ``logit[top] - logit[k]`` when each weight error is
    independent and uniform on ``[-e_w, e_w]``."""
    rows = np.arange(len(top))

    def var(j, e):
        diff = j[rows, top][:, None] - j  # [NEW, vocab, *w]
        return jnp.sum(diff**2 * (e**2 / 3.0), axis=tuple(range(2, j.ndim)))

    return np.sqrt(_summed(jax.tree_util.tree_map(var, jac, weight_error)))


def beyond_reach(ref_logits, reach) -> np.ndarray:
    """``[NEW]`` bool: positions where float32's top-1 leads every other token by more than ``reach [NEW, vocab]``."""
    top = ref_logits.argmax(-1)
    rows = np.arange(len(top))
    margin = ref_logits[rows, top][:, None] - ref_logits  # [NEW, vocab], >= 0
    margin[rows, top] = np.inf
    return (margin > reach).all(axis=-1)


@pytest.fixture(scope="module")
def reference(params, prompt):
    """float32's greedy continuation and its teacher-forced logits."""
    seq = greedy(params, prompt)
    return seq, teacher_forced_logits(params, seq)


# bfloat16 ------------------------------------------------------------------------------------------------------
@cpu_only
def test_cpu_default_computes_narrow_dtypes_in_float32(params):
    assert not backend.tuning_for(params).low_precision_compute
    assert compute_dtype("bfloat16", params) == "float32"
    assert compute_dtype(None, bf16(params)) == "float32"
    assert compute_dtype("float16", params) == "float32"
    assert compute_dtype("float32", bf16(params)) == "float32"
    with backend.overrides(low_precision_compute=True):
        assert compute_dtype(None, bf16(params)) == "bfloat16"
    assert compute_dtype("bfloat16", tuning=Tuning(low_precision_compute=True)) == "bfloat16"
    assert build_request(bf16(params), CFG, np.zeros((1, 3), np.int64), eos_token_id=()).dtype == "float32"


@cpu_only
def test_prepared_weights_are_float32_on_the_cpu_and_stay_narrow_when_computing_narrow(params):
    clear_cache()
    narrow = bf16(params)
    weights = decode_weights(narrow)
    leaves = jax.tree_util.tree_leaves(weights)
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert weights.params["wte"]["embedding"].dtype == jnp.float32  # the LM head too
    np.testing.assert_array_equal(np.asarray(weights.params["wte"]["embedding"]),
                                  np.asarray(narrow["wte"]["embedding"], np.float32))
    assert decode_weights(narrow) is weights  # made once per params object
    with backend.overrides(low_precision_compute=True):
        kept = decode_weights(narrow)
    assert kept is not weights
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(kept))
    assert kept.kernels_out_in is not None  # still the CPU's transposed layout
    plain = decode_weights(narrow, tuning=Tuning(low_precision_compute=True))  # a GPU/TPU-like tuning
    assert plain.kernels_out_in is None and plain.params is narrow  # nothing to prepare
    assert decode_weights(params, tuning=Tuning()).params is params


@cpu_only
def test_bfloat16_on_the_cpu_is_float32_compute_of_the_rounded_weights(params, prompt, reference):
    narrow = bf16(params)
    rounded = upcast(narrow)
    seq, ref_logits = reference
    got = teacher_forced_logits(decode_weights(narrow), seq, compute_dtype(None, narrow))
    exact = teacher_forced_logits(rounded, seq)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    # Within the first-order effect of the bfloat16 rounding of each weight.
    bound = first_order_bound(logits_jacobian(params, seq),
                              jax.tree_util.tree_map(lambda w: jnp.abs(w) * BF16_UNIT_ROUNDOFF, params))
    err = np.abs(got - ref_logits)
    assert (err <= 2.0 * bound + 1e-5).all(), float((err / (bound + 1e-12)).max())
    # The engine (prefill of the prompt) computes the same float32 numbers, through the bfloat16 request.
    cache = init_cache(CFG, 1, 32, jnp.float32)
    last, _ = prefill(narrow, prompt, np.ones_like(prompt), cache, config=CFG)
    ref_last = teacher_forced_logits(rounded, seq)[0]
    np.testing.assert_allclose(np.asarray(last)[0], ref_last, rtol=1e-5, atol=1e-5 * np.abs(ref_last).max())
    # Greedy generation with bfloat16 params = float32 generation with the rounded weights.
    np.testing.assert_array_equal(greedy(narrow, prompt), greedy(rounded, prompt))
    np.testing.assert_array_equal(greedy(params, prompt, dtype="bfloat16"), greedy(params, prompt))


@cpu_only
def test_bfloat16_and_int8_on_the_cpu_reuse_the_float32_programs(params, prompt):
    """Not just as fast: the very same compiled programs (prepared float32 weights, float32 compute dtype)."""
    from gpt2_jax.generation import engine

    greedy(params, prompt)
    before = dict(engine.TRACE_COUNTS)
    greedy(bf16(params), prompt)
    greedy(quantize_params(params), prompt)
    greedy(params, prompt, dtype="bfloat16")
    assert dict(engine.TRACE_COUNTS) == before


# int8 ----------------------------------------------------------------------------------------------------------
def test_int8_round_trip_is_within_half_a_scale_per_weight(params):
    q = quantize_params(params)
    assert params_are_quantized(q) and not params_are_quantized(params)
    checked = 0
    for (path, w), (_, qa) in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves_with_path(q, is_leaf=is_quantized)):
        name = jax.tree_util.keystr(path)
        if not is_quantized(qa):
            assert "kernel" not in name and "wte" not in name
            assert qa is w  # biases, layer norms, wpe: untouched
            continue
        checked += 1
        w = np.asarray(w, np.float64)
        assert qa.q.dtype == jnp.int8 and qa.q.shape == w.shape and qa.dtype == jnp.float32
        assert np.abs(np.asarray(qa.q, np.int32)).max() <= 127
        scale = np.asarray(qa.scale, np.float64)
        reduced = qa.axis % w.ndim
        assert scale.shape[reduced] == 1 and scale.size == w.size // w.shape[reduced]  # one per output channel
        np.testing.assert_allclose(scale, np.abs(w).max(axis=reduced, keepdims=True) / 127, rtol=1e-6)
        err = np.abs(np.asarray(qa.dequantize(), np.float64) - w)
        assert (err <= scale / 2 * (1 + 1e-6) + 1e-12).all(), name
    assert checked == 4 * CFG.n_layer + 1  # every Dense kernel and wte
    assert quantized_bytes(q) < quantized_bytes(params) / 2  # the tiny model: float wpe and scales weigh more


def test_quantize_array_edge_cases():
    w = jnp.asarray([[0.0, 1.0], [0.0, -2.0], [0.0, 0.5]])  # [in 3, out 2], first output channel all zero
    qa = quantize_array(w)
    np.testing.assert_array_equal(np.asarray(qa.q)[:, 0], 0)
    np.testing.assert_array_equal(np.asarray(qa.dequantize())[:, 0], 0.0)
    assert np.asarray(qa.q)[1, 1] == -127
    stacked = quantize_array(jnp.stack([w, 2 * w]))  # a scan_layers kernel [layers, in, out]
    assert stacked.scale.shape == (2, 1, 2)
    np.testing.assert_allclose(np.asarray(stacked.scale)[1, :, 1], 2 * np.asarray(stacked.scale)[0, :, 1])
    qt = qa.transpose_last()
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), np.asarray(qa.dequantize()).T)
    with pytest.raises(ValueError, match="negative"):
        quantize_array(w, axis=0)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_array(jnp.asarray([[1, 2]], jnp.int32))
    with pytest.raises(ValueError, match="unknown quantization 'int4'; choose one of: int8"):
        quantize_params({"kernel": w}, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(quantize_params({"h": {"kernel": w}}))


def test_int8_logits_and_greedy_tokens_within_the_round_off_bound(params, prompt, reference):
    q = quantize_params(params)
    seq, ref_logits = reference
    got = teacher_forced_logits(decode_weights(q), seq, compute_dtype(None, q))
    np.testing.assert_allclose(got, teacher_forced_logits(dequantize_params(q), seq), rtol=1e-5, atol=1e-5)
    half_scale = jax.tree_util.tree_map(
        lambda w, qa: (jnp.broadcast_to(qa.scale / 2, w.shape) if is_quantized(qa) else jnp.zeros_like(w)),
        params, q, is_leaf=is_quantized)
    jac = logits_jacobian(params, seq)
    bound = first_order_bound(jac, half_scale)
    err = np.abs(got - ref_logits)
    assert (err <= 2.0 * bound + 1e-5).all(), float((err / (bound + 1e-12)).max())
    # Greedy agreement: teacher-forced top-1 equal wherever float32's margin is beyond reach of the worst case, or
    # of 6 standard deviations of independent rounding errors; free-running greedy generation equal at least up to
    # the first position where it is not.
    top = ref_logits.argmax(-1)
    rows = np.arange(NEW)
    worst = beyond_reach(ref_logits, 2.0 * (bound[rows, top][:, None] + bound) + 1e-5)
    np.testing.assert_array_equal(got.argmax(-1)[worst], top[worst])
    safe = beyond_reach(ref_logits, 6.0 * margin_std(jac, half_scale, top) + 1e-5)
    assert worst.sum() <= safe.sum() and safe.mean() >= 0.5, (worst.mean(), safe.mean())  # not vacuous
    np.testing.assert_array_equal(got.argmax(-1)[safe], top[safe])
    first_unsafe = int(np.argmin(safe)) if not safe.all() else NEW
    free = greedy(q, prompt)[0, PROMPT:]
    np.testing.assert_array_equal(free[:first_unsafe], seq[0, PROMPT:PROMPT + first_unsafe])


def test_generate_with_quantized_params_matches_the_dequantized_ones(params, prompt):
    q = quantize_params(params)
    expected = greedy(dequantize_params(q), prompt)
    np.testing.assert_array_equal(greedy(q, prompt), expected)
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 9))
    sampled = generate(q, ids, model_config=CFG, max_new_tokens=12, do_sample=True, top_k=10,
                       key=jax.random.key(3), eos_token_id=())
    again = generate(dequantize_params(q), ids, model_config=CFG, max_new_tokens=12, do_sample=True, top_k=10,
                     key=jax.random.key(3), eos_token_id=())
    np.testing.assert_array_equal(sampled.sequences, again.sequences)


@pytest.mark.parametrize("transposed", [False, True], ids=["params-layout", "transposed"])
def test_int8_kernels_kept_in_the_program_compute_the_same_logits(params, reference, transposed):
    """The GPU/TPU path (low_precision_compute on): Dense converts int8 kernels inside its matmul."""
    q = quantize_params(params)
    seq, _ = reference
    tuning = Tuning(low_precision_compute=True, transposed_kernels=transposed)
    weights = decode_weights(q, tuning=tuning)
    collection = weights.kernels_out_in if transposed else weights.params
    assert is_quantized(collection["h"]["0"]["attn"]["c_attn"]["kernel"])
    assert not is_quantized(weights.params["wte"]["embedding"])  # the embedding/LM head reads a plain array
    assert (KERNELS_OUT_IN in weights.variables) == transposed
    expected = teacher_forced_logits(dequantize_params(q), seq)
    np.testing.assert_allclose(teacher_forced_logits(weights, seq), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_quantized_array_is_a_pytree_that_jit_and_scan_slicing_keep():
    qa = quantize_array(jnp.arange(12.0).reshape(2, 3, 2) - 5)
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 2
    back = jax.jit(lambda x: x)(qa)
    assert isinstance(back, QuantizedArray) and back.axis == qa.axis and back.orig_dtype == "float32"
    sliced = jax.tree_util.tree_map(lambda x: x[1], qa)  # what nn.scan does to a stacked kernel
    np.testing.assert_allclose(np.asarray(sliced.dequantize()), np.asarray(qa.dequantize())[1])


# What the tools say and refuse -----------------------------------------------------------------------------------
@cpu_only
def test_precision_notes_say_what_runs():
    note = precision_note("bfloat16", platform="cpu")
    assert "stored in bfloat16, computed in float32" in note and "low_precision_compute=1" in note
    assert precision_note("float32", platform="cpu") is None
    assert "dequantized once to float32" in precision_note("float32", quantize="int8", platform="cpu")
    gpu = precision_note("bfloat16", Tuning(low_precision_compute=True), "int8", platform="gpu")
    assert "stored and computed in bfloat16" in gpu and "converted inside each layer's matmul" in gpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gpt2_jax.checkpoints.hf_directory import save_hf_directory
    from gpt2_jax.tokenizer import GPT2Tokenizer

    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny-gpt2-lp")
    save_hf_directory(path, init_params(jax.random.PRNGKey(0), cfg), cfg, tokenizer=GPT2Tokenizer())
    return path


@pytest.fixture
def no_persistent_cache(monkeypatch):
    monkeypatch.setenv("GPT2_JAX_COMPILATION_CACHE", "off")


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int4"], r"argument --quantize: invalid choice: 'int4' \(choose from '?int8'?\)"),
    (["--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'"),
])
def test_generate_cli_refuses_bad_precision_values(checkpoint, capsys, no_persistent_cache, extra, message):
    import re

    from gpt2_jax.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal
        main(["generate", "Hello", "--model", str(checkpoint)] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "gpt2-jax generate: error:" in err and re.search(message, err), err


@cpu_only
def test_generate_cli_quantized_and_bfloat16_say_what_they_do(checkpoint, capsys, no_persistent_cache):
    from gpt2_jax.cli import main

    base = ["generate", "Hello", "--model", str(checkpoint), "--max-new-tokens", "5", "--greedy"]
    assert main(base) == 0
    plain = capsys.readouterr()
    assert "note:" not in plain.err
    assert main(base + ["--quantize", "int8"]) == 0
    quantized = capsys.readouterr()
    assert "note: int8 weights" in quantized.err and quantized.out.startswith("Hello")
    assert main(base + ["--dtype", "bfloat16"]) == 0
    narrow = capsys.readouterr()
    assert "computed in float32" in narrow.err and narrow.out.startswith("Hello")


def test_bench_cli_refuses_bad_quantize_and_reports_int8(monkeypatch, tmp_path):
    import json

    from inspect_helpers import run_cli

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 256, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
                                  "bos_token_id": 0, "eos_token_id": 0}))
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal
        run_cli(monkeypatch, "bench", "--model", str(config), "--quantize", "int4")
    assert exit_info.value.code == 2
    code, out, err = run_cli(monkeypatch, "bench", "--model", str(config), "--batch", "1", "--prompt", "8",
                             "--new", "4", "--runs", "1", "--no-generate", "--quantize", "int8", "--dtype",
                             "bfloat16", "--json")
    assert code == 0, err
    report = json.loads(out)
    from gpt2_jax.inspect import load_schema, validate_json

    assert validate_json(report, load_schema()) == []
    model = report["model"]
    assert model["quantize"] == "int8" and model["dtype"] == "bfloat16"
    assert model["param_bytes"] < model["params"] * 2  # stored as int8 (+ scales, float biases / wpe)
    if on_cpu():
        assert model["compute_dtype"] == "float32" and model["prepared_bytes"] >= model["params"] * 4
        assert any("dequantized once to float32" in n for n in report["notes"])
