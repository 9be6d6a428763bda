"""A newcomer's offline start: ``--random-weights`` on every command that loads a model (no network, output
labelled as random), ``save_hf_directory`` directories that load without warnings, plain ``--help`` text,
short reprs, and ``convert``'s messages naming its own arguments."""

from __future__ import annotations

import json
import socket
import warnings

import jax
import pytest

from gpt2_jax import cli
from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.pretrained import Pretrained, TokenizerFallbackWarning, from_pretrained
from gpt2_jax.checkpoints.random_weights import architecture, load_or_random, random_pretrained
from gpt2_jax.config import GPT2Config
from gpt2_jax.helptext import RST_MARKUP, plain_text
from gpt2_jax.model import init_params

TINY = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)
TEXT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "config.json"
    path.write_text(TINY.to_json_string(), encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any socket connection fails the test, and the hub client is told it is offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("a --random-weights command tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("gpt2_jax.checkpoints.pretrained.download_checkpoint", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2_JAX_COMPILATION_CACHE", "off")  # the in-process CLI must not reconfigure JAX


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_architecture_and_load_or_random(tiny_json, offline):
    assert architecture("gpt2") == GPT2Config.from_preset("gpt2")
    assert architecture("openai-community/gpt2-xl").n_layer == 48
    assert architecture(tiny_json) == TINY and architecture(tiny_json.parent) == TINY
    with pytest.raises(ValueError, match="neither a preset"):
        architecture("no-such-model")
    model = load_or_random(tiny_json, random_weights=True, seed=3)
    assert isinstance(model, Pretrained) and model.format == "random" and model.config == TINY
    assert "RANDOM WEIGHTS" in model.notes[0] and "seed 3" in model.source
    same = random_pretrained(tiny_json, seed=3)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree_util.tree_leaves(model.params),
                                                     jax.tree_util.tree_leaves(same.params)))
    abstract = random_pretrained("gpt2", abstract=True)  # shapes only: nothing allocated
    assert isinstance(jax.tree_util.tree_leaves(abstract.params)[0], jax.ShapeDtypeStruct)


def test_generate_random_weights(tiny_json, offline, capsys):
    code, out, err = run(["generate", "Hello", "--random-weights", "--model", tiny_json, "--max-new-tokens", "4",
                          "--greedy"], capsys)
    assert code == 0, err
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")
    assert "RANDOM WEIGHTS" in err and "noise" in err


def test_eval_random_weights(tiny_json, offline, tmp_path, capsys):
    (tmp_path / "valid.txt").write_text(TEXT)
    code, out, err = run(["eval", "--random-weights", "--model", tiny_json, "--data", tmp_path / "valid.txt",
                          "--seq-len", "16", "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert 9.0 < result["loss"] < 12.0  # an untrained model: about ln(50257) = 10.8 nats
    assert "RANDOM WEIGHTS" in err


def test_train_random_weights(tiny_json, offline, tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(TEXT * 4)
    code, out, err = run(["train", "--random-weights", "--model", tiny_json, "--data", tmp_path / "corpus.txt",
                          "--out", tmp_path / "run", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                          "--warmup-steps", "1", "--no-progress", "--no-plot", "--no-final"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["step"] == 2
    assert "RANDOM WEIGHTS" in err
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["train"]["random_weights"] is True and saved["model_config"]["n_embd"] == TINY.n_embd


@pytest.mark.parametrize("argv", [
    ["next", "Hello world", "--top", "3"],
    ["lens", "Hello world"],
    ["attention", "Hello world", "--out", "{tmp}/a.html"],
    ["bench", "--batch", "1", "--prompt", "4", "--new", "2", "--runs", "1", "--no-generate", "--peak-bandwidth",
     "1", "--peak-flops", "1"],
], ids=lambda a: a[0])
def test_inspection_commands_random_weights(argv, tiny_json, offline, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run([*argv, "--random-weights", "--model", tiny_json], capsys)
    assert code == 0, err
    assert "RANDOM WEIGHTS" in err and out


def test_info_random_weights_is_shapes_only(offline, capsys):
    code, out, err = run(["info", "--model", "gpt2-xl", "--random-weights"], capsys)
    assert code == 0, err
    assert "1,557,611,200" in out and "RANDOM" not in err  # true of any weights: nothing to warn about


def test_bench_random_weights_excludes_weights(capsys):
    code, _, err = run(["bench", "--random-weights", "--weights", "gpt2"], capsys)
    assert code == 2 and "exclude each other" in err


# --------------------------------------------------------------------------------------- save_hf_directory
def test_save_hf_directory_writes_gpt2_tokenizer_and_loads_without_warning(tmp_path):
    params = init_params(jax.random.PRNGKey(0), TINY)
    save_hf_directory(tmp_path / "m", params, TINY)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TokenizerFallbackWarning or any other
        loaded = from_pretrained(tmp_path / "m")
    assert not loaded.notes and loaded.tokenizer.encode("Hello world") == [15496, 995]
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "m")("Hello world")["input_ids"] == [15496, 995]

    save_hf_directory(tmp_path / "bare", params, TINY, tokenizer=None)  # opting out: the old behaviour
    with pytest.warns(TokenizerFallbackWarning):
        from_pretrained(tmp_path / "bare")
    small = TINY.replace(vocab_size=96)  # not GPT-2's vocabulary: no GPT-2 tokenizer files
    save_hf_directory(tmp_path / "small", init_params(jax.random.PRNGKey(0), small), small)
    assert not (tmp_path / "small" / "vocab.json").exists()
    with pytest.raises(ValueError, match="tokenizer must be"):
        save_hf_directory(tmp_path / "bad", params, TINY, tokenizer="gpt3")


# ------------------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_has_no_rest_markup(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: gpt2-jax")
    for pattern in RST_MARKUP:
        assert not pattern.search(text), f"reST markup {pattern.pattern!r} in `gpt2-jax {command} --help`"


def test_train_help_explains_ctrl_c_and_random_weights(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Ctrl-C" in text and "second Ctrl-C aborts" in text and "--random-weights" in text


def test_plain_text():
    assert plain_text("see :mod:`gpt2_jax.training.loop` and ``gpt2-jax train``") == \
        "see gpt2_jax.training.loop and gpt2-jax train"
    assert plain_text(":func:`~gpt2_jax.a.b` / :class:`title <x.y>`") == "gpt2_jax.a.b / title"
    assert plain_text("Examples::\n\n    x") == "Examples:\n\n    x"


# ------------------------------------------------------------------------------------------------- repr
def test_short_reprs():
    from gpt2_jax.generation import GenerationConfig
    from gpt2_jax.training import OptimizerConfig, TrainState, make_optimizer
    from gpt2_jax.training.loop import TrainConfig

    assert repr(TINY) == "GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)"
    assert repr(GPT2Config.from_preset("gpt2")) == "GPT2Config()"  # the defaults are the released gpt2
    assert repr(GenerationConfig(max_new_tokens=5)) == "GenerationConfig(max_new_tokens=5)"
    assert repr(OptimizerConfig(learning_rate=1e-4)) == "OptimizerConfig(learning_rate=0.0001)"
    assert repr(TrainConfig(out="run", data=["a.txt"], steps=5)) == "TrainConfig(out='run', data=['a.txt'], steps=5)"
    text = repr(random_pretrained("gpt2", abstract=True))
    assert len(text) < 600 and "124,439,808 params in 148 float32 arrays" in text and "format='random'" in text
    state = TrainState.create(init_params(jax.random.PRNGKey(0), TINY), make_optimizer(OptimizerConfig())[0])
    text = repr(state)
    assert text.startswith("TrainState(step=0, skipped=0, params=<1,635,744 params") and len(text) < 300
    jax.jit(lambda s: repr(s) and s.step)(state)  # also inside a trace (tracers shown by dtype and shape)


# ----------------------------------------------------------------------------------------------- convert
def test_convert_offline_error_names_convert_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code, _, err = run(["convert", "gpt2", tmp_path / "out"], capsys)
    assert code == 2 and "SRC" in err and "--model" not in err, err
