"""Cold compile time, unrolled vs ``scan_layers``: generation's prefill and decode programs and a train step.

Each program is lowered and compiled ahead of time from abstract shapes (``jax.ShapeDtypeStruct``: no weights in
memory, so gpt2-xl fits anywhere) in a fresh subprocess with no persistent compilation cache, so every figure is a
true cold compile (tracing + lowering + XLA). Prints one row per (model, layout) and the scan/unrolled ratios.

    python benchmarks/bench_compile.py                       # gpt2 and gpt2-xl
    python benchmarks/bench_compile.py --models gpt2 --batch 8 --prompt 128 --train-seq 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(model: str, scan: bool, batch: int, prompt: int, new: int, train_batch: int, train_seq: int) -> dict:
    """Compile times (seconds) of prefill, decode_step and a train step, in this process."""
    import jax
    import jax.numpy as jnp
    import optax

    from gpt2_jax import GPT2Config, KVCache, backend
    from gpt2_jax.generation import engine
    from gpt2_jax.generation.weight_layout import decode_weights
    from gpt2_jax.model import init_params
    from gpt2_jax.training import TrainState, make_train_step

    config = GPT2Config.from_preset(model, scan_layers=scan)
    params = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config))
    tuning = backend.tuning_for(platform=jax.default_backend())
    weights = jax.eval_shape(decode_weights, params)
    slots = engine.prompt_bucket(prompt) + engine.new_token_cap(new)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, slots))
    ids = jax.ShapeDtypeStruct((batch, engine.prompt_bucket(prompt)), jnp.int32)
    static = dict(config=config, dtype="float32", tuning=tuning)
    out = {"model": model, "scan_layers": scan}

    def timed(lower):
        start = time.perf_counter()
        lower().compile()
        return round(time.perf_counter() - start, 2)

    out["prefill_s"] = timed(lambda: engine._prefill.lower(weights, ids, ids, cache, **static))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    out["decode_step_s"] = timed(lambda: engine._decode_step.lower(weights, tokens, cache, **static))
    optimizer = optax.adamw(1e-4)
    state = jax.eval_shape(lambda: TrainState.create(init_params(jax.random.PRNGKey(0), config), optimizer))
    step = make_train_step(config, optimizer, dropout=False, tuning=tuning)
    batch_tokens = jax.ShapeDtypeStruct((train_batch, train_seq + 1), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    out["train_step_s"] = timed(lambda: step.lower(state, batch_tokens, key))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-xl"])
    parser.add_argument("--batch", type=int, default=1, help="generation batch (default 1)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length (bucketed; default 128)")
    parser.add_argument("--new", type=int, default=128, help="new tokens (cache cap; default 128)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, scan = args.child.split(":")
        print(json.dumps(measure(model, scan == "1", args.batch, args.prompt, args.new, args.train_batch,
                                 args.train_seq)))
        return
    import jax

    print(f"backend {jax.default_backend()}; cold AOT compiles in fresh processes; batch {args.batch}, prompt "
          f"{args.prompt}, new {args.new}; train step {args.train_batch} x {args.train_seq}")
    print(f"{'model':10s} {'layout':9s} {'prefill s':>10s} {'decode s':>9s} {'train s':>8s}")
    rows = {}
    for model in args.models:
        for scan in (False, True):
            cmd = [sys.executable, __file__, "--child", f"{model}:{int(scan)}", "--batch", str(args.batch),
                   "--prompt", str(args.prompt), "--new", str(args.new), "--train-batch", str(args.train_batch),
                   "--train-seq", str(args.train_seq)]
            env = {**__import__("os").environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows[(model, scan)] = row
            print(f"{model:10s} {'scan' if scan else 'unrolled':9s} {row['prefill_s']:10.2f} "
                  f"{row['decode_step_s']:9.2f} {row['train_step_s']:8.2f}", flush=True)
        plain, scanned = rows[(model, False)], rows[(model, True)]
        ratios = {k: plain[k] / max(scanned[k], 1e-9) for k in ("prefill_s", "decode_step_s", "train_step_s")}
        print(f"{model:10s} {'unrolled/scan':>13s} " + "  ".join(f"{k[:-2]} {v:.1f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
