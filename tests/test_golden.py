"""Golden figures for the released gpt2 (124M) from ../shared/testdata/gpt2_vectors.json.

The parameter count is always checked. The figures that need the real weights run when they are on disk:
a directory named by ``GPT2_JAX_WEIGHTS`` or ``gpt2`` in the Hugging Face cache; otherwise they skip, saying so.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import VECTORS
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import GPT2LMHeadModel, GPT2Model, count_params, init_params

pytestmark = pytest.mark.skipif(not VECTORS.exists(), reason=f"reference vectors not found at {VECTORS}")


@pytest.fixture(scope="module")
def vectors():
    return json.loads(VECTORS.read_text())["pretrained_gpt2"]


@pytest.fixture(scope="module")
def released():
    """The real gpt2 weights if they are on this machine, else skip with the reason."""
    from gpt2_jax.checkpoints.hub import CheckpointNotFoundError
    from gpt2_jax.checkpoints.pretrained import from_pretrained

    source = os.environ.get("GPT2_JAX_WEIGHTS") or "gpt2"
    try:
        return from_pretrained(source, local_files_only=True)
    except CheckpointNotFoundError as e:  # not on disk; any other error is a real failure
        pytest.skip(f"real gpt2 weights are not available locally ({source!r}: {str(e).splitlines()[0]}); "
                    "set GPT2_JAX_WEIGHTS to a Hugging Face gpt2 directory to run this test")


def test_parameter_count_and_config(vectors):
    config = GPT2Config.from_hf_dict(vectors["config"])
    assert config == GPT2Config()
    shapes = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config))
    assert count_params(shapes) == vectors["parameter_count"]


def test_last_hidden_state_corners(vectors, released):
    case = vectors["last_hidden_state_corners"]
    ids = np.array([released.tokenizer.encode(case["prompt"])])
    hidden = np.asarray(GPT2Model(released.config).apply({"params": released.params}, ids).last_hidden_state)[0]
    for row, (first, last) in zip(hidden, case["rows"]):
        np.testing.assert_allclose(row[:3], first, rtol=0, atol=1.5e-4)
        np.testing.assert_allclose(row[-3:], last, rtol=0, atol=1.5e-4)


def test_next_token_top10(vectors, released):
    case = vectors["next_token_top10"]
    tok = released.tokenizer
    ids = np.array([tok.encode(case["prompt"])])
    logits = GPT2LMHeadModel(released.config).apply({"params": released.params}, ids).logits[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    top = np.argsort(-probs)[:10]
    assert int(top[0]) == case["argmax_id"]
    np.testing.assert_allclose(probs[top[0]], case["argmax_prob"], rtol=0, atol=1e-5)
    for index, (text, prob) in zip(top, case["probs_rounded_3"]):
        assert tok.decode([int(index)]) == text
        np.testing.assert_allclose(probs[index], prob, rtol=0, atol=6e-4)


def test_greedy_continuations(vectors, released):
    tok = released.tokenizer
    model = GPT2LMHeadModel(released.config)
    step = jax.jit(lambda p, ids: jnp.argmax(model.apply({"params": p}, ids).logits[0, -1]))
    for case in vectors["greedy"]:
        if case.get("num_beams", 1) != 1:
            continue  # see test_beam_search_continuation
        ids = tok.encode(case["prompt"])
        total = case.get("max_length") or len(ids) + case["max_new_tokens"]
        while len(ids) < total:
            ids.append(int(step(released.params, np.array([ids]))))
        assert tok.decode(ids).startswith(case["text"]) or tok.decode(ids) == case["text"]


def test_beam_search_continuation(vectors, released):
    from gpt2_jax.generation import generate

    tok = released.tokenizer
    for case in vectors["greedy"]:
        if case.get("num_beams", 1) == 1:
            continue
        ids = tok.encode(case["prompt"])
        out = generate(released.params, [ids], model_config=released.config,
                       max_new_tokens=case["max_new_tokens"], num_beams=case["num_beams"])
        text = tok.decode(ids + out.new_tokens()[0])
        assert text.startswith(case["text"]) or case["text"].startswith(text), text
