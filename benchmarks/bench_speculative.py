"""Speculative decoding against plain decoding of the same target, in one process: speedup vs measured acceptance.

Cases (random weights, batch 1, greedy, ``--new-tokens`` tokens, ``--k`` draft tokens per step):

* ``independent``: a random ``--target`` preset drafted by a random ``--draft`` preset (acceptance ~0: the worst
  case, where the fallback must stop drafting);
* ``agree~X``: a target built to agree with the draft: the draft's weights plus ``--extra-layers`` random blocks
  whose output projections are scaled by ``s`` (:func:`gpt2_jax.generation.speculative.extend_with_layers`);
  ``s`` is searched (bisection on the measured acceptance) to land near each ``--acceptance`` target, or taken
  from ``--scales`` (the acceptance falls steeply with ``s``, so the bisection can step over a rate). By default
  as many blocks are added as make the agreeing target stream as many weights per step as ``--target`` (gpt2 +
  92 blocks ~ gpt2-large), so the draft / target cost ratio is the real pair's: with too few blocks the draft is
  nearly as costly as the target and drafting cannot pay at any acceptance.

Next to each measurement the cost model prints its prediction: ``E / (K c + v)`` with ``E = (1 - a^(K+1)) /
(1 - a)`` tokens per iteration at acceptance ``a``, ``c`` the draft's plain decode time per token over the
target's (both measured in this run) and ``v = 1``: verifying ``K + 1`` tokens costs one memory-bound target pass
(on a CPU the K + 1 tokens' compute shows: the measured speedup falls short of the model by that much).

Each timing is the median of ``--runs`` full ``generate`` calls after a compile call (compile excluded). The
machine is shared: read the ratios, and the load average printed with them. Defaults are the issue's gpt2-large
target / gpt2 draft; ``--target``/``--draft`` take any preset (``tiny`` is a 4-layer, 256-wide model) when that is
too heavy for the machine.

    python benchmarks/bench_speculative.py --target gpt2-large --draft gpt2
    python benchmarks/bench_speculative.py --target gpt2 --draft tiny --extra-layers 8 --runs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_seconds  # noqa: E402

TINY = dict(n_embd=256, n_layer=4, n_head=4)


def config_for(name: str):
    from gpt2_jax.config import PRESETS, GPT2Config

    if name == "tiny":
        return GPT2Config(**TINY)
    if name not in PRESETS:
        raise SystemExit(f"--target/--draft must be tiny or one of {', '.join(PRESETS)}, got {name!r}")
    return GPT2Config.from_preset(name)


def timed(params, config, ids, new_tokens: int, runs: int, **kwargs) -> tuple[float, object]:
    """``(median seconds, last output)`` of greedy generate after one compile call."""
    from gpt2_jax.generation import generate

    run = lambda: generate(params, ids, model_config=config, max_new_tokens=new_tokens, eos_token_id=(), **kwargs)
    out = run()  # compile
    holder = {}

    def call():
        holder["out"] = run()

    return median_seconds(call, runs), holder.get("out", out)


def find_scale(draft, draft_cfg, extra: int, goal: float, ids, args) -> tuple[float, object, object, float]:
    """Bisect the output-projection scale of the extra layers for an acceptance near ``goal`` (short runs)."""
    import jax

    from gpt2_jax.generation import generate
    from gpt2_jax.generation.speculative import extend_with_layers

    lo, hi = 0.0, 2.0  # acceptance falls as the scale grows
    best = None
    for _ in range(args.search_steps):
        mid = (lo + hi) / 2
        target, cfg = extend_with_layers(draft, draft_cfg, extra, mid, jax.random.PRNGKey(1))
        out = generate(target, ids, model_config=cfg, max_new_tokens=args.search_tokens, eos_token_id=(),
                       assistant_params=draft, assistant_config=draft_cfg, num_assistant_tokens=args.k,
                       assistant_fallback=False)
        rate = out.acceptance_rate
        if best is None or abs(rate - goal) < abs(best[3] - goal):
            best = (mid, target, cfg, rate)
        lo, hi = (mid, hi) if rate > goal else (lo, mid)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="gpt2-large")
    p.add_argument("--draft", default="gpt2")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--extra-layers", type=int, default=None,
                   help="blocks added on the draft for the agreeing targets (default: as many as match --target's "
                        "weights per step)")
    p.add_argument("--acceptance", default="0.5,0.8", help="acceptance rates to aim the agreeing targets at")
    p.add_argument("--scales", default="",
                   help="output-projection scales of the agreeing targets to measure directly (comma-separated), "
                        "instead of searching one per --acceptance")
    p.add_argument("--search-steps", type=int, default=6)
    p.add_argument("--search-tokens", type=int, default=48)
    p.add_argument("--skip-independent", action="store_true")
    args = p.parse_args()

    import jax
    import numpy as np

    from gpt2_jax.model import init_params

    print(f"# bench_speculative: target {args.target}, draft {args.draft}, k={args.k}, batch 1, "
          f"{args.new_tokens} new tokens, greedy; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    draft_cfg = config_for(args.draft)
    draft = init_params(jax.random.PRNGKey(0), draft_cfg)
    ids = np.random.RandomState(0).randint(0, draft_cfg.vocab_size, (1, args.prompt_len))
    rows = []
    from gpt2_jax.generation.speculative import param_count

    target_cfg = config_for(args.target)
    if args.extra_layers is None:
        block = param_count(draft_cfg.replace(n_layer=2)) - param_count(draft_cfg.replace(n_layer=1))
        args.extra_layers = max(1, round((param_count(target_cfg) - param_count(draft_cfg)) / block))
    agree_cfg = draft_cfg.replace(n_layer=draft_cfg.n_layer + args.extra_layers)
    print(f"# agreeing targets: the draft + {args.extra_layers} blocks = {agree_cfg.n_layer} layers, "
          f"{param_count(agree_cfg) / 1e6:.0f}M weights per step ({args.target}: {param_count(target_cfg) / 1e6:.0f}M; "
          f"draft: {param_count(draft_cfg) / 1e6:.0f}M)")

    draft_s, _ = timed(draft, draft_cfg, ids, args.new_tokens, args.runs)  # the draft decoding alone
    print(f"# the draft alone: {draft_s:.2f} s for {args.new_tokens} tokens", flush=True)

    def predicted(rate: float, plain_s: float) -> float:
        """The cost model's speedup at acceptance ``rate`` (module docstring)."""
        c = draft_s / plain_s
        tokens = args.k + 1 if rate >= 1 else (1 - rate ** (args.k + 1)) / (1 - rate)
        return tokens / (args.k * c + 1)

    def case(name, target, cfg):
        t0 = time.perf_counter()
        plain_s, plain = timed(target, cfg, ids, args.new_tokens, args.runs)
        spec_s, spec = timed(target, cfg, ids, args.new_tokens, args.runs, assistant_params=draft,
                             assistant_config=draft_cfg, num_assistant_tokens=args.k)
        same = bool((plain.sequences == spec.sequences).all())
        rows.append((name, spec.acceptance_rate, plain_s, spec_s, plain_s / spec_s, same))
        print(f"{name:>14}: acceptance {spec.acceptance_rate:.2f} ({int(spec.num_accepted.sum())}/"
              f"{int(spec.num_drafted.sum())}), plain {plain_s:.2f} s, speculative {spec_s:.2f} s, "
              f"speedup {plain_s / spec_s:.2f}x (cost model {predicted(spec.acceptance_rate, plain_s):.2f}x), "
              f"tokens equal: {same}  [{time.perf_counter() - t0:.0f} s, "
              f"load {os.getloadavg()[0]:.1f}]", flush=True)

    if not args.skip_independent:
        case("independent", init_params(jax.random.PRNGKey(1), target_cfg), target_cfg)
    if args.scales:  # measured where asked: the bisection can step over an acceptance rate (it falls steeply)
        from gpt2_jax.generation.speculative import extend_with_layers

        for scale in (float(x) for x in args.scales.split(",") if x):
            target, cfg = extend_with_layers(draft, draft_cfg, args.extra_layers, scale, jax.random.PRNGKey(1))
            case(f"agree s={scale:.3f}", target, cfg)
    for goal in (float(g) for g in args.acceptance.split(",") if g and not args.scales):
        scale, target, cfg, rate = find_scale(draft, draft_cfg, args.extra_layers, goal, ids, args)
        case(f"agree~{goal:.1f} s={scale:.3f}", target, cfg)
    print(f"# load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
