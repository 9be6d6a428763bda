"""Activation patching on an indirect-object-identification prompt pair: a layer x position heatmap (PNG).

Clean: "When Mary and John went to the store, John gave a drink to" (answer " Mary"); corrupted: the same with the
second name swapped to Mary (answer flips). The corrupted run is patched with the clean ``hook_resid_pre`` at every
layer and position in one compiled call; the metric is the logit difference " Mary" - " John", normalised so 1 is
the clean run and 0 the corrupted one. With random weights (the default, offline) the picture is noise; pass
``--model gpt2`` (or a checkpoint directory) for the released weights.

    python scripts/patching_example.py --out patching.png
    python scripts/patching_example.py --n-layer 2 --out patching.png     # a quick smoke run
    python scripts/patching_example.py --model gpt2 --out patching.png
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import GPT2Config, GPT2Tokenizer, init_params
from gpt2_jax.interp import activation_patching, run_with_hooks

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or checkpoint directory (default: random gpt2 weights)")
    parser.add_argument("--preset", default="gpt2", help="architecture of the random weights")
    parser.add_argument("--n-layer", type=int, default=None, help="random weights: override the preset's depth")
    parser.add_argument("--out", default="patching.png")
    args = parser.parse_args(argv)

    tokenizer = GPT2Tokenizer()
    if args.model:
        from gpt2_jax import from_pretrained

        loaded = from_pretrained(args.model)
        config, params = loaded.config, loaded.params
    else:
        config = GPT2Config.from_preset(args.preset)
        if args.n_layer:
            config = config.replace(n_layer=args.n_layer)
        params = init_params(jax.random.PRNGKey(0), config)
        print("RANDOM WEIGHTS: the heatmap is noise (pass --model gpt2 for the released weights)")
    clean, corrupted = (jnp.asarray([tokenizer.encode(t)]) for t in (CLEAN, CORRUPTED))
    if clean.shape != corrupted.shape:
        raise SystemExit("the clean and corrupted prompts must have the same number of tokens")
    mary, john = tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0]
    logit_diff = lambda logits: logits[0, -1, mary] - logits[0, -1, john]
    clean_diff = logit_diff(run_with_hooks(params, config, clean))
    corrupted_diff = logit_diff(run_with_hooks(params, config, corrupted))
    scale = jnp.where(jnp.abs(clean_diff - corrupted_diff) > 1e-6, clean_diff - corrupted_diff, 1.0)
    results = activation_patching(params, config, clean, corrupted, logit_diff, name="hook_resid_pre",
                                  over="layer_pos")  # [n_layer, seq]
    recovered = np.asarray((results - corrupted_diff) / scale)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [tokenizer.decode([t]) for t in np.asarray(clean[0])]
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(labels), 1 + 0.35 * config.n_layer))
    image = ax.imshow(recovered, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_ylabel("layer")
    ax.set_title("patched resid_pre: logit diff recovered")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"clean logit diff {float(clean_diff):.3f}, corrupted {float(corrupted_diff):.3f}; heatmap -> {args.out}")


if __name__ == "__main__":
    main()
