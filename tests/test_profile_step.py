"""benchmarks/profile_step.py: the HLO instruction table, the wall-time partition, and a run on a tiny model."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"


@pytest.fixture(scope="module")
def profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


HLO = """HloModule m

%fused_dot (p0: bf16[4,8], p1: bf16[8,2]) -> f32[4,2] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0.1: f32[4,2]) -> f32[4,2] {
  %p0.1 = f32[4,2]{1,0} parameter(0)
  ROOT %a = f32[4,2]{1,0} add(%p0.1, %p0.1)
}

ENTRY %main (x: bf16[4,8], w: bf16[8,2], y: f32[2,3]) -> f32[4,3] {
  %x = bf16[4,8]{1,0} parameter(0)
  %w = bf16[8,2]{1,0} parameter(1)
  %y = f32[2,3]{1,0} parameter(2)
  %ynn_fusion.3 = f32[4,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %add_fusion.12 = f32[4,2]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_add
  ROOT %dot.7 = f32[4,3]{1,0} dot(%add_fusion.12, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_instruction_table_finds_fused_and_plain_dots(profile_step):
    table = profile_step.instruction_table(HLO)
    assert table["ynn_fusion.3"].is_dot and table["ynn_fusion.3"].operand_dtypes == "bf16,bf16"
    assert table["dot.7"].is_dot and table["dot.7"].operand_dtypes == "f32,f32"
    assert not table["add_fusion.12"].is_dot and table["add_fusion.12"].kind == "add_fusion"
    assert table["add_fusion.12"].shape == "f32[4,2]{1,0}"


def test_partition_and_other_only_attribution(profile_step):
    table = profile_step.instruction_table(HLO)
    ms = 1_000_000
    # dot 0-10 ms; add 5-20 ms; a second dot 12-14 ms runs beside the add; nothing 20-25; add again 25-30.
    events = [(0, 10 * ms, "ynn_fusion.3"), (5 * ms, 20 * ms, "add_fusion.12"), (12 * ms, 14 * ms, "dot.7"),
              (25 * ms, 30 * ms, "add_fusion.12")]
    partition, groups = profile_step.summarize(events, table)
    assert partition["dots only"] == pytest.approx(0.005)
    assert partition["dots + other"] == pytest.approx(0.005 + 0.002)
    assert partition["other only"] == pytest.approx(0.002 + 0.006 + 0.005)
    assert partition["idle"] == pytest.approx(0.005)
    add = groups[("add_fusion", "f32[4,2]")]
    assert add.count == 2 and add.thunk_s == pytest.approx(0.020) and add.other_only_s == pytest.approx(0.013)
    assert groups[("dot(bf16,bf16)", "f32[4,2]")].other_only_s == 0.0
    assert groups[("dot(f32,f32)", "f32[4,3]")].thunk_s == pytest.approx(0.002)


def test_profiles_a_tiny_train_step(profile_step, capsys):
    profile_step.main(["train", "--layers", "1", "--embd", "32", "--heads", "2", "--vocab", "64", "--batch", "2",
                       "--seq", "8", "--warmup", "1", "--top", "3"])
    out = capsys.readouterr().out
    assert "train step gpt2 2 x 8 float32: traced call" in out
    for part in ("dots only", "dots + other", "other only", "idle"):
        assert part in out
    dots = out.split("dots:\n")[1].split("other work:")[0]
    assert "dot(f32,f32) f32[" in dots  # the traced thunks were matched to the step's dot instructions
