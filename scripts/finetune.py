"""Fine-tune GPT-2 on a text file with optax: the whole loop in one page, to copy and adapt.

    python scripts/finetune.py --data corpus.txt --out finetuned/                  # gpt2 (downloads once)
    python scripts/finetune.py --data corpus.txt --out tiny/ --from-scratch --steps 300   # offline, tiny model

`gpt2-jax train` does the same with checkpoints, resume, evaluation, metrics and device meshes; this script keeps
only the essentials so that each step is visible.
"""

import argparse

import jax
import jax.numpy as jnp
from tqdm import tqdm

from gpt2_jax.checkpoints.hf_directory import save_hf_directory
from gpt2_jax.checkpoints.pretrained import from_pretrained
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import GPT2Tokenizer
from gpt2_jax.training import (OptimizerConfig, TrainState, WindowLoader, evaluate, load_or_tokenize,
                               make_optimizer, make_train_step)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", required=True, help="a .txt or .jsonl file")
parser.add_argument("--out", required=True, help="where the fine-tuned Hugging Face directory goes")
parser.add_argument("--model", default="gpt2", help="checkpoint to start from (hub id or local directory)")
parser.add_argument("--from-scratch", action="store_true", help="a small random model instead of --model")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--lr", type=float, default=1e-4)
args = parser.parse_args()

# 1. Model: pretrained weights, or a fresh small config.
if args.from_scratch:
    config = GPT2Config(n_positions=args.seq_len, n_embd=128, n_layer=2, n_head=4)
    params, tokenizer = init_params(jax.random.PRNGKey(0), config), GPT2Tokenizer()
else:
    pretrained = from_pretrained(args.model)
    config, params, tokenizer = pretrained.config, pretrained.params, pretrained.tokenizer

# 2. Data: tokenise once into a uint16 memmap; batch `step` is a pure function of (seed, step).
tokens = load_or_tokenize(args.data, args.out + ".tokens", tokenizer)
loader = WindowLoader(tokens, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)

# 3. Optimizer: AdamW (no decay on biases, norms, embeddings), warmup + cosine, clipping at 1.0.
optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=args.lr, warmup_steps=args.steps // 10,
                                                     total_steps=args.steps))
state = TrainState.create(params, optimizer)
train_step = make_train_step(config, optimizer, schedule)  # jitted (state, batch, key) -> (state, metrics)

# 4. Loop: the dropout key of step i is fold_in(key, i), so a rerun is identical.
key = jax.random.PRNGKey(0)
with tqdm(range(args.steps), desc="fine-tuning") as bar:
    for step in bar:
        state, metrics = train_step(state, jnp.asarray(loader.batch(step)), jax.random.fold_in(key, step))
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", lr=f"{float(metrics['lr']):.2e}")

# 5. Evaluate (here on the training text itself) and save as a Hugging Face directory.
result = evaluate(state.params, config, tokens, seq_len=args.seq_len, max_windows=20, progress=False)
print(f"loss {result.loss:.3f}, perplexity {result.perplexity:.1f}")
save_hf_directory(args.out, state.params, config, tokenizer=tokenizer)
print(f"saved to {args.out}: load with gpt2_jax from_pretrained or transformers.GPT2LMHeadModel.from_pretrained")
