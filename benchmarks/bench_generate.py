"""Generation benchmark: our compiled engine against transformers PyTorch ``generate``, same weights, same run.

gpt2 (124M) architecture with random weights, a 128-token prompt, 128 new tokens, greedy, batch 1 and 8 (every
row generates the full budget: no eos). For each engine it prints prefill tokens/s, decode tokens/s, time to first
token and (ours) compile time, then the ratios. Times are medians of ``--runs`` runs, taken with
``block_until_ready`` and excluding compilation.

* time to first token (TTFT): prefill plus the first token (ours: the streaming start program; PyTorch:
  ``generate(max_new_tokens=1)``);
* prefill tokens/s = batch * prompt / TTFT;
* decode tokens/s = batch * (new - 1) / (full generate - TTFT);
* compile: lowering + compiling the full generate program in this process (no persistent cache);
* ``--startup``: two fresh processes sharing an empty persistent compilation cache directory: "cold" is the first
  call's overhead (trace + compile) in the first, "warm" the same overhead in the second (trace + cache load),
  both measured as the first ``generate`` call's time minus the next call's.
* ``--first-call``: per batch size, fresh processes with no persistent cache: the first ``generate`` call's overhead
  (its time minus the next call's), split by an ahead-of-time run of the same program in another fresh process into
  preparing the weights, tracing, lowering and compiling.

Usage::

    python benchmarks/bench_generate.py                     # float32 on CPU, batch 1 and 8
    python benchmarks/bench_generate.py --startup           # also cold / warm start with the persistent cache
    python benchmarks/bench_generate.py --first-call --skip-torch   # first-call cost without any cache, split
    python benchmarks/bench_generate.py --dtype bfloat16    # on a GPU (PyTorch runs on cuda too when available)
"""

from __future__ import annotations

from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np




def build_params(seed: int, dtype: str):
    """gpt2-size random params (our pytree) and config."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.config import GPT2Config
    from gpt2_jax.model import init_params

    config = GPT2Config.from_preset("gpt2")
    params = init_params(jax.random.PRNGKey(seed), config)
    if dtype != "float32":
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return config, params


def bench_ours(config, params, ids: np.ndarray, new_tokens: int, runs: int) -> dict:
    """Time our engine: compile, TTFT, full generate."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.generation.request import build_request, prompt_keys
    from gpt2_jax.generation.sampler import SamplerSpec, _sample_program
    from gpt2_jax.generation.streaming import _start_program
    from gpt2_jax.generation.weight_layout import decode_weights

    request = build_request(params, config, ids, max_new_tokens=new_tokens, eos_token_id=())
    spec = SamplerSpec.from_request(request)
    weights = decode_weights(params, rows=request.decode_rows)  # what generate() computes with
    args = (weights, jnp.asarray(request.prompts.input_ids), jnp.asarray(request.prompts.attention_mask),
            prompt_keys(jax.random.PRNGKey(0), ids.shape[0]), request.knobs)
    start = time.perf_counter()
    program = _sample_program.lower(*args, spec=spec).compile()
    compile_s = time.perf_counter() - start
    first = _start_program.lower(*args, spec=spec).compile()

    def full():
        tokens, steps = program(*args)[:2]  # (tokens, step, ...)
        jax.block_until_ready(tokens)
        assert int(steps) == new_tokens

    def ttft():
        jax.block_until_ready(first(*args))

    full()
    ttft()
    return {"compile_s": compile_s, "ttft_s": median_seconds(ttft, runs), "total_s": median_seconds(full, runs)}


def bench_torch(config, params, ids: np.ndarray, new_tokens: int, runs: int, dtype: str, threads: int) -> dict:
    """Time transformers' eager ``generate`` on the same weights."""
    import torch
    import transformers

    from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict

    torch.set_num_threads(threads)
    device = "cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"
    hf_config = transformers.GPT2Config(**config.to_hf_dict())
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params_to_state_dict(params).items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.eos_token_id
    input_ids = torch.tensor(ids, device=device)
    mask = torch.ones_like(input_ids)

    def run(n):
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n

    run(2)  # warm-up
    return {"ttft_s": median_seconds(lambda: run(1), runs), "total_s": median_seconds(lambda: run(new_tokens), runs)}


def rates(result: dict, batch: int, prompt: int, new_tokens: int) -> dict:
    decode_s = result["total_s"] - result["ttft_s"]
    return dict(result, prefill_tok_s=batch * prompt / result["ttft_s"],
                decode_tok_s=batch * (new_tokens - 1) / decode_s)


def startup_child(args) -> None:
    """In a fresh process: first-call overhead of generate with the persistent cache of ``args.cache_dir``."""
    t0 = time.perf_counter()
    from gpt2_jax.generation.cli import enable_compilation_cache

    enable_compilation_cache(args.cache_dir)
    import jax

    from gpt2_jax.generation import generate

    config, params = build_params(0, args.dtype)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (1, args.prompt))
    jax.block_until_ready(params)
    ready = time.perf_counter()
    generate(params, ids, model_config=config, max_new_tokens=args.new_tokens, eos_token_id=())
    first = time.perf_counter() - ready
    steady = median_seconds(lambda: generate(params, ids, model_config=config, max_new_tokens=args.new_tokens,
                                           eos_token_id=()), 2)
    print(json.dumps({"overhead_s": first - steady, "first_call_s": first, "steady_s": steady,
                      "imports_and_params_s": ready - t0}))


def first_call_child(args) -> None:
    """In a fresh process without a persistent cache: ``--first-call-child overhead`` times the first ``generate``
    call against the next; ``split`` times each phase of building the same program ahead of time."""
    import jax
    import jax.numpy as jnp

    config, params = build_params(0, args.dtype)
    batch = args.batch_sizes[0]
    ids = np.random.RandomState(batch).randint(0, config.vocab_size, (batch, args.prompt))
    jax.block_until_ready(params)
    if args.first_call_child == "overhead":
        from gpt2_jax.generation import generate

        def run():
            generate(params, ids, model_config=config, max_new_tokens=args.new_tokens, eos_token_id=())

        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        steady = median_seconds(run, 2)
        print(json.dumps({"overhead_s": first - steady, "steady_s": steady}))
        return
    from gpt2_jax.generation.request import build_request, prompt_keys
    from gpt2_jax.generation.sampler import SamplerSpec, _sample_program
    from gpt2_jax.generation.weight_layout import decode_weights

    marks = [time.perf_counter()]
    request = build_request(params, config, ids, max_new_tokens=args.new_tokens, eos_token_id=())
    spec = SamplerSpec.from_request(request)
    weights = jax.block_until_ready(decode_weights(params, rows=request.decode_rows))
    marks.append(time.perf_counter())
    traced = _sample_program.trace(weights, jnp.asarray(request.prompts.input_ids),
                                   jnp.asarray(request.prompts.attention_mask),
                                   prompt_keys(jax.random.PRNGKey(0), batch), request.knobs, spec=spec)
    marks.append(time.perf_counter())
    lowered = traced.lower()
    marks.append(time.perf_counter())
    lowered.compile()
    marks.append(time.perf_counter())
    phases = ("request_and_weights_s", "trace_s", "lower_s", "compile_s")
    print(json.dumps({name: b - a for name, a, b in zip(phases, marks, marks[1:])}))


def first_call(args) -> list[tuple[int, dict]]:
    """Run :func:`first_call_child` (overhead, then split) for each batch size in fresh processes."""
    results = []
    for batch in args.batch_sizes:
        merged = {}
        for mode in ("overhead", "split"):
            cmd = [sys.executable, __file__, "--first-call-child", mode, "--batch-sizes", str(batch), "--dtype",
                   args.dtype, "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            merged.update(json.loads(out.stdout.strip().splitlines()[-1]))
        results.append((batch, merged))
    return results


def startup(args) -> list[dict]:
    """Run :func:`startup_child` twice in fresh processes sharing a new cache directory."""
    results = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for _ in range(2):
            cmd = [sys.executable, __file__, "--startup-child", "--cache-dir", cache_dir, "--dtype", args.dtype,
                   "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({os.cpu_count(), 1}, reverse=True),
                        help="torch thread counts to time (default: all cores, then 1); ratios use the fastest")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--startup", action="store_true", help="also measure cold / warm start in fresh processes")
    parser.add_argument("--first-call", action="store_true",
                        help="also measure each batch size's first-call cost without a persistent cache, split")
    parser.add_argument("--startup-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first-call-child", choices=("overhead", "split"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup_child:
        return startup_child(args)
    if args.first_call_child:
        return first_call_child(args)

    import jax

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}; dtype {args.dtype}; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy; median of {args.runs}")
    config, params = build_params(0, args.dtype)
    rows = []
    for batch in args.batch_sizes:
        ids = np.random.RandomState(batch).randint(0, config.vocab_size, (batch, args.prompt))
        ours = rates(bench_ours(config, params, ids, args.new_tokens, args.runs), batch, args.prompt,
                     args.new_tokens)
        theirs = []
        if not args.skip_torch:
            for threads in args.threads:
                result = bench_torch(config, params, ids, args.new_tokens, args.runs, args.dtype, threads)
                theirs.append((threads, rates(result, batch, args.prompt, args.new_tokens)))
        rows.append((batch, ours, theirs))

    header = f"{'engine':<22}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'TTFT ms':>10}{'compile s':>11}"
    print(header)
    print("-" * len(header))
    for batch, ours, theirs in rows:
        print(f"{'gpt2-jax (ours)':<22}{batch:>6}{ours['prefill_tok_s']:>15.0f}{ours['decode_tok_s']:>14.1f}"
              f"{1e3 * ours['ttft_s']:>10.0f}{ours['compile_s']:>11.1f}")
        for threads, result in theirs:
            name = f"transformers {threads} thr"
            print(f"{name:<22}{batch:>6}{result['prefill_tok_s']:>15.0f}"
                  f"{result['decode_tok_s']:>14.1f}{1e3 * result['ttft_s']:>10.0f}{'-':>11}")
        if theirs:  # against the fastest PyTorch configuration of this run
            best_prefill = max(r["prefill_tok_s"] for _, r in theirs)
            best_decode = max(r["decode_tok_s"] for _, r in theirs)
            best_ttft = min(r["ttft_s"] for _, r in theirs)
            print(f"{'  ratio ours/best':<22}{'':>6}{ours['prefill_tok_s'] / best_prefill:>14.2f}x"
                  f"{ours['decode_tok_s'] / best_decode:>13.2f}x{best_ttft / ours['ttft_s']:>9.2f}x")
    if args.startup:
        cold, warm = startup(args)
        print(f"startup (batch 1, fresh processes, persistent compilation cache):")
        print(f"  cold: first generate call costs {cold['overhead_s']:.2f} s more than the next (trace + compile)")
        print(f"  warm: first generate call costs {warm['overhead_s']:.2f} s more than the next (trace + cache load)")
        print(f"  (imports + random params: {cold['imports_and_params_s']:.1f} s / {warm['imports_and_params_s']:.1f} s; "
              f"a generate call: {warm['steady_s']:.2f} s)")
    if args.first_call:
        print("first call (fresh processes, no persistent compilation cache), before the first token = overhead + TTFT:")
        ttft = {batch: ours["ttft_s"] for batch, ours, _ in rows}
        for batch, r in first_call(args):
            print(f"  batch {batch}: first generate call costs {r['overhead_s']:.2f} s more than the next "
                  f"(+ TTFT {ttft[batch]:.2f} s = {r['overhead_s'] + ttft[batch]:.2f} s before the first token); "
                  f"ahead of time: request + weights {r['request_and_weights_s']:.2f} s, trace {r['trace_s']:.2f} s, "
                  f"lower {r['lower_s']:.2f} s, compile {r['compile_s']:.2f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
