"""Activation patching: gpt2-jax's one compiled call against TransformerLens's one-run-per-patch loop.

gpt2 (124M) random weights, a 16-token clean/corrupted pair, ``hook_resid_pre`` patched at every layer x position
(12 x 16 = 192 patched runs), metric = logit difference of two tokens at the last position. TransformerLens runs
``patching.get_act_patch_resid_pre`` on a ``TransformerBridge`` booted offline over the transformers model with
the same weights. Ours runs twice: with every position's logits (what the metric's signature allows) and with
``logits_to_keep=1`` (the metric reads the final position only: the LM head, a third of gpt2's FLOPs, runs once per
patched run instead of 16 times). Also: ``run_with_cache`` of every hook point vs a plain jitted forward, and a
hooked forward with no hook vs the plain one. Compile times are reported separately; figures are medians; the machine may be
shared, so read the within-run ratios (the load average is printed).

    python benchmarks/bench_patching.py --runs 3
    python benchmarks/bench_patching.py --n-layer 2 --runs 3    # gpt2 width, 2 layers: 32 patches, minutes
"""

from __future__ import annotations

from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpt2_jax.config import GPT2Config  # noqa: E402
from gpt2_jax.interp import activation_patching, hook_names, run_with_cache, run_with_hooks  # noqa: E402
from gpt2_jax.model import GPT2LMHeadModel, init_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's depth (a quicker run)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tl-runs", type=int, default=1, help="timed TransformerLens sweeps (each is 192 runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="lax.map chunk (default: one vmap)")
    args = parser.parse_args()

    import torch
    from transformer_lens import patching

    from hf_reference import hf_model
    from interp_helpers import boot_bridge

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"load average before: {os.getloadavg()}")
    config = GPT2Config.from_preset(args.preset)
    if args.n_layer:
        config = config.replace(n_layer=args.n_layer)
    params = init_params(jax.random.PRNGKey(0), config)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, config.vocab_size - 2, (1, args.seq)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[0, [3, 7]] = rng.integers(0, config.vocab_size - 2, 2)
    a, b = 11, 12
    metric = lambda logits: logits[0, -1, a] - logits[0, -1, b]

    # ours: one compiled call, with every position's logits and with the final position's only -------------------
    timings = {}
    for keep in (0, 1):
        run = lambda: jax.block_until_ready(activation_patching(params, config, clean, corrupted, metric,
                                                                name="hook_resid_pre", over="layer_pos",
                                                                batch_size=args.batch_size, logits_to_keep=keep))
        start = time.perf_counter()
        ours = run()
        first = time.perf_counter() - start
        ours_s = median_seconds(run, args.runs)
        timings[keep] = (first, ours_s, ours)
        what = "every position's logits" if keep == 0 else "logits_to_keep=1"
        print(f"gpt2-jax activation_patching ({what}): first call (compile + run) {first:.2f} s, compile "
              f"~{first - ours_s:.2f} s, run {ours_s:.2f} s (median of {args.runs})")

    # TransformerLens: one run per patch -------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model(params, config)
        start = time.perf_counter()
        bridge = boot_bridge(model, config, tmp)
        print(f"TransformerBridge boot: {time.perf_counter() - start:.2f} s")
        clean_t, corrupted_t = torch.from_numpy(clean.astype(np.int64)), torch.from_numpy(corrupted.astype(np.int64))
        with torch.no_grad():
            _, clean_cache = bridge.run_with_cache(clean_t)
            tl_metric = lambda logits: logits[0, -1, a] - logits[0, -1, b]
            tl_times = []
            for _ in range(args.tl_runs):
                start = time.perf_counter()
                theirs = patching.get_act_patch_resid_pre(bridge, corrupted_t, clean_cache, tl_metric)
                tl_times.append(time.perf_counter() - start)
    tl_s = float(np.median(tl_times))
    print(f"TransformerLens get_act_patch_resid_pre: {tl_s:.2f} s (median of {args.tl_runs})")
    for keep, (first, ours_s, ours) in timings.items():
        what = "every position's logits" if keep == 0 else "logits_to_keep=1"
        dev = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
        print(f"{what}: max |ours - TransformerLens| = {dev:.2e} over {ours.size} patches "
              f"({'OK' if dev <= 1e-4 else 'ABOVE'} 1e-4); speed-up {tl_s / ours_s:.1f}x without compile, "
              f"{tl_s / first:.1f}x with compile")

    # run_with_cache of every hook vs the plain forward ----------------------------------------------------------
    plain_model = GPT2LMHeadModel(config)
    plain = jax.jit(lambda p, x: plain_model.apply({"params": p}, x).logits)
    every = hook_names(config)
    timed = {
        "plain forward (jit)": lambda: jax.block_until_ready(plain(params, clean)),
        "run_with_hooks, no hook": lambda: jax.block_until_ready(run_with_hooks(params, config, clean)),
        f"run_with_cache, all {len(every)} hooks": lambda: jax.block_until_ready(
            run_with_cache(params, config, clean, names=every)),
    }
    results = {}
    for name, fn in timed.items():
        start = time.perf_counter()
        fn()
        compile_s = time.perf_counter() - start
        results[name] = median_seconds(fn, max(args.runs, 20))  # ~50 ms calls: many, for a stable median
        print(f"{name:38s} {results[name] * 1e3:8.1f} ms (first call {compile_s:.2f} s)")
    base = results["plain forward (jit)"]
    for name, value in results.items():
        print(f"  ratio to plain: {name:38s} {value / base:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
