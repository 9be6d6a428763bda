"""float32 vs bfloat16 vs int8 generation, side by side in one process: speed and quality.

Variants (gpt2 architecture by default, random GPT-2-initialised weights: no download):

* ``float32``: the baseline.
* ``bfloat16``: params stored in bfloat16, run the way the library runs them on this backend
  (:func:`gpt2_jax.precision.compute_dtype`: float32 compute on the CPU, bfloat16 on GPU/TPU).
* ``int8``: :func:`gpt2_jax.precision.quantize_params` (per-channel scales), run the library's way (dequantized
  once to float32 on the CPU; int8 kernels converted inside each matmul on GPU/TPU).
* with ``--narrow`` (the default on the CPU, where the library's way differs): ``bfloat16 narrow`` and
  ``int8 in-program``, the same params with ``low_precision_compute`` forced on (what the CPU would do without
  the upcast), to show what the choice avoids.

Speed: prefill of ``[batch, prompt]`` random ids and greedy ``decode_step`` s, through the engine's jitted
``prefill`` / ``decode_step`` with each variant's weights prepared once (``decode_weights``). Every figure is a
median over ``--runs``; the variants alternate round by round (``--rounds``) so that all see the same load on a
shared machine, and each is reported as tokens/s and as a ratio to float32 of the same round.

Quality, against float32 on ``--quality-prompts`` random prompts (seeded): float32's greedy continuation of
``--quality-tokens`` tokens is fed back (teacher forcing) to every variant, which reports the max |logit - float32
logit| over those positions, that divided by float32's logit standard deviation, and top-1 agreement with
float32's greedy tokens; free-running greedy generation then reports how many leading tokens equal float32's.

    python benchmarks/bench_precision.py [--model gpt2] [--batch 1] [--prompt 128] [--new 32] [--runs 3]
        [--rounds 3] [--quality-tokens 64] [--no-narrow] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_seconds  # noqa: E402


def make_variants(params, narrow: bool) -> list[dict]:
    """Each variant: its label, stored params, the tuning overrides it runs under and its requested dtype."""
    from gpt2_jax.precision import quantize_params

    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    int8 = quantize_params(params)
    variants = [
        {"label": "float32", "stored": "float32", "params": params, "dtype": "float32", "overrides": {}},
        {"label": "bfloat16", "stored": "bfloat16", "params": bf16, "dtype": "bfloat16", "overrides": {}},
        {"label": "int8", "stored": "int8", "params": int8, "dtype": "float32", "overrides": {}},
    ]
    if narrow:  # the same stored weights with narrow compute forced on: timing only
        forced = {"low_precision_compute": True}
        variants += [
            {"label": "bfloat16 narrow", "stored": "bfloat16", "params": bf16, "dtype": "bfloat16",
             "overrides": forced, "timing_only": True},
            {"label": "int8 in-program", "stored": "int8", "params": int8, "dtype": "float32",
             "overrides": forced, "timing_only": True},
        ]
    return variants


def prepare(variant: dict) -> None:
    """Resolve the variant's tuning, compute dtype and prepared weights (once)."""
    from gpt2_jax import backend
    from gpt2_jax.generation.weight_layout import prepare_weights
    from gpt2_jax.precision import compute_dtype, quantized_bytes

    with backend.overrides(**variant["overrides"]):
        tuning = backend.tuning_for(variant["params"])
    variant["tuning"] = tuning
    variant["compute"] = compute_dtype(variant["dtype"], variant["params"], tuning)
    variant["weights"] = jax.block_until_ready(prepare_weights(variant["params"], tuning))
    variant["stored_bytes"] = quantized_bytes(variant["params"])
    variant["prepared_bytes"] = quantized_bytes(variant["weights"])


def speed_round(variant: dict, config, ids: np.ndarray, new: int, runs: int) -> dict:
    """Median prefill seconds and decode seconds per step of one variant."""
    from gpt2_jax import backend
    from gpt2_jax.generation import engine

    batch, prompt = ids.shape
    slots = engine.prompt_bucket(prompt) + engine.new_token_cap(new)
    weights, dtype = variant["weights"], variant["compute"]
    dev_ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones_like(dev_ids)
    argmax = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))
    with backend.overrides(**variant["overrides"]):
        def prefilled():
            cache = engine.init_cache(config, batch, slots, jnp.dtype(dtype))
            logits, cache = engine.prefill(weights, dev_ids, mask, cache, config=config, dtype=dtype)
            return jax.block_until_ready((argmax(logits), cache))

        def decode():
            tokens, cache = prefilled()
            start = time.perf_counter()
            for _ in range(new - 1):
                logits, cache = engine.decode_step(weights, tokens, cache, config=config, dtype=dtype)
                tokens = argmax(logits)
            jax.block_until_ready(tokens)
            return time.perf_counter() - start

        decode()  # compiles prefill and decode_step
        prefill_s = median_seconds(prefilled, runs)
        step_s = statistics.median(decode() for _ in range(runs)) / max(new - 1, 1)
    return {"prefill_s": prefill_s, "step_s": step_s}


def quality(variant: dict, reference: dict, config, prompts: np.ndarray, tokens: int) -> dict:
    """Teacher-forced logit error / top-1 agreement, and the free-running greedy prefix equal to float32's."""
    from gpt2_jax import backend
    from gpt2_jax.generation import generate
    from gpt2_jax.model import GPT2LMHeadModel

    def greedy(v):
        with backend.overrides(**v["overrides"]):
            out = generate(v["weights"], prompts, model_config=config, dtype=v["compute"], max_new_tokens=tokens,
                           do_sample=False, eos_token_id=())
        return np.asarray(out.sequences)[:, prompts.shape[1]:]

    def logits(v, seq):
        with backend.overrides(**v["overrides"]):
            model = GPT2LMHeadModel(config, dtype=jnp.dtype(v["compute"]))
            out = jax.jit(lambda w, s: model.apply(w.variables, s).logits)(v["weights"], seq)
        return np.asarray(out, np.float32)[:, prompts.shape[1] - 1:-1]  # the predictions of the tokens

    if "greedy" not in reference:
        reference["greedy"] = greedy(reference)
        reference["seq"] = np.concatenate([prompts, reference["greedy"]], axis=1)
        reference["logits"] = logits(reference, jnp.asarray(reference["seq"], jnp.int32))
    ref_logits = reference["logits"]
    got = logits(variant, jnp.asarray(reference["seq"], jnp.int32))
    err = np.abs(got - ref_logits)
    free = greedy(variant)
    same = free == reference["greedy"]
    prefix = np.where(same.all(axis=1), tokens, np.argmin(same, axis=1))
    return {
        "max_abs_logit_error": float(err.max()),
        "mean_abs_logit_error": float(err.mean()),
        "max_error_over_logit_std": float(err.max() / ref_logits.std()),
        "teacher_forced_top1_agreement": float((got.argmax(-1) == reference["greedy"]).mean()),
        "free_running_equal_prefix_mean": float(prefix.mean()),
        "free_running_equal_prefix_min": int(prefix.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="architecture (random weights), default gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32, help="decode steps per timed run (+1)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants")
    parser.add_argument("--quality-prompts", type=int, default=4)
    parser.add_argument("--quality-prompt-len", type=int, default=32)
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    narrow = parser.add_mutually_exclusive_group()
    narrow.add_argument("--narrow", dest="narrow", action="store_true", default=None,
                        help="also time bfloat16 / int8 with low_precision_compute forced on")
    narrow.add_argument("--no-narrow", dest="narrow", action="store_false")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from gpt2_jax import backend
    from gpt2_jax.inspect._cli import architecture, random_params
    from gpt2_jax.precision import precision_note

    config = architecture(args.model)
    params = random_params(config, args.seed)
    platform = backend.platform_of(params)
    with_narrow = args.narrow if args.narrow is not None else not backend.tuning_for(params).low_precision_compute
    variants = make_variants(params, with_narrow)
    for v in variants:
        prepare(v)
    rng = np.random.default_rng(args.seed + 1)
    ids = rng.integers(0, config.vocab_size, (args.batch, args.prompt))

    print(f"{args.model} ({platform}: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs), batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, {args.rounds} interleaved rounds x {args.runs} runs")
    for note in filter(None, (precision_note("bfloat16", platform=platform),
                              precision_note("float32", quantize="int8", platform=platform))):
        print(f"note: {note}")
    rounds = {v["label"]: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            rounds[v["label"]].append(speed_round(v, config, ids, args.new, args.runs))
            print(f"  round {r + 1} {v['label']:<16} prefill {args.batch * args.prompt / rounds[v['label']][-1]['prefill_s']:8.0f} "
                  f"tok/s  decode {args.batch / rounds[v['label']][-1]['step_s']:7.1f} tok/s", file=sys.stderr)

    results = []
    base = rounds["float32"]
    for v in variants:
        rs = rounds[v["label"]]
        prefill_ratio = statistics.median(b["prefill_s"] / x["prefill_s"] for x, b in zip(rs, base))
        decode_ratio = statistics.median(b["step_s"] / x["step_s"] for x, b in zip(rs, base))
        results.append({
            "variant": v["label"], "stored": v["stored"], "compute_dtype": v["compute"],
            "stored_mb": v["stored_bytes"] / 1e6, "prepared_mb": v["prepared_bytes"] / 1e6,
            "prefill_tok_s": args.batch * args.prompt / statistics.median(x["prefill_s"] for x in rs),
            "decode_tok_s": args.batch / statistics.median(x["step_s"] for x in rs),
            "prefill_vs_float32": prefill_ratio, "decode_vs_float32": decode_ratio,
        })

    qprompts = rng.integers(0, config.vocab_size, (args.quality_prompts, args.quality_prompt_len))
    reference = next(v for v in variants if v["label"] == "float32")
    for v, row in zip(variants, results):
        if v is not reference and not v.get("timing_only"):
            row["quality"] = quality(v, reference, config, qprompts, args.quality_tokens)
    header = (f"{'variant':<16} {'stored':>8} {'compute':>8} {'stored MB':>9} {'prefill tok/s':>13} {'x f32':>6} "
              f"{'decode tok/s':>12} {'x f32':>6}")
    print(header)
    for row in results:
        print(f"{row['variant']:<16} {row['stored']:>8} {row['compute_dtype']:>8} {row['stored_mb']:>9.0f} "
              f"{row['prefill_tok_s']:>13.0f} {row['prefill_vs_float32']:>6.2f} {row['decode_tok_s']:>12.1f} "
              f"{row['decode_vs_float32']:>6.2f}")
    print(f"quality vs float32 ({args.quality_prompts} random prompts of {args.quality_prompt_len} tokens, "
          f"{args.quality_tokens} greedy tokens):")
    for row in results:
        q = row.get("quality")
        if q:
            print(f"  {row['variant']:<10} max |logit err| {q['max_abs_logit_error']:.4f} "
                  f"({q['max_error_over_logit_std']:.3f} x logit std), mean {q['mean_abs_logit_error']:.5f}; "
                  f"teacher-forced top-1 agreement {q['teacher_forced_top1_agreement']:.1%}; free-running equal "
                  f"prefix mean {q['free_running_equal_prefix_mean']:.1f} / min {q['free_running_equal_prefix_min']}"
                  f" of {args.quality_tokens}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "platform": platform, "device": jax.devices()[0].device_kind,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
