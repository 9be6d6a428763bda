"""``gpt2-jax train``: fine-tune a checkpoint or train from scratch; see :mod:`gpt2_jax.training.loop`.

Examples::

    gpt2-jax train --config-preset tiny --data corpus.txt --out run/ --steps 300 --batch-size 8 --seq-len 128
    gpt2-jax train --model gpt2 --data train.jsonl --eval-data valid.jsonl --out run/ --lr 1e-4 --steps 2000
    gpt2-jax train --out run/ --resume                     # continue after a crash, same settings
    gpt2-jax train ... --mesh-model 4 --strategy fsdp     # shard params over 4 of the devices
    gpt2-jax train --random-weights --model gpt2 ...       # from scratch, the gpt2 architecture (= --config-preset)
    gpt2-jax train ... --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 0   # one such line per host
    gpt2-jax train ... --distributed                       # TPU pod slice / SLURM / Open MPI: detected
    python scripts/launch_local.py --num-processes 2 -- train ...   # N local processes, for tests and demos

Before the first step it prints an estimate of the time per step and for the whole run (from the model size, the
tokens per step and this machine's measured matmul rate), then "compiling the train step (first call)..." with
the compile time; the progress bar (ETA from compiled steps only) shows each step's own loss.

Ctrl-C (or SIGTERM) stops at the next step boundary: the step in flight finishes, a checkpoint is saved, and
--resume continues from it. A second Ctrl-C aborts at once, without saving.
"""

from __future__ import annotations

import argparse
import json
import sys


def _override(text: str) -> tuple[str, object]:
    """``key=value`` -> (key, JSON value or string)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def register(subparsers) -> None:
    """Add the ``train`` command."""
    p = subparsers.add_parser(
        "train", help="fine-tune GPT-2 (or train from scratch) with optax; resumable, on 1 or N devices",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only options given on the command line reach TrainConfig
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint to fine-tune: a hub id (gpt2, gpt2-medium, ...) or a local directory")
    g.add_argument("--random-weights", action="store_true",
                   help="train from random weights with the architecture --model names (a preset such as gpt2, or a "
                        "config.json): the same as --config-preset for the released sizes; offline")
    g.add_argument("--config-preset", help="train from scratch: tiny, small, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    g.add_argument("--config", dest="config_overrides", type=_override, action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --config n_layer=2 (repeatable; dropout only for --model)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help="training text (.txt/.md, one document each), .jsonl (one per line) "
                                             "or a token file (.bin)")
    g.add_argument("--eval-data", nargs="+", help="held-out data, same formats")
    g.add_argument("--text-field", help="JSONL field with the text (default: text)")
    g.add_argument("--seq-len", type=int, help="tokens per training window (default: the model's n_positions)")
    g.add_argument("--shuffle", choices=("random", "epoch"),
                   help="random: windows at random offsets (default); epoch: each disjoint window once per epoch")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, final/, loss.png)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100; also at the end and on "
                                                  "Ctrl-C / SIGTERM)")
    g.add_argument("--keep", type=int, help="checkpoints to keep (default 2)")
    g.add_argument("--async-checkpointing", action="store_true", help="write checkpoints in the background")
    g.add_argument("--eval-every", type=int, help="evaluate on --eval-data every N steps (default: at the end)")
    g.add_argument("--eval-windows", type=int, help="windows per evaluation (default 50)")
    g.add_argument("--log-every", type=int, help="metrics line every N steps (default 1)")
    g.add_argument("--no-final", dest="save_final", action="store_false", help="do not export final/ weights")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw loss.png")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help="optimizer steps in total (default 1000)")
    g.add_argument("--batch-size", type=int, help="global rows per step (default 8)")
    g.add_argument("--accum-steps", type=int, help="gradient-accumulation micro-batches per step (default 1)")
    g.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate (default 3e-4)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    g.add_argument("--decay-steps", type=int, help="cosine decay ends here (default: --steps)")
    g.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr (default 0.1)")
    g.add_argument("--b1", type=float, help="Adam beta1 (default 0.9)")
    g.add_argument("--b2", type=float, help="Adam beta2 (default 0.95)")
    g.add_argument("--eps", type=float, help="Adam epsilon (default 1e-8)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay on matmul kernels (default 0.1)")
    g.add_argument("--grad-clip", type=float, help="global gradient-norm clip, 0 to disable (default 1.0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype; params stay float32")
    g.add_argument("--no-dropout", dest="dropout", action="store_false", help="disable dropout")
    g.add_argument("--remat", choices=("none", "full", "dots_saveable", "minimal"),
                   help="recompute each block in the backward pass to save memory: full (least memory), "
                        "dots_saveable / minimal (keep matmul outputs) (default none)")
    g.add_argument("--scan-layers", dest="scan_layers", action="store_true",
                   help="run the blocks under nn.scan (one block compiled: faster compiles for deep models)")
    g.add_argument("--seed", type=int, help="seed of init, data order and dropout (default 0)")
    g.add_argument("--max-consecutive-skips", type=int,
                   help="stop after this many consecutive non-finite steps (default 10)")
    g = p.add_argument_group("LoRA (parameter-efficient fine-tuning)")
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R on a frozen base instead of every weight; final/ is then a "
                        "PEFT adapter directory (default 0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale alpha / R (default 8, PEFT's)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", metavar="REGEX",
                   help="layers to adapt, a regex searched in h.<i>.attn.c_attn, h.<i>.attn.c_proj, h.<i>.mlp.c_fc, "
                        "h.<i>.mlp.c_proj (default c_attn|c_proj|c_fc: all of them)")
    g.add_argument("--merge-lora", action="store_true",
                   help="also write final-merged/: base + adapters as a Hugging Face directory")
    g = p.add_argument_group("devices")
    g.add_argument("--mesh-data", type=int, help="data-axis size (default: devices / --mesh-model)")
    g.add_argument("--mesh-model", type=int, help="model-axis size: FSDP shards or tensor-parallel degree (default 1)")
    g.add_argument("--strategy", choices=("fsdp", "tp"), help="what the model axis does (default fsdp)")
    g = p.add_argument_group("multi-process (jax.distributed; one process per host, see scripts/launch_local.py)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run JAX detects from the environment (TPU pod slices, SLURM, Open MPI)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address; with --num-processes and --process-id (every process the same)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index, 0 .. N-1 (0 hosts the coordinator)")
    g.add_argument("--coordinator-timeout", type=float, metavar="SECONDS",
                   help="give up (exit 2, one line) when the coordinator or the other processes do not answer "
                        "within this time (default 300)")
    p.set_defaults(func=run)


_DISTRIBUTED_OPTIONS = ("distributed", "coordinator", "num_processes", "process_id", "coordinator_timeout")


def _join_if_asked(args: argparse.Namespace) -> None:
    """Join the multi-process run the options describe (before any other JAX call), if any."""
    from ..errors import CLIError
    from .distributed import DistributedSpec, join

    explicit = {k: getattr(args, k) for k in ("coordinator", "num_processes", "process_id") if hasattr(args, k)}
    if not explicit and not getattr(args, "distributed", False):
        if hasattr(args, "coordinator_timeout"):
            raise CLIError("--coordinator-timeout needs --coordinator (or --distributed)")
        return
    spec = DistributedSpec(**explicit, timeout_s=getattr(args, "coordinator_timeout", 300.0))
    if explicit and getattr(args, "distributed", False):
        raise CLIError("--distributed detects the cluster; do not combine it with --coordinator/--num-processes/"
                       "--process-id")
    try:
        join(spec)
    except ValueError as e:
        raise CLIError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Run ``gpt2-jax train``."""
    from ..errors import CLIError
    from .loop import TrainConfig, TrainingError, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", *_DISTRIBUTED_OPTIONS)}
    _join_if_asked(args)
    if "config_overrides" in given:
        given["config_overrides"] = dict(given["config_overrides"])
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None
    if "data" not in given and not given.get("resume"):
        raise CLIError("--data is required (except with --resume)")
    cfg = TrainConfig(**{"data": [], **given})
    try:
        result = train(cfg, explicit=set(given))
    except TrainingError as e:
        raise CLIError(str(e)) from None
    if result.last_loss is not None:
        print(json.dumps({"step": int(result.state.step), "loss": result.last_loss,
                          **({"eval_loss": result.eval["eval_loss"], "eval_perplexity": result.eval["eval_perplexity"]}
                             if result.eval else {})}))
    sys.stdout.flush()
    return 130 if result.interrupted else 0
