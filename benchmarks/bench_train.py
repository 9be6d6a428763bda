"""Training throughput: our jitted optax train step vs a plain PyTorch loop on the Hugging Face model.

Same architecture (gpt2 124M by default, randomly initialised: no download), same initial weights, same batch,
same optimizer (AdamW, GPT-2 decay mask, global-norm clipping 1.0), float32, in the same process. Two modes:
``dropout 0.1`` (GPT-2's config, what ``model.train()`` does in a plain PyTorch loop) and ``no dropout`` (where both
frameworks compute the same losses, printed as a check). Reports the median step time over ``--steps`` timed steps
after ``--warmup`` untimed ones, tokens/s, model FLOPs utilisation and the ratio ours / PyTorch. The two frameworks
alternate step by step so that both see the same load on a shared machine.

MFU = model FLOPs per step / step time / peak. Model FLOPs per token follow PaLM / nanoGPT: ``6 N + 12 L T d``
(N = matmul params including the tied LM head, excluding the position table; the second term is attention).
The peak is *measured* in this run: the best float32 2048x2048 matmul rate of JAX and PyTorch on this machine
(vendor peaks are not meaningful on a shared virtual CPU); bfloat16 runs are also measured against that float32
peak, so on a CPU with native bfloat16 dot products their MFU can pass 100%. ``--dtype bfloat16`` runs our step in bfloat16 mixed
precision (float32 master weights and optimizer state) and adds PyTorch's own, ``torch.autocast("cpu",
dtype=torch.bfloat16)``, as a third runner; the float32 PyTorch loop stays as the baseline. On a CPU without
native bfloat16 dot products (:mod:`gpt2_jax.cpu_features`) the autocast runner is skipped unless
``--force-autocast``: PyTorch's bfloat16 kernels crawl there (gpt2 4 x 256 on a 2-core Zen 3 VM, AVX2: 385-390 s a
step, float32 8.6-9.5 s). On the CPU our bfloat16 compute needs ``GPT2_JAX_TUNING=low_precision_compute=1`` (the
CPU default computes float32; see gpt2_jax.backend).

The bench restarts itself once with glibc keeping freed memory, as ``gpt2-jax train`` does (:mod:`gpt2_jax.heap`:
otherwise XLA's per-step temporary block is faulted in again every step, and more slowly right after a PyTorch
step); both frameworks run under the same setting. ``--no-keep-heap`` runs with glibc's defaults.

    python benchmarks/bench_train.py [--model gpt2] [--batch 4] [--seq 256] [--steps 5] [--warmup 3] [--dropout both|on|off]
        [--dtype bfloat16] [--force-autocast] [--no-keep-heap]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_peak(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Best achieved float32 matmul FLOP/s of JAX and PyTorch."""
    import torch

    flops = 2 * size**3
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best_jax = min(_time(lambda: mm(a).block_until_ready()) for _ in range(repeats))
    t = torch.randn(size, size)
    torch.mm(t, t)
    best_torch = min(_time(lambda: torch.mm(t, t)) for _ in range(repeats))
    return {"jax": flops / best_jax, "torch": flops / best_torch}


def model_flops_per_token(config, seq: int) -> float:
    """``6 N + 12 L T d`` (see the module docstring)."""
    d, L, V, inner = config.n_embd, config.n_layer, config.vocab_size, config.inner_dim
    matmul_params = L * (d * 3 * d + d * d + 2 * d * inner) + V * d
    return 6 * matmul_params + 12 * L * seq * d


def make_ours(config, opt_cfg, params, tokens, args, dropout: bool):
    """``(step() -> loss, compile seconds)`` for our jitted train step (the state is kept inside)."""
    from gpt2_jax.training.optim import make_optimizer
    from gpt2_jax.training.step import TrainState, make_train_step

    optimizer, schedule = make_optimizer(opt_cfg)
    holder = {"state": TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer), "i": 0}  # a copy
    step = make_train_step(config, optimizer, schedule, dropout=dropout,
                           compute_dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    batch = jnp.asarray(tokens)
    start = time.perf_counter()
    compiled = step.lower(holder["state"], batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - start

    def run() -> float:
        holder["state"], metrics = compiled(holder["state"], batch, jax.random.PRNGKey(holder["i"]))
        holder["i"] += 1
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    return run, compile_s


def make_torch(config, opt_cfg, host_state, decay, tokens, dropout: bool, autocast: bool = False):
    """``(step() -> loss, attention implementation)`` for a plain PyTorch loop on the Hugging Face model.

    ``autocast``: the forward pass and the loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (PyTorch's
    mixed precision: float32 weights, gradients and optimizer state; matmuls in bfloat16)."""
    import torch
    import transformers

    hf_cfg = transformers.GPT2Config(**config.to_hf_dict())
    model = transformers.GPT2LMHeadModel(hf_cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in host_state.items()}, strict=False)
    model.tie_weights()
    model.train()
    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if decay[n]], "weight_decay": opt_cfg.weight_decay},
         {"params": [p for n, p in named.items() if not decay[n]], "weight_decay": 0.0}],
        lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
    inputs = torch.from_numpy(tokens[:, :-1]).long()
    labels = torch.from_numpy(tokens[:, 1:]).long()

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        return loss.item()

    return run, model.config._attn_implementation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="GPT-2 preset (architecture only; random weights)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework and mode")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps after compilation (the kept heap settles after a few steps)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype")
    parser.add_argument("--dropout", choices=("both", "on", "off"), default="both",
                        help="on: dropout 0.1 (GPT-2's config) in both frameworks; off: none (identical losses)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--force-autocast", action="store_true",
                        help="run PyTorch's autocast peer even on a CPU without native bfloat16 dot products, where "
                             "its step crawls (385-390 s vs 8.6-9.5 s float32 for gpt2 4 x 256 on a Zen 3 VM)")
    parser.add_argument("--no-keep-heap", action="store_true",
                        help="do not restart with glibc keeping freed memory (what `gpt2-jax train` does, "
                             "gpt2_jax.heap); the setting applies to both frameworks alike")
    args = parser.parse_args()
    from gpt2_jax import heap

    if not args.no_keep_heap:
        heap.restart_with_kept_heap([os.path.abspath(__file__), *sys.argv[1:]])

    import torch

    from gpt2_jax import backend, cpu_features
    from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict
    from gpt2_jax.config import GPT2Config
    from gpt2_jax.model import count_params, init_params
    from gpt2_jax.training.optim import OptimizerConfig, decay_mask

    base = GPT2Config.from_preset(args.model)
    opt_cfg = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1000, weight_decay=0.1, grad_clip=1.0)
    tokens = np.random.default_rng(0).integers(0, base.vocab_size, size=(args.batch, args.seq + 1), dtype=np.int32)
    tokens_per_step = args.batch * args.seq
    flops_per_step = model_flops_per_token(base, args.seq) * tokens_per_step
    load = os.getloadavg()
    params = init_params(jax.random.PRNGKey(0), base)
    host_state = params_to_state_dict(jax.device_get(params))
    decay = params_to_state_dict(decay_mask(params), convert=lambda x: x)
    print(f"{args.model} ({count_params(params) / 1e6:.1f}M params): batch {args.batch} x seq {args.seq} = "
          f"{tokens_per_step} tokens/step, {flops_per_step / 1e12:.3f} TFLOP/step; {jax.devices()[0].platform} "
          f"x{jax.device_count()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    kept = all(os.environ.get(k) == v for k, v in heap.KEPT_HEAP_SETTINGS.items())
    print(f"malloc: {'freed memory kept (gpt2_jax.heap, as gpt2-jax train runs)' if kept else 'glibc defaults'}")
    peak = measure_peak()
    peak_flops = max(peak.values())
    print(f"measured float32 matmul peak: jax {peak['jax'] / 1e9:.0f} GFLOP/s, torch {peak['torch'] / 1e9:.0f} GFLOP/s "
          f"(MFU below is relative to {peak_flops / 1e9:.0f})")
    run_autocast = args.dtype == "bfloat16" and not args.skip_torch
    if args.dtype == "bfloat16" and jax.devices()[0].platform == "cpu":
        tuning = backend.tuning_for()
        native = cpu_features.has_native_bf16_dots()
        print(f"cpu bfloat16: native dot products {'yes' if native else 'no'} (gpt2_jax.cpu_features); ours: "
              f"low_precision_compute {'on' if tuning.low_precision_compute else 'off (computes float32)'}, "
              f"row_major_bf16_dots {'on' if tuning.row_major_bf16_dots else 'off'}")
        if run_autocast and not native and not args.force_autocast:
            run_autocast = False
            print("pytorch autocast skipped: without native bfloat16 dot products its step takes minutes "
                  "(--force-autocast runs it anyway)")
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.dropout]
    summary = []
    for dropout in modes:
        drop = 0.1 if dropout else 0.0
        config = base.replace(resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop)
        name = "dropout 0.1" if dropout else "no dropout"
        ours_run, compile_s = make_ours(config, opt_cfg, params, tokens, args, dropout)
        print(f"[{name}] ours: compile {compile_s:.1f} s (excluded below)")
        runners = {"ours": ours_run}
        attn = None
        if not args.skip_torch:
            runners["pytorch"], attn = make_torch(config, opt_cfg, host_state, decay, tokens, dropout)
            if run_autocast:  # PyTorch's own mixed precision is the peer of ours
                runners["pytorch autocast"], _ = make_torch(config, opt_cfg, host_state, decay, tokens, dropout,
                                                            autocast=True)
        # Alternate the two frameworks step by step, so that both see the same machine load.
        times = {k: [] for k in runners}
        losses = {k: [] for k in runners}
        for i in range(args.warmup + args.steps):
            for k, run in runners.items():
                t0 = time.perf_counter()
                losses[k].append(run())
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
        for k in runners:
            t = statistics.median(times[k])
            what = {"ours": f"ours ({args.dtype})",
                    "pytorch": f"pytorch float32 (HF GPT2LMHeadModel, {attn} attention, AdamW foreach)",
                    "pytorch autocast": "pytorch autocast bfloat16"}[k]
            print(f"[{name}] {what}: step {t:.3f} s (median of {args.steps}); {tokens_per_step / t:,.0f} tokens/s; "
                  f"MFU {flops_per_step / t / peak_flops:.1%}; losses {[round(x, 4) for x in losses[k]]}")
        for peer in ("pytorch", "pytorch autocast"):
            if peer in times:
                ratio = statistics.median(times[peer]) / statistics.median(times["ours"])
                summary.append(f"{name} vs {peer}: {ratio:.2f}x")
    if summary:
        load = os.getloadavg()
        print(f"ratio (ours / pytorch tokens/s): {'; '.join(summary)}  (load average now {load[0]:.1f})")


if __name__ == "__main__":
    main()
