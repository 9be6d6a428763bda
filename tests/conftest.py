"""Shared test setup: tests/ on sys.path for the reference helpers, float32 everywhere, shared-data paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VECTORS = SHARED / "testdata" / "gpt2_vectors.json"
