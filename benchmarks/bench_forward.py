"""Forward-pass time of GPT-2 (logits for a [batch, seq] input): gpt2-jax (jit) against transformers PyTorch.

Both run the same random weights in the same process, in float32 on the CPU. Our compile time is reported
separately; the figures are medians over ``--runs`` timed runs after warm-up.

    python benchmarks/bench_forward.py --preset gpt2 --batch 1 --seq 128 --runs 10
"""

from __future__ import annotations

from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpt2_jax.config import GPT2Config  # noqa: E402
from gpt2_jax.model import GPT2LMHeadModel, init_params  # noqa: E402




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    import torch

    from hf_reference import hf_model

    torch.set_num_threads(os.cpu_count() or 1)
    config = GPT2Config.from_preset(args.preset)
    params = init_params(jax.random.PRNGKey(0), config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)

    model = GPT2LMHeadModel(config)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    start = time.perf_counter()
    compiled = forward.lower(params, ids).compile()
    compile_s = time.perf_counter() - start
    ours = lambda: compiled(params, ids).block_until_ready()
    ours()
    ours_s = median_seconds(ours, args.runs)

    ref = hf_model(params, config)
    ref.config._attn_implementation = "sdpa"  # transformers' default attention for inference
    ids_t = torch.from_numpy(ids).long()

    def theirs():
        with torch.inference_mode():
            return ref(ids_t).logits

    theirs()
    theirs_s = median_seconds(theirs, args.runs)
    diff = float(np.abs(np.asarray(compiled(params, ids)) - theirs().numpy()).max())

    print(f"GPT-2 forward, preset {args.preset}, input [{args.batch}, {args.seq}], float32, "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores), median of {args.runs}")
    print(f"{'implementation':<28}{'ms / forward':>14}{'tokens/s':>12}")
    for name, seconds in [("gpt2-jax (jit)", ours_s), ("transformers PyTorch", theirs_s)]:
        print(f"{name:<28}{seconds * 1e3:>14.1f}{args.batch * args.seq / seconds:>12.0f}")
    print(f"speed-up of gpt2-jax over transformers: {theirs_s / ours_s:.2f}x")
    print(f"gpt2-jax compile time: {compile_s:.2f} s (excluded above)")
    print(f"max |logits difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
