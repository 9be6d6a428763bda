"""from_pretrained with hub ids, hermetically: a fake hub on 127.0.0.1 (tests/fake_hub.py) and a cache in tmp_path.

Most tests point huggingface_hub at the fake hub by patching the module constants it reads at call time (its
environment variables are read once, at import); one test runs the ``gpt2-jax`` CLI in a subprocess with the real
``HF_ENDPOINT`` / ``HF_HOME`` variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoint_helpers import TINY, assert_same_params, byte_tokenizer, files_of, random_params
from fake_hub import FakeHub
from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.hub import CheckpointNotFoundError, HubUnavailableError, canonical_repo_id, is_hub_id
from gpt2_jax.checkpoints.pretrained import from_pretrained
from gpt2_jax.checkpoints.safetensors_io import CheckpointError

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "openai-community/gpt2"


def _checkpoint_files(tmp: Path, seed: int, shard_size: int | None = None, with_tokenizer: bool = True) -> dict:
    params = random_params(TINY, seed)
    directory = tmp / f"ckpt-{seed}-{shard_size}"
    save_hf_directory(directory, params, TINY, tokenizer=byte_tokenizer() if with_tokenizer else None)
    files = files_of(directory)
    if shard_size:  # re-shard model.safetensors the way huggingface_hub / transformers do
        from huggingface_hub import save_torch_state_dict
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
        sharded = tmp / f"sharded-{seed}"
        sharded.mkdir()
        save_torch_state_dict(state, sharded, max_shard_size=shard_size)
        del files["model.safetensors"]
        files.update(files_of(sharded))
        assert "model.safetensors.index.json" in files
    return {"params": params, "files": files}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub-src")
    a = _checkpoint_files(tmp, seed=1)
    b = _checkpoint_files(tmp, seed=2)
    sharded = _checkpoint_files(tmp, seed=3, shard_size=20_000)
    binary = _checkpoint_files(tmp, seed=4, with_tokenizer=False)
    import torch

    from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict

    bin_path = tmp / "pytorch_model.bin"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in params_to_state_dict(binary["params"]).items()}, bin_path)
    del binary["files"]["model.safetensors"]
    binary["files"]["pytorch_model.bin"] = bin_path.read_bytes()
    decoys = {"pytorch_model.bin": b"not needed", "flax_model.msgpack": b"not needed", "tf_model.h5": b"no"}
    repos = {
        REPO: {
            "commits": {COMMIT_A: {**a["files"], **decoys}, COMMIT_B: {**b["files"], **decoys}},
            "refs": {"main": COMMIT_B, "v1": COMMIT_A},
        },
        "someone/sharded-gpt2": {"commits": {COMMIT_A: sharded["files"]}, "refs": {"main": COMMIT_A}},
        "someone/bin-gpt2": {"commits": {COMMIT_A: binary["files"]}, "refs": {"main": COMMIT_A}},
        "someone/empty": {"commits": {COMMIT_A: {"config.json": a["files"]["config.json"]}}, "refs": {"main": COMMIT_A}},
    }
    return {"a": a, "b": b, "sharded": sharded, "binary": binary, "repos": repos}


def _point_hub_at(monkeypatch, endpoint: str, cache: Path, offline: bool = False) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)


@pytest.fixture
def hub(checkpoints, tmp_path, monkeypatch):
    server = FakeHub(checkpoints["repos"]).start()
    _point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf" / "hub")
    yield server
    server.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_names():
    assert canonical_repo_id("gpt2") == "openai-community/gpt2"
    assert canonical_repo_id("gpt2-xl") == "openai-community/gpt2-xl"
    assert canonical_repo_id("user/gpt2") == "user/gpt2"
    assert is_hub_id("gpt2") and is_hub_id("openai-community/gpt2-large") and is_hub_id("a-b_c.d/e")
    for bad in ("", "./gpt2", "/abs/dir", "a/b/c", "~/x", "a\\b", "x--y", "bad name"):
        assert not is_hub_id(bad), bad


def test_download_caches_and_loads_again_without_the_server(hub, checkpoints, monkeypatch):
    loaded = from_pretrained("gpt2")
    assert loaded.revision == COMMIT_B and loaded.format == "safetensors"
    assert_same_params(loaded.params, checkpoints["b"]["params"])
    assert loaded.tokenizer.vocab_size == 257  # the repository's own tokenizer files, not the bundled one
    assert not loaded.notes
    # only what is needed: config, the first weights file, tokenizer files; never the other formats
    # (weights are "LFS" files: HEAD on the hub, then GET from the CDN it redirects to)
    assert sorted(hub.fetched("GET")) == sorted(["config.json", "vocab.json", "merges.txt", "tokenizer_config.json"])
    assert "model.safetensors" in hub.fetched("HEAD")
    assert len([p for m, p in hub.requests if m == "GET" and p.startswith("/cdn/")]) == 1
    assert not {"pytorch_model.bin", "flax_model.msgpack", "tf_model.h5"} & set(hub.fetched("HEAD"))
    assert Path(loaded.source).is_relative_to(Path(os.environ["HF_HOME"]))

    n_requests = len(hub.requests)
    hub.stop()
    start = time.monotonic()
    again = from_pretrained("gpt2")  # server gone: falls back to the cache, quickly
    assert time.monotonic() - start < 20
    assert again.revision == COMMIT_B
    assert_same_params(again.params, checkpoints["b"]["params"])
    offline = from_pretrained("openai-community/gpt2", local_files_only=True)
    assert_same_params(offline.params, checkpoints["b"]["params"])
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_same_params(from_pretrained("gpt2").params, checkpoints["b"]["params"])
    assert len(hub.requests) == n_requests


def test_second_online_load_downloads_nothing(hub, checkpoints):
    from_pretrained("gpt2")
    gets = len(hub.fetched("GET"))
    from_pretrained("gpt2")
    assert len(hub.fetched("GET")) == gets


def test_revision_pins_a_commit_branch_or_tag(hub, checkpoints):
    by_tag = from_pretrained("gpt2", revision="v1")
    assert by_tag.revision == COMMIT_A
    assert_same_params(by_tag.params, checkpoints["a"]["params"])
    by_commit = from_pretrained("gpt2", revision=COMMIT_A)
    assert_same_params(by_commit.params, checkpoints["a"]["params"])
    main = from_pretrained("gpt2")
    assert_same_params(main.params, checkpoints["b"]["params"])
    hub.stop()  # both revisions are now cached side by side
    assert_same_params(from_pretrained("gpt2", revision=COMMIT_A, local_files_only=True).params,
                       checkpoints["a"]["params"])
    assert_same_params(from_pretrained("gpt2", revision="v1", local_files_only=True).params,
                       checkpoints["a"]["params"])
    assert_same_params(from_pretrained("gpt2", local_files_only=True).params, checkpoints["b"]["params"])


def test_sharded_and_pytorch_repositories(hub, checkpoints):
    sharded = from_pretrained("someone/sharded-gpt2")
    assert sharded.format == "safetensors-sharded"
    assert_same_params(sharded.params, checkpoints["sharded"]["params"])
    shards = [f for f in hub.fetched("HEAD") if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in hub.fetched("GET")

    with pytest.warns(UserWarning, match="bundled GPT-2 tokenizer"):
        binary = from_pretrained("someone/bin-gpt2")
    assert binary.format == "pytorch"
    assert_same_params(binary.params, checkpoints["binary"]["params"])
    assert binary.notes and "bundled" in binary.notes[0]


def test_repository_without_weights(hub):
    with pytest.raises(CheckpointNotFoundError, match="no GPT-2 weights.*model.safetensors.*pytorch_model.bin"):
        from_pretrained("someone/empty")


def test_unknown_repository_and_revision(hub):
    with pytest.raises(CheckpointNotFoundError, match="has no model repository 'someone/nope'"):
        from_pretrained("someone/nope")
    with pytest.raises(CheckpointNotFoundError, match="has no revision 'v9'"):
        from_pretrained("gpt2", revision="v9")


def test_no_network_and_nothing_cached(tmp_path, monkeypatch):
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}", tmp_path / "hf" / "hub")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError) as info:
        from_pretrained("gpt2")
    assert time.monotonic() - start < 15  # no retry back-off
    message = str(info.value)
    assert message.startswith("cannot download 'gpt2' (no network")
    assert "it is not in the Hugging Face cache" in message
    assert "pass a local directory with --model / as name_or_path" in message


def test_offline_modes_with_nothing_cached(hub, monkeypatch):
    with pytest.raises(HubUnavailableError, match=r"cannot download 'gpt2' \(local_files_only=True\)"):
        from_pretrained("gpt2", local_files_only=True)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match=r"HF_HUB_OFFLINE is set.*not in the Hugging Face cache"):
        from_pretrained("gpt2")
    assert hub.requests == []


def test_neither_directory_nor_hub_id(hub, tmp_path):
    for name in ("./no/such/dir", str(tmp_path / "missing"), "a/b/c"):
        with pytest.raises(CheckpointNotFoundError, match="is neither a directory nor a Hugging Face hub id"):
            from_pretrained(name)
    with pytest.raises(CheckpointNotFoundError, match="neither a directory"):
        from_pretrained(Path("gpt2-not-here"))  # a Path is never a hub id
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="is a file; pass the checkpoint directory"):
        from_pretrained(file)
    assert hub.requests == []
    with pytest.raises(ValueError, match="unknown dtype"):
        from_pretrained("gpt2", dtype="int8")


def test_cli_convert_from_the_hub_with_environment_variables(checkpoints, tmp_path):
    """The real environment-variable route in a fresh process: HF_ENDPOINT + HF_HOME, then offline reuse."""
    server = FakeHub(checkpoints["repos"]).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(tmp_path / "hf"), JAX_PLATFORMS="cpu",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    cli = [sys.executable, "-m", "gpt2_jax.cli"]
    try:
        done = subprocess.run([*cli, "convert", "gpt2", str(tmp_path / "out"), "--revision", "v1"], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "hub" / "models--openai-community--gpt2").is_dir()
    assert_same_params(from_pretrained(tmp_path / "out").params, checkpoints["a"]["params"])
    # offline, from the cache filled above
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([*cli, "convert", "gpt2", str(tmp_path / "out2"), "--revision", "v1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_params(from_pretrained(tmp_path / "out2").params, checkpoints["a"]["params"])
    env["HF_HOME"] = str(tmp_path / "empty-hf")
    done = subprocess.run([*cli, "convert", "gpt2", str(tmp_path / "out3")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert "cannot download 'gpt2' (HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache" in done.stderr
    assert not (tmp_path / "out3").exists()


def test_a_corrupt_cached_download_is_reported(hub, checkpoints):
    loaded = from_pretrained("gpt2")
    weights = Path(loaded.source) / "model.safetensors"
    blob = weights.resolve()
    blob.chmod(0o644)
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained("gpt2", local_files_only=True)
