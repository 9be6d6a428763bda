"""Every Python and shell block of README.md runs, in order, offline (``tests/readme_runner.py`` says how: hub
models and large sizes are replaced by a tiny local checkpoint, blocks marked ``skip`` are skipped with their
reason), so the README cannot drift from the code. One subprocess runs the whole README (one JAX import); each
block is reported as its own test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from readme_runner import parse_blocks

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
TIMEOUT_S = 3600  # the whole README: minutes on a quiet 2-core machine; ~35 min measured at load average 17

# Part of the default run (CI): the README's promise that every block runs as written is only kept if CI checks it.


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from gpt2_jax.checkpoints.hf_directory import save_hf_directory
    from gpt2_jax.config import GPT2Config
    from gpt2_jax.model import init_params

    # 6 layers x 2 heads: the README's attention examples pick layer 5, head 1.
    config = GPT2Config(n_positions=256, n_embd=32, n_layer=6, n_head=2)
    tiny = tmp_path_factory.mktemp("tiny-gpt2")
    save_hf_directory(tiny, init_params(jax.random.PRNGKey(0), config), config)
    work = tmp_path_factory.mktemp("readme")
    out = work / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_runner.py"), str(README), str(work),
                               str(tiny), str(out)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        stderr = proc.stderr
    except subprocess.TimeoutExpired as e:  # the blocks done so far are reported; the rest fail as not reached
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        stderr = f"timed out after {TIMEOUT_S} s\n{tail}"
    records = json.loads(out.read_text()) if out.exists() else []
    return {r["index"]: r for r in records}, stderr


def test_readme_has_blocks():
    assert len(BLOCKS) > 20 and {b["lang"] for b in BLOCKS} == {"python", "bash"}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"line{b['line']}-{b['lang']}")
def test_readme_block_runs(block, results):
    records, stderr = results
    record = records.get(block["index"])
    assert record is not None, f"the runner never reached this block:\n{stderr[-4000:]}"
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    assert record["status"] == "ok", f"README.md line {block['line']}:\n{record.get('error')}\n{record['log']}"
