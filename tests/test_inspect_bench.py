"""``gpt2-jax bench``: the JSON report validates against the documented schema (with our small validator, and with
``jsonschema`` where installed), the arithmetic behind MFU / MBU, the device table, and bad input."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from gpt2_jax.config import GPT2Config
from gpt2_jax.inspect import load_schema, lookup_device, validate_json
from gpt2_jax.inspect.bench import (
    SCHEMA_PATH, decode_step_flops, kv_cache_bytes, param_stats, prefill_flops, roofline_fraction,
)
from gpt2_jax.inspect.devices import resolve_peaks
from gpt2_jax.inspect.peaks import MeasuredPeaks, measure_peaks
from gpt2_jax.inspect._cli import random_params
from inspect_helpers import run_cli

TINY = {"vocab_size": 256, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0,
        "eos_token_id": 0}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def report(tiny_config, tmp_path_factory):
    """One real run of the command on the tiny architecture, with peaks given so utilisations are filled in."""
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("bench-out") / "report.json"
    try:
        code, stdout, err = run_cli(mp, "bench", "--model", str(tiny_config), "--batch", "2,1", "--prompt", "12",
                                    "--new", "6", "--runs", "2", "--peak-bandwidth", "40", "--peak-flops", "1.5",
                                    "--json", "--out", str(out))
    finally:
        mp.undo()
    assert code == 0, err
    document = json.loads(stdout)
    assert json.loads(out.read_text()) == document
    return document


def test_report_validates_against_the_schema(report):
    schema = load_schema()
    assert validate_json(report, schema) == []
    assert report["settings"]["batch_sizes"] == [1, 2]  # run in increasing order
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert report["settings"]["prompt_bucket"] == 16 and report["settings"]["cache_slots"] == 32


def test_report_figures_are_consistent(report):
    config = GPT2Config(**TINY)
    params, param_bytes, non_embedding = param_stats(random_params(config, abstract=True))
    assert report["model"]["params"] == params and report["model"]["param_bytes"] == param_bytes
    assert report["device"]["peak_bandwidth_source"] == "given" and report["device"]["peak_tflops"] == 1.5
    for r in report["results"]:
        b = r["batch"]
        prefill, decode = r["prefill"], r["decode"]
        assert prefill["tokens_per_s"] == pytest.approx(b * 12 / prefill["seconds"])
        assert prefill["flops"] == prefill_flops(config, non_embedding, b, 12)
        assert prefill["mfu"] == pytest.approx(prefill["flops"] / prefill["seconds"] / 1.5e12)
        assert decode["tokens_per_s"] == pytest.approx(b / decode["step_seconds"])
        assert decode["bytes_per_step"] == param_bytes + kv_cache_bytes(config, b, 32, "float32")
        assert decode["mbu"] == pytest.approx(decode["bytes_per_step"] / decode["step_seconds"] / 40e9)
        assert decode["flops_per_step"] == decode_step_flops(config, non_embedding, b, 32)
        floor = max(decode["bytes_per_step"] / 40e9, decode["flops_per_step"] / 1.5e12)
        assert decode["roofline_fraction"] == pytest.approx(floor / decode["step_seconds"])
        assert prefill["roofline_fraction"] == pytest.approx(
            max((param_bytes + kv_cache_bytes(config, b, 32, "float32")) / 40e9, prefill["flops"] / 1.5e12)
            / prefill["seconds"])
        assert r["generate"]["tokens_per_s"] == pytest.approx(b * 6 / r["generate"]["seconds"])
        # Both are a few ms for this tiny model, so their order is noise on a loaded machine (seen under xdist).
        assert 0 < r["time_to_first_token_s"] < 100 * r["generate"]["seconds"]
        assert r["peak_memory"]["bytes"] > 0 and r["peak_memory"]["source"] in ("device_memory_stats",
                                                                                 "process_max_rss")


def test_table_output_and_unknown_peaks(monkeypatch, tiny_config):
    code, out, err = run_cli(monkeypatch, "bench", "--model", str(tiny_config), "--batch", "1", "--prompt", "16",
                             "--new", "4", "--runs", "1", "--no-generate", "--no-measure-peaks")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["batch"])
    row = lines[header + 1].split()
    assert row[0] == "1"
    if "cpu" in lines[1]:
        assert "peak bandwidth of 'cpu' unknown" in out and "MFU is null" in out


def test_unknown_devices_get_measured_peaks(monkeypatch, tiny_config):
    """Without given peaks, a device missing from the table (every CPU) is measured: utilisations and the
    roofline fraction are filled in, and the report says where the peaks came from."""
    code, out, err = run_cli(monkeypatch, "bench", "--model", str(tiny_config), "--batch", "1", "--prompt", "8",
                             "--new", "3", "--runs", "1", "--no-generate", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert validate_json(report, load_schema()) == []
    device = report["device"]
    if device["known_as"] is not None:
        pytest.skip(f"{device['kind']} is in the known-devices table: nothing is measured")
    measured = device["measured_peaks"]
    assert device["peak_bandwidth_source"] == device["peak_tflops_source"] == "measured"
    assert device["peak_bandwidth_gbs"] == measured["bandwidth_gbs"] > 0
    assert device["peak_tflops"] == measured["tflops"]["float32"] > 0 and measured["tflops"]["bfloat16"] > 0
    result = report["results"][0]
    assert result["decode"]["mbu"] > 0 and result["prefill"]["mfu"] > 0
    assert result["decode"]["roofline_fraction"] > 0 and result["prefill"]["roofline_fraction"] > 0
    assert any("peaks measured in this run" in note for note in report["notes"])


def test_measured_peaks_are_plausible():
    """A small measurement: the sizes follow the rules (n doubles from 512; the whole array is read) and the rates
    are positive and finite."""
    peaks = measure_peaks(dtypes=("float32",), bandwidth_bytes=8 * 2**20)
    assert isinstance(peaks, MeasuredPeaks) and peaks.bandwidth_bytes == 8 * 2**20
    assert 0 < peaks.bandwidth_gbs < 1e5 and 0 < peaks.tflops["float32"] < 1e4
    n = peaks.gemm_n["float32"]
    assert n >= 512 and n & (n - 1) == 0 and n <= 8192
    resolved = resolve_peaks(SimpleNamespace(device_kind="cpu"), "float32", measured=peaks)
    assert resolved["bandwidth_source"] == resolved["tflops_source"] == "measured"
    assert resolve_peaks(SimpleNamespace(device_kind="cpu"), "float32", 38.0, measured=peaks)["bandwidth_source"] \
        == "given"
    assert resolve_peaks(SimpleNamespace(device_kind="cpu"), "float16", measured=peaks)["tflops"] is None


def test_roofline_arithmetic():
    config = GPT2Config.from_preset("gpt2")
    _, _, non_embedding = param_stats(random_params(config, abstract=True))
    # one row: weight matmuls 2 N, attention scores and weighted values over 256 slots 4 L d S, LM head 2 d V
    assert decode_step_flops(config, non_embedding, 1, 256) == 2 * non_embedding + 4 * 12 * 768 * 256 \
        + 2 * 768 * 50257
    assert decode_step_flops(config, non_embedding, 8, 256) == 8 * decode_step_flops(config, non_embedding, 1, 256)
    peaks = {"bandwidth_gbs": 20.0, "tflops": 0.2}
    assert roofline_fraction(0.05, 0.5e9, 0.2e9, peaks) == pytest.approx(0.025 / 0.05)  # bandwidth-bound
    assert roofline_fraction(0.05, 0.1e9, 4e9, peaks) == pytest.approx(0.02 / 0.05)  # FLOP-bound
    assert roofline_fraction(0.05, 0.5e9, 4e9, {"bandwidth_gbs": None, "tflops": 0.2}) == pytest.approx(0.4)
    assert roofline_fraction(0.05, 0.5e9, 4e9, {"bandwidth_gbs": None, "tflops": None}) is None


def test_validator_rejects_broken_reports(report):
    schema = load_schema()
    broken = copy.deepcopy(report)
    del broken["results"][0]["decode"]["tokens_per_s"]
    assert any("missing required property 'tokens_per_s'" in e for e in validate_json(broken, schema))
    broken = copy.deepcopy(report)
    broken["results"][1]["prefill"]["seconds"] = "fast"
    assert any("$.results[1].prefill.seconds: expected number" in e for e in validate_json(broken, schema))
    broken = copy.deepcopy(report)
    broken["device"]["surprise"] = 1
    assert any("unexpected property 'surprise'" in e for e in validate_json(broken, schema))
    broken = copy.deepcopy(report)
    broken["results"][0]["decode"]["step_seconds"] = 0.0
    assert any("must be greater than 0" in e for e in validate_json(broken, schema))
    broken = copy.deepcopy(report)
    broken["results"][0]["batch"] = True
    assert validate_json(broken, schema)
    broken = copy.deepcopy(report)
    broken["results"][0]["generate"] = {"seconds": 1.0}
    assert any("oneOf" in e for e in validate_json(broken, schema))
    broken = copy.deepcopy(report)
    broken["results"][0]["generate"] = None  # --no-generate
    assert validate_json(broken, schema) == []
    with pytest.raises(ValueError, match="unsupported keywords: pattern"):
        validate_json("x", {"type": "string", "pattern": "x"})


def test_schema_is_valid_for_jsonschema_too(report):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed; our validator checked it")
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(report, schema)


def test_schema_file_ships_in_the_package():
    assert SCHEMA_PATH.parent.name == "inspect" and SCHEMA_PATH.is_file()
    assert load_schema()["title"] == "gpt2-jax bench report"


def test_flops_and_bytes_arithmetic():
    config = GPT2Config.from_preset("gpt2")
    params, param_bytes, non_embedding = param_stats(random_params(config, abstract=True))
    assert params == 124_439_808 and param_bytes == 4 * params
    assert non_embedding == params - 50257 * 768 - 1024 * 768 == 85_056_000
    # one row of 128 tokens: 2 N T + 2 L d T (T + 1) + 2 d V
    assert prefill_flops(config, non_embedding, 1, 128) == 2 * 85_056_000 * 128 + 2 * 12 * 768 * 128 * 129 \
        + 2 * 768 * 50257
    assert prefill_flops(config, non_embedding, 8, 128) == 8 * prefill_flops(config, non_embedding, 1, 128)
    # 256 slots of keys and values, 12 layers, float32
    assert kv_cache_bytes(config, 8, 256, "float32") == 2 * 12 * 8 * 12 * 256 * 64 * 4
    assert kv_cache_bytes(config, 8, 256, "bfloat16") == kv_cache_bytes(config, 8, 256, "float32") // 2


@pytest.mark.parametrize("kind, name, gbs", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 3350),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 2000),
    ("NVIDIA H200", "NVIDIA H200 SXM", 4800),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB", 2039),
    ("TPU v4", "TPU v4", 1200),
    ("TPU v5 lite", "TPU v5e", 819),
])
def test_known_devices(kind, name, gbs):
    peaks = lookup_device(kind)
    assert peaks.name == name and peaks.bandwidth_gbs == gbs


def test_unknown_devices_and_given_peaks():
    assert lookup_device("cpu") is None
    assert lookup_device("NVIDIA GH200 480GB") is None  # not mistaken for an H200
    cpu = SimpleNamespace(device_kind="cpu")
    assert resolve_peaks(cpu, "float32") == {"known_as": None, "bandwidth_gbs": None, "bandwidth_source": None,
                                            "tflops": None, "tflops_source": None}
    given = resolve_peaks(cpu, "float32", 38.0, 2.0)
    assert (given["bandwidth_gbs"], given["bandwidth_source"], given["tflops"]) == (38.0, "given", 2.0)
    h100 = resolve_peaks(SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3"), "bfloat16")
    assert (h100["bandwidth_gbs"], h100["tflops"], h100["tflops_source"]) == (3350.0, 989.0, "table")


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "60", "--new", "8"], "exceeds the model's context of n_positions=64"),
    (["--batch", "1,x"], "--batch must be comma-separated positive integers"),
    (["--batch", "0"], "--batch must be comma-separated positive integers"),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--peak-bandwidth", "-3"], "--peak-bandwidth must be positive"),
])
def test_bad_input(monkeypatch, tiny_config, argv, message):
    code, out, err = run_cli(monkeypatch, "bench", "--model", str(tiny_config), *argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_bad_model_and_output(monkeypatch, tiny_config, tmp_path):
    code, _, err = run_cli(monkeypatch, "bench", "--model", "gpt5")
    assert code == 2 and "neither a preset" in err
    code, _, err = run_cli(monkeypatch, "bench", "--model", str(tiny_config), "--out", str(tmp_path))
    assert code == 2 and "it is a directory" in err
    code, out, err = run_cli(monkeypatch, "bench", "--print-schema")
    assert code == 0 and json.loads(out) == load_schema()
