"""scripts/patching_example.py runs offline on random weights and writes its PNG heatmap."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO


@pytest.mark.slow
def test_patching_example_writes_a_png(tmp_path):
    spec = importlib.util.spec_from_file_location("patching_example", REPO / "scripts" / "patching_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "patching.png"
    module.main(["--n-layer", "1", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
