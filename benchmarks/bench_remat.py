"""Peak memory and step time of a training step per remat policy (default: gpt2-medium, batch 4 x 512, float32).

Each policy runs in a fresh process (random-init weights, AdamW, no dropout): the compile time, the median step
time over ``--steps`` steps after the first, and the process's peak resident memory (``VmHWM``: params, optimizer
state, gradients and the activations the policy keeps). The ratios are to the ``none`` row of the same run.

    python benchmarks/bench_remat.py
    python benchmarks/bench_remat.py --model gpt2 --batch 4 --seq 256 --policies none full --scan-layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def peak_rss_gib() -> float:
    """This process's peak resident set (Linux ``VmHWM``) in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def measure(model: str, policy: str, batch: int, seq: int, steps: int, scan: bool) -> dict:
    import jax
    import numpy as np
    import optax

    sys.path.insert(0, os.path.dirname(__file__))
    from _timing import median_seconds
    from gpt2_jax import GPT2Config
    from gpt2_jax.model import init_params
    from gpt2_jax.training import TrainState, make_train_step

    config = GPT2Config.from_preset(model, scan_layers=scan)
    optimizer = optax.adamw(1e-4)
    state = TrainState.create(init_params(jax.random.PRNGKey(0), config), optimizer)
    step = make_train_step(config, optimizer, dropout=False, remat=policy)
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)), "int32")
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    state, metrics = step(state, tokens, key)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    holder = {"state": state}

    def one():
        holder["state"], m = step(holder["state"], tokens, key)
        jax.block_until_ready(m)

    seconds = median_seconds(one, steps)
    return {"policy": policy, "first_call_s": round(first, 1), "step_s": round(seconds, 2),
            "tokens_per_s": round(batch * seq / seconds, 1), "peak_gib": round(peak_rss_gib(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first (default 2)")
    parser.add_argument("--policies", nargs="+", default=["none", "full", "dots_saveable", "minimal"])
    parser.add_argument("--scan-layers", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.batch, args.seq, args.steps, args.scan_layers)))
        return
    print(f"{args.model}, batch {args.batch} x {args.seq}, float32, AdamW, "
          f"{'scan_layers' if args.scan_layers else 'unrolled'}; one fresh process per policy")
    print(f"{'policy':14s} {'peak GiB':>9s} {'step s':>7s} {'tok/s':>7s} {'first call s':>13s} {'mem/none':>9s} "
          f"{'time/none':>10s}")
    base = None
    for policy in args.policies:
        cmd = [sys.executable, __file__, "--child", policy, "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps)] + (["--scan-layers"] if args.scan_layers else [])
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            print(f"{policy:14s} failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        base = base or row
        print(f"{policy:14s} {row['peak_gib']:9.2f} {row['step_s']:7.2f} {row['tokens_per_s']:7.1f} "
              f"{row['first_call_s']:13.1f} {row['peak_gib'] / base['peak_gib']:9.2f} "
              f"{row['step_s'] / base['step_s']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
