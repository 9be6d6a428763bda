"""Benchmark GPT-2 inference on whatever JAX backend is present (CPU, GPU, TPU).

Measures the generation engine's own compiled programs (:mod:`gpt2_jax.generation.engine`): ``prefill`` of a
``[batch, prompt]`` prompt into a static KV cache of ``bucket + cap`` slots, then greedy ``decode_step`` s with the
cache donated, then the engine's whole ``generate`` loop (``lax.while_loop``). Every time is a median over
``runs`` runs after a first (compiling) call, synchronised with ``block_until_ready``; compile time is reported
separately (first call minus the median).

Figures per batch size:

* ``compile_s``: prefill, decode step and generate program (first call minus a steady call);
* ``prefill``: seconds, prompt tokens/s, model FLOPs and MFU; ``time_to_first_token_s``: host ids in -> first
  tokens back on the host (transfer + prefill + argmax + fetch);
* ``decode``: seconds per step (the mean step of a ``new - 1`` step greedy loop, median over runs), tokens/s
  (``batch / step``), bytes read per step, achieved GB/s and memory-bandwidth utilisation (MBU);
* ``generate``: the end-to-end ``generate`` call (prefill + ``new`` tokens) and its decode tokens/s
  (``batch * (new - 1) / (total - time to first token)``);
* ``peak_memory``: the device's peak bytes in use (``memory_stats``) or, where the backend has none (CPU), the
  process's peak resident set size; both are process-lifetime peaks, so batch sizes run in increasing order.

Model FLOPs of a prefill (``b`` rows of ``T`` real tokens, ``L`` layers, width ``d``, vocabulary ``V``,
``N`` = parameters outside ``wte``/``wpe``): ``b * (2 N T + 2 L d T (T + 1) + 2 d V)``: the weight matmuls of
every token, causal attention (scores and weighted values over the keys each query sees) and the LM head of the
last position (the engine computes only that one). MFU divides by the device's peak for the compute dtype.

Bytes per decode step: every parameter (the tied LM head reads all of ``wte``) plus the whole static KV cache
(``2 L b n_head slots head_dim`` elements), which the masked attention reads in full. MBU divides by the peak
bandwidth. Peaks come from ``--peak-bandwidth`` / ``--peak-flops``, else the table of known devices
(:mod:`gpt2_jax.inspect.devices`), else they are measured in the same run (:mod:`gpt2_jax.inspect.peaks`: the read
bandwidth of a large reduction and the float32 / bfloat16 matmul rate, a few seconds; every CPU), so the
utilisations are never null unless measuring is switched off.

Roofline: a program can go no faster than its bytes at the peak bandwidth nor its FLOPs at the peak matmul rate, so
``roofline_fraction = max(bytes / bandwidth, flops / peak_flops) / seconds`` (1.0 = at the roofline). A decode
step reads ``bytes_per_step`` and does ``b * (2 N + 4 L d slots + 2 d V)`` FLOPs (``N`` = parameters outside
``wte``/``wpe``; the masked attention scores and weights all ``slots``; the LM head over the vocabulary); a
prefill reads the weights once, writes the cache, and does the prefill FLOPs above.

Low precision: ``--dtype bfloat16`` stores the params in bfloat16 and computes the way generation does on the
backend (:func:`gpt2_jax.precision.compute_dtype`: float32 on the CPU, where XLA's bfloat16 matrix-vector products
are ~8x slower, bfloat16 on GPU/TPU); ``--quantize int8`` quantizes the weights (per-channel scales,
:func:`gpt2_jax.precision.quantize_params`). The report records both dtypes and a note saying what ran; bytes per
decode step count the weights as the programs read them (the prepared copy: float32 on the CPU).

The JSON report follows ``bench_schema.json`` (in this package, :data:`SCHEMA_PATH`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import GPT2Config
from ..generation import engine
from ..generation.weight_layout import decode_weights
from ._common import dtype_name, resolve_dtype
from .devices import resolve_peaks
from .peaks import measure_peaks as measure_device_peaks
from .. import backend
from ..precision import (
    QUANTIZATIONS, compute_dtype, is_quantized, params_are_quantized, precision_note, quantize_params,
)
from ..precision import params_dtype as precision_params_dtype

SCHEMA_PATH = Path(__file__).with_name("bench_schema.json")
SCHEMA_VERSION = 1


def load_schema() -> dict:
    """The JSON Schema of :meth:`BenchReport.to_dict` (``bench_schema.json``)."""
    try:
        return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except OSError as e:
        raise OSError(f"the bench JSON schema is missing from the installed package ({SCHEMA_PATH}): {e}") from e


# Model arithmetic ----------------------------------------------------------------------------------------------
def param_stats(params: Any) -> tuple[int, int, int]:
    """``(parameters, bytes, parameters outside wte/wpe)`` of a params pytree (arrays or shape structs; an int8
    :class:`~gpt2_jax.precision.QuantizedArray` counts its weights once and its bytes as stored, scales included)."""
    total = total_bytes = embeddings = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        n = math.prod(leaf.shape)
        total += n
        parts = (leaf.q, leaf.scale) if is_quantized(leaf) else (leaf,)
        total_bytes += sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in parts)
        if str(getattr(path[0], "key", path[0])) in ("wte", "wpe"):
            embeddings += n
    return total, total_bytes, total - embeddings


def prefill_flops(config: GPT2Config, non_embedding_params: int, batch: int, prompt: int) -> float:
    """Model FLOPs of prefilling ``batch`` prompts of ``prompt`` tokens (see the module docstring)."""
    d, L, V, T = config.n_embd, config.n_layer, config.vocab_size, prompt
    return float(batch) * (2.0 * non_embedding_params * T + 2.0 * L * d * T * (T + 1) + 2.0 * d * V)


def decode_step_flops(config: GPT2Config, non_embedding_params: int, batch: int, slots: int) -> float:
    """FLOPs of one decode step of ``batch`` rows over a cache of ``slots`` slots (see the module docstring)."""
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    return float(batch) * (2.0 * non_embedding_params + 4.0 * L * d * slots + 2.0 * d * V)


def roofline_fraction(seconds: float, n_bytes: float, flops: float, peaks: dict) -> float | None:
    """``max(bytes / bandwidth, flops / peak FLOP/s) / seconds``: 1.0 is the roofline; a term whose peak is
    unknown is left out; None when both are."""
    floors = []
    if peaks["bandwidth_gbs"]:
        floors.append(n_bytes / (peaks["bandwidth_gbs"] * 1e9))
    if peaks["tflops"]:
        floors.append(flops / (peaks["tflops"] * 1e12))
    return max(floors) / seconds if floors else None


def kv_cache_bytes(config: GPT2Config, batch: int, slots: int, dtype: Any) -> int:
    """Bytes of a KV cache of ``slots`` slots: keys and values of every layer."""
    return 2 * config.n_layer * batch * config.n_head * slots * config.head_dim * np.dtype(dtype).itemsize


# Timing --------------------------------------------------------------------------------------------------------
def _median_time(fn: Callable[[], Any], runs: int, setup: Callable[[], Any] | None = None) -> float:
    """Median wall seconds of ``fn(setup())`` (or ``fn()``) over ``runs`` runs; the setup is not timed. ``fn``
    must block until its results are ready."""
    times = []
    for _ in range(runs):
        arg = setup() if setup is not None else None
        start = time.perf_counter()
        fn(arg) if setup is not None else fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory(device: Any) -> dict[str, Any]:
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"bytes": int(stats["peak_bytes_in_use"]), "source": "device_memory_stats"}
    if sys.platform.startswith("linux") or sys.platform == "darwin":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"bytes": int(rss * (1 if sys.platform == "darwin" else 1024)), "source": "process_max_rss"}
    return {"bytes": None, "source": None}


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """The benchmark's results; :meth:`to_dict` is the JSON document described by ``bench_schema.json``."""

    model: dict[str, Any]
    device: dict[str, Any]
    settings: dict[str, Any]
    results: list[dict[str, Any]]
    notes: list[str]
    timestamp: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (``schema_version``, ``tool``, ``timestamp``, ``model``, ``device``,
        ``settings``, ``results``, ``notes``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "gpt2-jax bench",
            "timestamp": self.timestamp,
            "model": self.model,
            "device": self.device,
            "settings": self.settings,
            "results": self.results,
            "notes": self.notes,
        }


def _bench_batch(params, config: GPT2Config, dtype: str, batch: int, prompt: int, new: int, runs: int,
                 with_generate: bool, peaks: dict, n_params: int, n_bytes: int, non_embedding: int,
                 rng: np.random.Generator, device: Any) -> dict[str, Any]:
    """Every figure for one batch size (see the module docstring)."""
    ids = rng.integers(0, config.vocab_size, (batch, prompt), dtype=np.int64)
    prepared = engine.prepare_prompts(
        ids, None, vocab_size=config.vocab_size, n_positions=config.n_positions, max_new_tokens=new,
        bos_id=config.bos_token_id, pad_id=0,
    )
    slots = prepared.bucket + engine.new_token_cap(new)
    host_ids, host_mask = prepared.input_ids, prepared.attention_mask  # [batch, bucket]
    dev_ids, dev_mask = jnp.asarray(host_ids), jnp.asarray(host_mask)  # placed as the engine places host arrays
    cache_dtype = jnp.dtype(dtype)
    argmax = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))

    def fresh_cache():
        return jax.block_until_ready(engine.init_cache(config, batch, slots, cache_dtype))

    def prefill(cache):
        return jax.block_until_ready(engine.prefill(params, dev_ids, dev_mask, cache, config=config, dtype=dtype))

    # Prefill: the first call compiles.
    cache = fresh_cache()
    start = time.perf_counter()
    logits, cache = prefill(cache)
    first_prefill = time.perf_counter() - start
    jax.block_until_ready(argmax(logits))
    del logits, cache  # hold one cache at a time
    prefill_s = _median_time(prefill, runs, fresh_cache)

    def first_token(cache):  # host ids in -> first tokens on the host
        logits, cache = engine.prefill(params, host_ids, host_mask, cache, config=config, dtype=dtype)
        return np.asarray(argmax(logits))

    first_token(fresh_cache())  # warm-up: host inputs may take another executable than device-resident ones
    ttft_s = _median_time(first_token, runs, fresh_cache)

    # Decode: greedy steps from a prefilled cache; the first step compiles.
    def prefilled():
        logits, cache = prefill(fresh_cache())
        return jax.block_until_ready((argmax(logits), cache))

    tokens, cache = prefilled()
    start = time.perf_counter()
    logits, cache = engine.decode_step(params, tokens, cache, config=config, dtype=dtype)
    tokens = jax.block_until_ready(argmax(logits))
    first_step = time.perf_counter() - start
    del cache
    steps = max(new - 1, 1)

    def decode_loop(state):
        tokens, cache = state
        for _ in range(steps):
            logits, cache = engine.decode_step(params, tokens, cache, config=config, dtype=dtype)
            tokens = argmax(logits)
        jax.block_until_ready(tokens)

    step_s = _median_time(decode_loop, runs, prefilled) / steps
    compile_s = {"prefill": max(first_prefill - prefill_s, 0.0), "decode_step": max(first_step - step_s, 0.0),
                 "generate": None}

    generate = None
    if with_generate:
        from ..generation.sampler import generate as engine_generate

        def run_generate():
            out = engine_generate(params, host_ids, host_mask, model_config=config, dtype=dtype,
                                  max_new_tokens=new, do_sample=False, eos_token_id=())
            return out.sequences

        start = time.perf_counter()
        sequences = run_generate()
        first_generate = time.perf_counter() - start
        if sequences.shape[1] != prompt + new:
            raise RuntimeError(f"generate returned {sequences.shape[1] - prompt} new tokens, expected {new}")
        total_s = _median_time(run_generate, runs)
        compile_s["generate"] = max(first_generate - total_s, 0.0)
        decode_part = total_s - ttft_s
        generate = {
            "seconds": total_s,
            "tokens_per_s": batch * new / total_s,
            "decode_tokens_per_s": batch * (new - 1) / decode_part if new > 1 and decode_part > 0 else None,
        }

    flops = prefill_flops(config, non_embedding, batch, prompt)
    cache_bytes = kv_cache_bytes(config, batch, slots, cache_dtype)
    step_bytes = n_bytes + cache_bytes
    step_flops = decode_step_flops(config, non_embedding, batch, slots)
    achieved_gbs = step_bytes / step_s / 1e9
    return {
        "batch": batch,
        "compile_s": compile_s,
        "prefill": {
            "seconds": prefill_s,
            "tokens_per_s": batch * prompt / prefill_s,
            "flops": flops,
            "tflops_per_s": flops / prefill_s / 1e12,
            "mfu": flops / prefill_s / (peaks["tflops"] * 1e12) if peaks["tflops"] else None,
            "roofline_fraction": roofline_fraction(prefill_s, n_bytes + cache_bytes, flops, peaks),
        },
        "time_to_first_token_s": ttft_s,
        "decode": {
            "step_seconds": step_s,
            "tokens_per_s": batch / step_s,
            "bytes_per_step": step_bytes,
            "bandwidth_gbs": achieved_gbs,
            "mbu": achieved_gbs / peaks["bandwidth_gbs"] if peaks["bandwidth_gbs"] else None,
            "flops_per_step": step_flops,
            "roofline_fraction": roofline_fraction(step_s, step_bytes, step_flops, peaks),
        },
        "generate": generate,
        "peak_memory": _peak_memory(device),
    }


def run_benchmark(
    params: Any,
    config: GPT2Config,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    prompt: int = 128,
    new: int = 128,
    dtype: Any = None,
    quantize: str | None = None,
    runs: int = 3,
    generate: bool = True,
    peak_bandwidth_gbs: float | None = None,
    peak_tflops: float | None = None,
    measure_peaks: bool = True,
    model_name: str = "",
    source: str = "",
    seed: int = 0,
    progress: bool = True,
    consume_params: bool = False,
) -> BenchReport:
    """Benchmark prefill, decode and generate of ``params`` at every batch size (see the module docstring).

    Args:
        params: GPT-2 params (random or loaded), already in the dtype to benchmark (and quantized, for
            ``quantize``).
        config: their architecture.
        batch_sizes: batch sizes, run in increasing order.
        prompt: prompt tokens per row (random ids); ``prompt + new`` must fit ``n_positions``.
        new: tokens generated per row (greedy, never stopping early).
        dtype: requested dtype (default: the params' dtype); it computes in
            :func:`~gpt2_jax.precision.compute_dtype` of it (float32 for bfloat16 on the CPU).
        quantize: ``"int8"`` to quantize ``params`` here (:func:`~gpt2_jax.precision.quantize_params`) unless
            they already are; None: as given.
        runs: timed runs per figure (the median is reported), after one compiling call.
        generate: also time the engine's whole ``generate`` call.
        peak_bandwidth_gbs, peak_tflops: the device's peaks (default: looked up for known devices).
        measure_peaks: measure the peaks that are neither given nor known (:mod:`gpt2_jax.inspect.peaks`, a few
            seconds), so MBU, MFU and the roofline fractions are filled in.
        model_name, source: recorded in the report.
        seed: seed of the random prompts.
        progress: a progress bar on stderr.
        consume_params: the caller hands ``params`` over: each array that gets a prepared copy (the CPU's
            transposed kernels) is freed as its copy is made, so the run holds one copy of the weights, as
            ``gpt2-jax bench`` does; ``params`` must not be used afterwards.

    Returns:
        a :class:`BenchReport`.
    """
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if prompt < 1 or new < 1:
        raise ValueError(f"prompt and new tokens must be at least 1, got prompt={prompt}, new={new}")
    if prompt + new > config.n_positions:
        raise ValueError(f"prompt ({prompt}) + new tokens ({new}) = {prompt + new} exceeds the model's context of "
                         f"n_positions={config.n_positions}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if quantize is not None:
        _check_quantize(quantize)
        if not params_are_quantized(params):
            params = quantize_params(params, quantize)
    elif params_are_quantized(params):
        quantize = "int8"
    stored = dtype_name(resolve_dtype(dtype)) if dtype is not None else precision_params_dtype(params)
    tuning = backend.tuning_for(params)
    dtype = compute_dtype(stored, params, tuning)  # what the programs compute in
    n_params, stored_bytes, non_embedding = param_stats(params)
    params_platform = backend.platform_of(params)
    device = jax.devices()[0]
    peaks = resolve_peaks(device, dtype, peak_bandwidth_gbs, peak_tflops)
    measured = None
    if measure_peaks and (peaks["bandwidth_gbs"] is None or peaks["tflops"] is None):
        measured = measure_device_peaks(device)
        peaks = resolve_peaks(device, dtype, peak_bandwidth_gbs, peak_tflops, measured=measured)
    from tqdm.auto import tqdm

    # The weights' layout depends on the rows of a decode step (kernels transposed for one row on the CPU): one
    # prepared copy per layout, the untransposed group first so that a consumed (original-freeing) copy comes last.
    groups: dict[bool, list[int]] = {}
    for batch in batch_sizes:
        groups.setdefault(tuning.kernels_transposed_for(batch), []).append(batch)
    by_batch = {}
    with tqdm(total=len(batch_sizes), desc="bench", unit="batch size", disable=not progress, file=sys.stderr) as bar:
        for i, (_, batches) in enumerate(sorted(groups.items())):
            last = i == len(groups) - 1
            weights = jax.block_until_ready(
                decode_weights(params, tuning=tuning, rows=batches[0], consume=consume_params and last))
            _, n_bytes, _ = param_stats(weights)  # bytes a decode step reads: the prepared weights
            for batch in batches:
                by_batch[batch] = _bench_batch(weights, config, dtype, batch, prompt, new, runs, generate, peaks,
                                               n_params, n_bytes, non_embedding,
                                               np.random.default_rng([seed, batch]), device)
                bar.update(1)
            del weights
    results = [by_batch[batch] for batch in batch_sizes]
    notes = []
    note = precision_note(stored, tuning, quantize, params_platform)
    if note:
        notes.append(note)
    if results and results[0]["peak_memory"]["source"] == "process_max_rss":
        notes.append("peak_memory is the process's peak resident set size: this backend reports no device memory "
                     "statistics")
    if peaks["bandwidth_gbs"] is None:
        notes.append(f"peak bandwidth of {device.device_kind!r} unknown: decode MBU is null (pass --peak-bandwidth, "
                     "or let the bench measure it)")
    if peaks["tflops"] is None:
        notes.append(f"peak FLOP/s of {device.device_kind!r} at {dtype} unknown: prefill MFU is null "
                     "(pass --peak-flops, or let the bench measure it)")
    if measured is not None:
        notes.append(f"peaks measured in this run ({measured.seconds:.1f} s): a {measured.bandwidth_bytes / 2**20:.0f} "
                     "MiB reduction and square matmuls, what XLA reaches on this device, not its datasheet")
    bucket = engine.prompt_bucket(prompt)
    if bucket != prompt:
        notes.append(f"the engine pads prompts of {prompt} tokens to {bucket} slots; prefill figures count the "
                     f"{prompt} real tokens")
    return BenchReport(
        model={"name": model_name, "source": source, "params": n_params, "param_bytes": stored_bytes,
               "non_embedding_params": non_embedding, "dtype": stored, "compute_dtype": dtype,
               "quantize": quantize, "prepared_bytes": n_bytes,
               "config": {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                          "n_positions": config.n_positions, "vocab_size": config.vocab_size,
                          "n_inner": config.inner_dim}},
        device={"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                "backend": jax.default_backend(), "jax_version": jax.__version__, "host": platform.node(),
                "cpu_count": os.cpu_count(), "known_as": peaks["known_as"],
                "peak_bandwidth_gbs": peaks["bandwidth_gbs"], "peak_bandwidth_source": peaks["bandwidth_source"],
                "peak_tflops": peaks["tflops"], "peak_tflops_source": peaks["tflops_source"],
                "measured_peaks": measured.to_dict() if measured is not None else None},
        settings={"batch_sizes": batch_sizes, "prompt_tokens": prompt, "new_tokens": new, "prompt_bucket": bucket,
                  "cache_slots": bucket + engine.new_token_cap(new), "runs": runs, "greedy": True,
                  "generate": bool(generate), "seed": seed},
        results=results,
        notes=notes,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _precision_label(model: dict) -> str:
    """``float32``, ``bfloat16 (computed in float32)``, ``int8 (computed in float32)``..."""
    stored = model.get("quantize") or model["dtype"]
    compute = model.get("compute_dtype", model["dtype"])
    return stored if compute == stored else f"{stored} weights, computed in {compute}"


def format_bench_report(report: BenchReport) -> str:
    """A plain-text table of a report: one row per batch size, then the notes."""
    m, d, s = report.model, report.device, report.settings
    peak = []
    if d["peak_bandwidth_gbs"]:
        peak.append(f"{d['peak_bandwidth_gbs']:.0f} GB/s ({d['peak_bandwidth_source']})")
    if d["peak_tflops"]:
        peak.append(f"{d['peak_tflops']:.1f} TFLOP/s ({d['peak_tflops_source']})")
    lines = [
        f"model: {m['name'] or m['source']} ({m['params'] / 1e6:.1f}M params, {_precision_label(m)}, {m['source']})",
        f"device: {d['kind']} x{d['count']} ({d['backend']}, jax {d['jax_version']})"
        + (f"; peaks {', '.join(peak)}" if peak else "; peaks unknown"),
        f"prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens (greedy), {s['cache_slots']} cache slots, "
        f"median of {s['runs']} runs",
        "",
    ]
    header = (f"{'batch':>5} {'compile s':>10} {'TTFT ms':>8} {'prefill tok/s':>13} {'MFU':>6} "
              f"{'decode tok/s':>12} {'step ms':>8} {'GB/s':>7} {'MBU':>6} {'roofline':>8} {'generate tok/s':>14} "
              f"{'peak mem':>9}")
    lines.append(header)
    for r in report.results:
        compile_total = sum(v for v in r["compile_s"].values() if v is not None)
        gen = r["generate"]
        mem = r["peak_memory"]["bytes"]
        lines.append(
            f"{r['batch']:>5} {compile_total:>10.2f} {r['time_to_first_token_s'] * 1e3:>8.1f} "
            f"{r['prefill']['tokens_per_s']:>13.0f} {_fmt(r['prefill']['mfu'], '.1%'):>6} "
            f"{r['decode']['tokens_per_s']:>12.1f} {r['decode']['step_seconds'] * 1e3:>8.2f} "
            f"{r['decode']['bandwidth_gbs']:>7.1f} {_fmt(r['decode']['mbu'], '.1%'):>6} "
            f"{_fmt(r['decode']['roofline_fraction'], '.1%'):>8} "
            f"{_fmt(gen and gen['tokens_per_s'], '.1f'):>14} "
            f"{'-' if mem is None else f'{mem / 2**30:.2f} GiB':>9}"
        )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


# CLI -----------------------------------------------------------------------------------------------------------
def _check_quantize(scheme: Any) -> None:
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {scheme!r}")


def _batch_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--batch must be comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch must be comma-separated positive integers, got {text!r}")
    return sizes


def register(subparsers) -> None:
    """``gpt2-jax bench --model ... --dtype ... --batch 1,8,32 --prompt 128 --new 128 [--json]``."""
    parser = subparsers.add_parser(
        "bench", help="prefill / decode / generate throughput, compile time, memory, MBU and MFU",
        description="Benchmark GPT-2 inference with the generation engine on the JAX backend present. Random "
                    "weights (offline) unless --weights is given.",
    )
    parser.add_argument("--model", default=None,
                        help="architecture: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a config.json or a directory "
                             "holding one (default gpt2, or the architecture of --weights)")
    parser.add_argument("--weights", default=None,
                        help="benchmark these weights instead of random ones (a checkpoint directory or hub id; a "
                             "hub id needs the network once)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights with the architecture of --model (the default without --weights; "
                             "accepted for symmetry with the other commands)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="params dtype (default float32); computed in it on GPU/TPU, in float32 on the CPU "
                             "(XLA CPU's bfloat16 matrix-vector products are ~8x slower)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="int8 weight-only quantization with per-channel scales (on the CPU dequantized once to "
                             "float32: a storage saving, float32 speed)")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (default 128)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row (default 128)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure, median reported (default 3)")
    parser.add_argument("--no-generate", action="store_true", help="skip the end-to-end generate measurement")
    parser.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s",
                        help="the device's peak memory bandwidth (default: known devices' table)")
    parser.add_argument("--peak-flops", type=float, default=None, metavar="TFLOP/s",
                        help="the device's peak matmul TFLOP/s at --dtype (default: known devices' table)")
    parser.add_argument("--no-measure-peaks", action="store_true",
                        help="do not measure the peaks of a device missing from the known-devices table (then MBU, "
                             "MFU and the roofline fraction are null unless --peak-bandwidth / --peak-flops are given)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--json", action="store_true", help="print the JSON report (schema: bench_schema.json)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--print-schema", action="store_true", help="print the JSON Schema of the report and exit")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run ``gpt2-jax bench``."""
    from ..atomic import atomic_write_path
    from ._cli import architecture, random_params
    from ._common import check_output_path

    if args.print_schema:
        print(json.dumps(load_schema(), indent=2))
        return 0
    batch_sizes = _batch_list(args.batch)
    for name in ("prompt", "new", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("peak_bandwidth", "peak_flops"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.out:
        check_output_path(args.out, "JSON report")
    if getattr(args, "random_weights", False) and args.weights is not None:
        raise ValueError("--random-weights and --weights exclude each other")
    dtype = resolve_dtype(args.dtype)
    config = architecture(args.model or "gpt2") if args.weights is None or args.model else None
    if config is not None and args.prompt + args.new > config.n_positions:
        raise ValueError(f"--prompt {args.prompt} + --new {args.new} = {args.prompt + args.new} exceeds the "
                         f"model's context of n_positions={config.n_positions}")
    if args.weights is not None:
        from ..checkpoints.pretrained import from_pretrained

        loaded = from_pretrained(args.weights, dtype=dtype)
        if config is not None and config != loaded.config:
            raise ValueError(f"--model {args.model!r} and the architecture of --weights {args.weights!r} differ; "
                             "give only --weights")
        config, params, source = loaded.config, loaded.params, str(loaded.source)
        name = args.model or args.weights
    else:
        params = random_params(config, args.seed, dtype)
        source = f"random weights (seed {args.seed})"
        if not args.json:
            from ..checkpoints.random_weights import random_weights_note

            print(f"note: {random_weights_note(source)} (speed does not depend on the weights' values)",
                  file=sys.stderr)
        name = args.model or "gpt2"
    quantize = getattr(args, "quantize", None)
    if quantize is not None:
        _check_quantize(quantize)
    report = run_benchmark(
        params, config, batch_sizes=batch_sizes, prompt=args.prompt, new=args.new, dtype=dtype, quantize=quantize,
        runs=args.runs,
        generate=not args.no_generate, peak_bandwidth_gbs=args.peak_bandwidth, peak_tflops=args.peak_flops,
        measure_peaks=not args.no_measure_peaks,
        model_name=name, source=source, seed=args.seed, progress=not args.json, consume_params=True,
    )
    document = json.dumps(report.to_dict(), indent=1)
    if args.out:
        with atomic_write_path(args.out) as tmp:
            tmp.write_text(document + "\n", encoding="utf-8")
    print(document if args.json else format_bench_report(report))
    return 0
