"""``gpt2-jax convert``: any source to a Hugging Face safetensors directory, atomically."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers

from checkpoint_helpers import TINY, assert_same_params, byte_tokenizer, random_params
from conftest import REPO
from gpt2_jax.checkpoints.convert import convert_checkpoint
from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.pretrained import from_pretrained
from gpt2_jax.checkpoints.safetensors_io import CheckpointError, read_safetensors
from gpt2_jax.cli import main

FIXTURES = REPO / "tests" / "fixtures"
HF_TINY = FIXTURES / "hf_tiny"
TF_TINY = FIXTURES / "openai_tf_tiny"

pytestmark = pytest.mark.filterwarnings("ignore::gpt2_jax.checkpoints.pretrained.TokenizerFallbackWarning")


def _hf_logits(directory, ids) -> np.ndarray:
    model = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


@pytest.mark.parametrize("sub", ["pytorch", "pytorch_sharded", "flax", "safetensors_sharded"])
def test_convert_hf_formats_to_safetensors(tmp_path, sub, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(HF_TINY / sub), str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                            "special_tokens_map.json"])
    assert_same_params(from_pretrained(out).params, from_pretrained(HF_TINY / "safetensors").params)
    expected = np.load(HF_TINY / "expected.npz")
    np.testing.assert_allclose(_hf_logits(out, expected["input_ids"]), expected["logits_pt"], rtol=1e-5, atol=1e-5)


def test_convert_openai_tf_checkpoint_and_dtype(tmp_path, capsys):
    out = tmp_path / "tf-out"
    assert main(["convert", str(TF_TINY), str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "note:" in captured.err and "bundled GPT-2 tokenizer" in captured.err
    assert "openai-tf" in captured.out and "bfloat16" in captured.out
    tensors, metadata = read_safetensors(out / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    ids = np.random.default_rng(1).integers(0, 96, (1, 32))
    ours = from_pretrained(out)  # default float32: bf16 -> f32 is exact
    model = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits.numpy()
    from gpt2_jax.model import GPT2LMHeadModel

    logits = np.asarray(GPT2LMHeadModel(ours.config).apply({"params": ours.params}, ids).logits)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=2e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("hello") == ours.tokenizer.encode("hello")


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    save_hf_directory(out, random_params(seed=1), TINY)
    before = (out / "model.safetensors").read_bytes()
    assert main(["convert", str(HF_TINY / "safetensors"), str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["convert", str(HF_TINY / "safetensors"), str(out), "--overwrite", "--quiet"]) == 0
    assert_same_params(from_pretrained(out).params, from_pretrained(HF_TINY / "safetensors").params)


def test_corrupt_input_leaves_old_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    save_hf_directory(out, random_params(seed=1), TINY, tokenizer=byte_tokenizer())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = tmp_path / "src"
    shutil.copytree(HF_TINY / "pytorch", src)
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    assert main(["convert", str(src), str(out), "--overwrite"]) == 2
    assert "truncated or corrupt PyTorch checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directory left


def test_exception_while_writing_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    calls = []

    def fail_after_first_tensor(nbytes):
        calls.append(nbytes)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_checkpoint(HF_TINY / "safetensors", out, progress=fail_after_first_tensor)
    assert calls and not out.exists()
    assert list(tmp_path.iterdir()) == []
    # and with an existing output: untouched
    save_hf_directory(out, random_params(seed=1), TINY)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        convert_checkpoint(HF_TINY / "safetensors", out, overwrite=True, progress=fail_after_first_tensor)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_killed_conversion_leaves_no_partial_output(tmp_path):
    """SIGKILL in the middle of writing model.safetensors: no DST appears, an old DST stays as it was."""
    old = tmp_path / "old"
    save_hf_directory(old, random_params(seed=1), TINY)
    before = (old / "model.safetensors").read_bytes()
    script = textwrap.dedent("""
        import os, signal, sys
        from gpt2_jax.checkpoints.convert import convert_checkpoint
        written = []
        def progress(nbytes):
            written.append(nbytes)
            if len(written) == 3:  # a few tensors into model.safetensors
                os.kill(os.getpid(), signal.SIGKILL)
        convert_checkpoint(sys.argv[1], sys.argv[2], overwrite=True, progress=progress)
    """)
    for dst in (tmp_path / "new", old):
        done = subprocess.run([sys.executable, "-c", script, str(HF_TINY / "safetensors"), str(dst)],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (tmp_path / "new").exists()
    assert (old / "model.safetensors").read_bytes() == before
    assert_same_params(from_pretrained(old).params, random_params(seed=1))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("old",)]
    # hidden work directories, and the killed writers' lock files (the next convert to DST takes them over)
    assert all(name.startswith((".new.tmp-", ".old.tmp-")) or name in (".new.lock", ".old.lock")
               for name in leftovers), leftovers


def test_convert_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "is neither a directory nor a Hugging Face hub id" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "holds no GPT-2 weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(HF_TINY / "safetensors"), str(tmp_path / "out"), "--dtype", "int8"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out2", progress=False)
