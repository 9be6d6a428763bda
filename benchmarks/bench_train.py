"""Training throughput: our jitted optax train step vs a plain PyTorch loop on the Hugging Face model.

Same architecture (gpt2 124M by default, randomly initialised: no download), same initial weights, same batch,
same optimizer (AdamW, GPT-2 decay mask, global-norm clipping 1.0), both in float32 with dropout off (``--dropout``
turns it on in both), in the same process. Reports the median step time over ``--steps`` timed steps after
``--warmup`` untimed ones (our compilation time is reported separately), tokens/s, model FLOPs utilisation and the
ratio ours / PyTorch.

MFU = model FLOPs per step / step time / peak. Model FLOPs per token follow PaLM / nanoGPT: ``6 N + 12 L T d``
(N = matmul params including the tied LM head, excluding the position table; the second term is attention).
The peak is *measured* in this run: the best float32 2048x2048 matmul rate of JAX and PyTorch on this machine
(vendor peaks are not meaningful on a shared virtual CPU). On a GPU, pass ``--dtype bfloat16`` for our side.

    python benchmarks/bench_train.py [--model gpt2] [--batch 4] [--seq 256] [--steps 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
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


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_flops_per_token(config, seq: int) -> float:
    """``6 N + 12 L T d`` (see the module docstring)."""
    d, L, V, inner = config.n_embd, config.n_layer, config.vocab_size, config.inner_dim
    matmul_params = L * (d * 3 * d + d * d + 2 * d * inner) + V * d
    return 6 * matmul_params + 12 * L * seq * d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="GPT-2 preset (architecture only; random weights)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype")
    parser.add_argument("--dropout", action="store_true", help="train with dropout 0.1 in both")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    import torch

    from gpt2_jax.checkpoints.hf_mapping import params_to_state_dict
    from gpt2_jax.config import GPT2Config
    from gpt2_jax.model import count_params, init_params
    from gpt2_jax.training.optim import OptimizerConfig, decay_mask, make_optimizer
    from gpt2_jax.training.step import TrainState, make_train_step

    drop = 0.1 if args.dropout else 0.0
    config = GPT2Config.from_preset(args.model, resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop)
    opt_cfg = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1000, weight_decay=0.1, grad_clip=1.0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.seq + 1), dtype=np.int32)
    tokens_per_step = args.batch * args.seq
    flops_per_step = model_flops_per_token(config, args.seq) * tokens_per_step
    load = os.getloadavg()
    print(f"{args.model}: batch {args.batch} x seq {args.seq} = {tokens_per_step} tokens/step; "
          f"{flops_per_step / 1e12:.3f} TFLOP/step; devices {jax.devices()}; torch threads "
          f"{torch.get_num_threads()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    peak = measure_peak()
    peak_flops = max(peak.values())
    print(f"measured float32 matmul peak: jax {peak['jax'] / 1e9:.0f} GFLOP/s, torch {peak['torch'] / 1e9:.0f} GFLOP/s")

    # Ours.
    params = init_params(jax.random.PRNGKey(0), config)
    print(f"params: {count_params(params) / 1e6:.1f}M")
    optimizer, schedule = make_optimizer(opt_cfg)
    state = TrainState.create(params, optimizer)
    host_state = params_to_state_dict(jax.device_get(params))  # for the torch model, before donation
    step = make_train_step(config, optimizer, schedule, dropout=args.dropout,
                           compute_dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    batch = jnp.asarray(tokens)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - start
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.PRNGKey(i))
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    ours = statistics.median(times)
    print(f"ours ({args.dtype}): compile {compile_s:.1f} s; step {ours:.3f} s (median of {args.steps}); "
          f"{tokens_per_step / ours:,.0f} tokens/s; MFU {flops_per_step / ours / peak_flops:.1%}; "
          f"losses {[round(x, 4) for x in losses]}")
    del state, compiled, step

    if args.skip_torch:
        return
    # PyTorch: the Hugging Face model and a plain loop.
    import transformers

    hf_cfg = transformers.GPT2Config(**config.to_hf_dict())
    model = transformers.GPT2LMHeadModel(hf_cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in host_state.items()}, strict=False)
    model.tie_weights()
    model.train()
    decay = params_to_state_dict(decay_mask(params), convert=lambda x: x)
    named = dict(model.named_parameters())
    torch_opt = torch.optim.AdamW(
        [{"params": [p for n, p in named.items() if decay[n]], "weight_decay": opt_cfg.weight_decay},
         {"params": [p for n, p in named.items() if not decay[n]], "weight_decay": 0.0}],
        lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)
    inputs = torch.from_numpy(tokens[:, :-1]).long()
    labels = torch.from_numpy(tokens[:, 1:]).long()
    times, torch_losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        torch_opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        torch_opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        torch_losses.append(loss.item())
    theirs = statistics.median(times)
    print(f"pytorch (HF GPT2LMHeadModel, {model.config._attn_implementation} attention): step {theirs:.3f} s; "
          f"{tokens_per_step / theirs:,.0f} tokens/s; MFU {flops_per_step / theirs / peak_flops:.1%}; "
          f"losses {[round(x, 4) for x in torch_losses]}")
    print(f"ratio (ours / pytorch tokens/s): {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
