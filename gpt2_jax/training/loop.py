"""The training loop behind ``gpt2-jax train``: data, mesh, state, checkpoints, metrics, final export.

Output directory layout (``out/``)::

    run.json          the settings (TrainConfig + model config); --resume reads them back
    metrics.jsonl     one JSON line per step ({"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", ...})
                      and per evaluation ({"step", "eval_loss", "eval_perplexity", ...})
    checkpoints/<N>/  resumable state after N steps (orbax; the newest ``keep`` are kept)
    tokenizer/        the tokenizer files
    data/             the tokenised training / evaluation data (cached while the sources are unchanged)
    final/            the trained weights as a Hugging Face directory (config.json + model.safetensors); with
                      LoRA (--lora-rank) the adapters as a PEFT adapter directory (adapter_config.json +
                      adapter_model.safetensors), and with --merge-lora also final-merged/ (base + adapters, HF)
    loss.png          the loss curve

Resuming: after a crash or ``kill -9`` the run restarts from the newest complete checkpoint; batch ``N`` and the
dropout key of step ``N`` depend only on ``(seed, N)``, and metrics lines after the checkpoint are dropped, so the
resumed run's losses equal an uninterrupted run's. Ctrl-C or SIGTERM stop at the next step boundary after saving a
checkpoint.

Multi-process runs (``jax.distributed``, see :mod:`~gpt2_jax.training.distributed`): every process runs this same
loop over one mesh of all processes' devices and reads only the rows of each batch its devices hold. Process 0
alone holds the directory lock and writes run.json, the tokenised data, metrics, plots and final/; orbax writes
each checkpoint from all processes. Setup failures are agreed on (a process whose peer failed stops too, saying
so), and so is a stop request: all processes stop after the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..atomic import atomic_write_path
from ..checkpoints.adapters import save_adapter
from ..config import GPT2Config
from ..locking import DirectoryLock, LOCK_NAME, describe_takeover
from .. import precision
from ..layers import REMAT_POLICIES
from ..lora import DEFAULT_TARGETS, LoraConfig, init_lora, lora_targets, merge_lora
from ..model import init_params
from ..stacking import params_for
from .checkpointing import CheckpointManager, abstract_state, save_hf_directory
from .data import DataError, WindowLoader, load_or_tokenize
from .distributed import any_process
from .evaluate import evaluate, make_nll_fn
from .narration import CompilePhase, estimate_line
from .optim import OptimizerConfig, check_optimizer_settings, make_optimizer
from .sharding import (batch_sharding, check_batch_size, global_batch, local_batch_rows, make_mesh,
                       state_shardings)
from .step import TrainState, make_train_step
from .validation import check_int, flag

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
RUN_ARTIFACTS = (RUN_FILE, METRICS_FILE, "checkpoints", "tokenizer", "data", "final", "final-merged", "loss.png")

#: Small architectures for training from scratch (``--config-preset``), besides the released GPT-2 sizes.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_positions=256, n_embd=128, n_layer=2, n_head=4),
    "small": dict(n_positions=512, n_embd=384, n_layer=6, n_head=6),
}

# Settings that may differ on --resume. None changes which batches, keys or hyper-parameters a step uses; a new
# mesh only changes the order of floating-point reductions (the checkpoint is resharded on restore).
RESUMABLE_CHANGES = ("steps", "save_every", "keep", "eval_data", "eval_every", "eval_windows", "log_every",
                     "progress", "plot", "max_consecutive_skips", "async_checkpointing", "save_final", "mesh_data",
                     "mesh_model", "strategy", "resume", "overwrite", "merge_lora")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite for too many consecutive steps)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``gpt2-jax train`` needs; ``run.json`` stores it (see the CLI help for each option)."""

    out: str
    data: list[str]
    model: str | None = None  # hub id or local checkpoint (from_pretrained); or None with config_preset
    config_preset: str | None = None  # gpt2 / gpt2-medium / gpt2-large / gpt2-xl / tiny / small: from scratch
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"n_layer": 2}
    random_weights: bool = False  # with model: random weights of its architecture (preset or config.json), offline
    eval_data: list[str] | None = None
    text_field: str = "text"
    seq_len: int | None = None  # default: the model's n_positions
    batch_size: int = 8  # global rows per optimizer step
    accum_steps: int = 1  # micro-batches per step (gradient accumulation)
    steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine length; default: steps (fixed at the first launch)
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    remat: str = "none"  # block rematerialisation: none / full / dots_saveable / minimal (layers.REMAT_POLICIES)
    scan_layers: bool = False  # blocks under nn.scan (params stacked; checkpoints exported per layer)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank only (the base frozen); 0: full fine-tuning
    lora_alpha: float = 8.0  # LoRA scale alpha / rank (PEFT's lora_alpha)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = DEFAULT_TARGETS  # regex over layer names h.<i>.attn.c_attn, h.<i>.mlp.c_fc, ...
    merge_lora: bool = False  # also export final-merged/: base + adapters as a Hugging Face directory
    dropout: bool = True
    seed: int = 0
    shuffle: str = "random"  # random windows, or "epoch": each window once per epoch
    mesh_data: int | None = None  # data-axis size (default: devices / mesh_model)
    mesh_model: int = 1  # model-axis size (FSDP shards / tensor-parallel degree)
    strategy: str = "fsdp"  # fsdp or tp
    save_every: int = 100
    keep: int = 2
    async_checkpointing: bool = False
    eval_every: int = 0  # 0: evaluate only at the end (when eval_data is given)
    eval_windows: int | None = 50  # cap on evaluation windows per evaluation (None: all)
    log_every: int = 1
    max_consecutive_skips: int = 10
    save_final: bool = True
    plot: bool = True
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` (one line naming the option, its meaning and range) for a setting out of range;
        ``seq_len``'s upper bound (the model's ``n_positions``) is checked once the model is known."""
        if not self.out:
            raise ValueError("--out (the run directory) must be given")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        check_int("seq_len", self.seq_len, "tokens per training window", low=1, optional=True)
        check_int("batch_size", self.batch_size, "global rows per step", low=1)
        check_int("accum_steps", self.accum_steps, "micro-batches per step", low=1)
        check_int("steps", self.steps, "optimizer steps in total", low=1)
        check_int("decay_steps", self.decay_steps, "length of the cosine decay", low=1, optional=True)
        check_optimizer_settings(self)
        check_int("seed", self.seed, "random seed")
        check_int("mesh_data", self.mesh_data, "data-axis size", low=1, optional=True)
        check_int("mesh_model", self.mesh_model, "model-axis size", low=1)
        check_int("save_every", self.save_every, "steps between checkpoints", low=1)
        check_int("keep", self.keep, "checkpoints kept; --resume needs at least one", low=1)
        check_int("eval_every", self.eval_every, "steps between evaluations; 0: only at the end", low=0)
        check_int("eval_windows", self.eval_windows, "windows per evaluation", low=1, optional=True)
        check_int("log_every", self.log_every, "steps between metrics lines", low=1)
        check_int("max_consecutive_skips", self.max_consecutive_skips, "non-finite steps in a row before stopping",
                  low=1)
        check_int("lora_rank", self.lora_rank, "LoRA rank; 0: full fine-tuning", low=0)
        if self.lora_rank:
            self.lora_config()  # alpha, dropout, targets checked with their meaning
        elif self.merge_lora:
            raise ValueError("--merge-lora needs --lora-rank (a LoRA run)")
        for name, allowed in (("dtype", ("float32", "bfloat16")), ("remat", tuple(REMAT_POLICIES)),
                              ("shuffle", ("random", "epoch")), ("strategy", ("fsdp", "tp"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def __repr__(self) -> str:
        """Only the settings that differ from the defaults."""
        from ..reprs import short_dataclass_repr

        return short_dataclass_repr(self)

    def lora_config(self) -> LoraConfig | None:
        """The run's :class:`~gpt2_jax.lora.LoraConfig`, or None for full fine-tuning (``lora_rank`` 0)."""
        if not self.lora_rank:
            return None
        try:
            return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                              targets=self.lora_targets)
        except ValueError as e:
            raise ValueError(f"--lora-*: {e}") from None

    def optimizer_config(self) -> OptimizerConfig:
        """The :class:`OptimizerConfig` these settings describe."""
        return OptimizerConfig(
            learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            total_steps=self.decay_steps or self.steps, min_lr_ratio=self.min_lr_ratio, b1=self.b1, b2=self.b2,
            eps=self.eps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
        )


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final ``state``, its ``config``, the output directory, the last
    training loss, the evaluation (if any) and whether a signal stopped the run early."""

    state: TrainState
    config: GPT2Config
    out: Path
    last_loss: float | None
    eval: dict | None
    interrupted: bool = False


# --------------------------------------------------------------------------------------------- setup helpers
def _log(msg: str) -> None:
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)


def resolve_model_config(cfg: TrainConfig) -> tuple[GPT2Config, Any, Any]:
    """``(config, params or None, tokenizer)`` for ``cfg.model`` (loaded) or ``cfg.config_preset`` (params None:
    initialised later from the seed)."""
    from ..tokenizer import GPT2Tokenizer

    if (cfg.model is None) == (cfg.config_preset is None):
        raise ValueError("give exactly one of --model (a checkpoint to fine-tune) and --config-preset (from scratch)")
    if cfg.config_preset is not None:
        name = cfg.config_preset
        base = TRAINING_PRESETS.get(name)
        try:
            config = GPT2Config(**{**base, **cfg.config_overrides}) if base is not None else \
                GPT2Config.from_preset(name, **cfg.config_overrides)
        except TypeError as e:
            raise ValueError(f"bad --config override: {e}") from None
        except ValueError as e:
            known = ", ".join([*TRAINING_PRESETS, "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
            raise ValueError(f"{e} (presets: {known})" if "preset" in str(e) else str(e)) from None
        return config, None, GPT2Tokenizer()
    if cfg.random_weights:  # initialised later from the seed, like a preset
        from ..checkpoints.random_weights import architecture

        try:
            config = architecture(cfg.model)
            config = config.replace(**cfg.config_overrides) if cfg.config_overrides else config
        except (OSError, TypeError, ValueError) as e:
            raise ValueError(f"--random-weights --model {cfg.model!r}: {e}") from None
        _log(f"note: RANDOM WEIGHTS: training starts from random weights (seed {cfg.seed}) with the architecture "
             f"of {cfg.model}; nothing was loaded")
        return config, None, GPT2Tokenizer()
    from ..checkpoints.pretrained import from_pretrained

    try:
        loaded = from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {cfg.model!r}: {e}") from None
    config = loaded.config
    if cfg.config_overrides:
        allowed = {"resid_pdrop", "embd_pdrop", "attn_pdrop"}
        bad = set(cfg.config_overrides) - allowed
        if bad:
            raise ValueError(f"a pretrained model's architecture is fixed; only {sorted(allowed)} may be overridden, "
                             f"not {sorted(bad)}")
        config = config.replace(**cfg.config_overrides)
    return config, loaded.params, loaded.tokenizer


def prepare_output_dir(cfg: TrainConfig) -> bool:
    """Check ``cfg.out`` against --resume / --overwrite; returns True when an existing run is resumed.

    Nothing is deleted here: with --overwrite the old run's files are removed by :func:`clear_run` once the new
    settings, model and data have been checked.

    Raises:
        ValueError: the directory holds another run (or other files) and neither flag allows using it.
    """
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    has_run = (out / RUN_FILE).is_file()
    contents = [p.name for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if cfg.resume:
        if not has_run and contents:
            raise ValueError(f"--resume: {out} is not empty but holds no gpt2-jax run ({RUN_FILE} missing)")
        return has_run
    if has_run or contents:
        if not cfg.overwrite:
            what = "holds another training run" if has_run else "is not empty"
            raise ValueError(f"output directory {out} {what}; pass --resume to continue it or --overwrite to "
                             "replace it")
    return False


def clear_run(out: Path) -> None:
    """Remove a previous run's files from ``out`` (only those: other files, and the tokenised-data cache, which
    is keyed by its sources' sizes and mtimes, stay)."""
    if jax.process_index() == 0:
        for name in RUN_ARTIFACTS:
            if name == "data":
                continue
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _merge_resume(cfg: TrainConfig, saved: dict, explicit: set[str] | None) -> TrainConfig:
    """The saved run's settings, with the allowed explicit changes from ``cfg``; other differences are errors."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = dict(saved["train"])
    problems = []
    for name in fields:
        new, old = getattr(cfg, name), merged.get(name)
        if name in RESUMABLE_CHANGES or name == "out":
            if explicit is None or name in explicit or name in ("resume", "overwrite", "out"):
                merged[name] = new
            continue
        if (explicit is not None and name not in explicit) or (name == "decay_steps" and new is None):
            continue
        if new != old:
            problems.append(f"{name}: run has {old!r}, command line gives {new!r}")
    if problems:
        raise ValueError("--resume must continue the same run; these settings differ (drop them or start a new "
                         "run):\n  " + "\n  ".join(problems))
    return TrainConfig(**{k: v for k, v in merged.items() if k in fields})


def _write_json(path: Path, data: Any) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines after ``last_step`` (steps the resumed run will redo), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    with atomic_write_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _check_vocab(tokens: np.ndarray, config: GPT2Config, what: str) -> None:
    top = int(np.max(tokens)) if len(tokens) else 0
    if top >= config.vocab_size:
        raise DataError(f"the {what} data holds token id {top} but the model's vocabulary has {config.vocab_size} "
                        "entries")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Draw the training (and evaluation) loss curve to a PNG, atomically; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no loss curve (pip install matplotlib)")
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("finite", 1)]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_write_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path


@jax.jit
def _all_finite(tree) -> jax.Array:
    """True iff every element of every floating leaf is finite (one fused reduction per leaf)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def _refuse_non_finite_weights(step: int, m: dict, last_checkpoint: int | None) -> None:
    """Stop the run: step ``step`` produced NaN/inf weights (nothing from it on is saved or exported)."""
    why = ("its loss and gradients were finite, so the optimizer update overflowed"
           if m.get("finite", 1) else "its loss or gradients were not finite")
    kept = f"the newest checkpoint is step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint"
    raise TrainingError(
        f"step {step} produced non-finite weights ({why}; lr {m.get('lr', float('nan')):.3g}); stopped without "
        f"saving or exporting them ({kept}). Lower --lr or check the optimizer settings.")


class _StopFlag:
    """SIGINT / SIGTERM -> stop at the next step boundary, after saving a checkpoint (a second Ctrl-C raises
    KeyboardInterrupt at once: no checkpoint). ``in_flight`` is the step being computed (1-based), for the message."""

    def __init__(self):
        self.signal: int | None = None
        self.in_flight: int | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        step = f"step {self.in_flight}" if self.in_flight is not None else "the current step"
        _log(f"{signal.Signals(signum).name}: stopping after {step}, with a checkpoint (Ctrl-C again aborts at once, "
             "without saving)")

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _gather(tree):
    """Host numpy copies of (possibly sharded, possibly multi-host) arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    optimizer: Any
    schedule: Any
    state_shape: Any
    shardings: Any
    batch_sharding: Any
    create_state: Any
    train_step: Any
    nll_fn: Any


@functools.lru_cache(maxsize=4)
def _compiled_functions(config: GPT2Config, opt: OptimizerConfig, mesh, strategy: str, accum_steps: int, dtype: str,
                        dropout: bool, remat: str = "none", lora: LoraConfig | None = None) -> _Compiled:
    """Optimizer, shardings and jitted functions for these settings, cached so that repeated ``train`` calls in one
    process (sweeps, notebooks, tests) reuse the compiled programs. ``create_state(params, key)`` draws the
    LoRA adapters from ``key`` (unused without ``lora``)."""
    optimizer, schedule = make_optimizer(opt)

    def create(params, key):
        if lora is None:
            return TrainState.create(params, optimizer)
        return TrainState.create_lora(params, init_lora(key, params, lora), optimizer)

    state_shape = jax.eval_shape(lambda: create(init_params(jax.random.PRNGKey(0), config), jax.random.PRNGKey(0)))
    shardings = state_shardings(state_shape, optimizer, mesh, strategy, lora=lora is not None)
    b_sharding = batch_sharding(mesh, strategy)
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    return _Compiled(
        optimizer=optimizer, schedule=schedule, state_shape=state_shape, shardings=shardings,
        batch_sharding=b_sharding,
        create_state=jax.jit(create, out_shardings=shardings),
        train_step=make_train_step(config, optimizer, schedule, accum_steps=accum_steps, compute_dtype=compute,
                                   dropout=dropout, state_sharding=shardings, batch_sharding=b_sharding, remat=remat,
                                   lora=lora),
        nll_fn=make_nll_fn(config, compute),
    )


def _agree(what: str, action, *args, **kwargs):
    """``action(*args, **kwargs)`` on this process, then agree with the other processes on whether it failed: a
    process whose own part worked but whose peer failed raises :class:`TrainingError` naming ``what`` (a single
    process just runs ``action``). Every process must reach each ``_agree`` in the same order."""
    try:
        result, failed = action(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the agreement
        result, failed = None, e
    if any_process(failed is not None):
        if failed is not None:
            raise failed
        raise TrainingError(f"another process failed while {what}; see its output")
    return result


def _only_main(action, *args, **kwargs):
    """``action(*args, **kwargs)`` on process 0 only (None elsewhere)."""
    return action(*args, **kwargs) if jax.process_index() == 0 else None


# ------------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, explicit: set[str] | None = None) -> TrainResult:
    """Run (or resume) a training run described by ``cfg``; see the module docstring for the outputs.

    The run directory is locked for the whole run (:class:`~gpt2_jax.locking.DirectoryLock`, a ``.gpt2-jax.lock``
    file inside it): a second run, ``--resume`` and ``--overwrite`` included, fails at once naming the holder's
    PID and host; the lock of a killed run is taken over. A new run that fails before its first step (bad data,
    a model that does not load, Ctrl-C while compiling) removes what it created, so the corrected command runs
    as it is.

    Args:
        cfg: the settings.
        explicit: names of the settings the user set explicitly (the CLI passes them), so that ``--resume``
            can tell a deliberate change from a default; None compares every field.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError / DataError: bad settings or data (messages name the problem).
        DirectoryLockedError: another live process is writing to ``cfg.out``.
        TrainingError: the loss stayed non-finite for ``max_consecutive_skips`` steps, or a step produced
            non-finite weights (nothing from that step on is saved or exported).
    """
    cfg.validate()  # a dataclasses.replace'd or mutated config too
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    is_main = jax.process_index() == 0
    existed = out.is_dir()
    before = set(os.listdir(out)) if existed else set()
    lock = DirectoryLock.for_directory(out, what="training run")
    _agree("locking the run directory", _only_main, lock.acquire)
    run_state = {"resuming": False, "started": False, "cleared": False}
    try:
        if lock.took_over:
            _log(describe_takeover(lock.took_over))
        return _train(cfg, explicit, run_state)
    except BaseException:
        if is_main and not run_state["resuming"] and not run_state["started"]:
            _remove_failed_start(out, existed, set() if run_state["cleared"] else before)
        raise
    finally:
        lock.release()


def _export_lora(out: Path, state: TrainState, config: GPT2Config, lora: LoraConfig, cfg: TrainConfig, tokenizer,
                 is_main: bool) -> None:
    """``final/`` as a PEFT adapter directory (``base_model_name_or_path``: the ``--model`` given) and, with
    ``--merge-lora``, ``final-merged/``: base + adapters as a Hugging Face directory."""
    adapters = _gather(state.params["lora"])
    base_name = cfg.model or cfg.config_preset or "random"
    if is_main:
        save_adapter(out / "final", adapters, lora, base_model=str(base_name))
        _log(f"final adapter: {out / 'final'} (PEFT LoRA format, base {base_name})")
    if cfg.merge_lora:
        merged = merge_lora(_gather(state.params["params"]), adapters, lora)
        if is_main:
            save_hf_directory(out / "final-merged", merged, config, tokenizer=tokenizer)
            _log(f"merged weights: {out / 'final-merged'} (Hugging Face format)")


def _remove_failed_start(out: Path, existed: bool, before: set[str]) -> None:
    """Remove what a new run that failed before its first step created in ``out`` (the whole directory if the
    run created it), so that it cannot block the corrected rerun."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in RUN_ARTIFACTS:
        path = out / name
        if name in before:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def _train(cfg: TrainConfig, explicit: set[str] | None, run_state: dict) -> TrainResult:
    """The body of :func:`train`, run under the directory lock; updates ``run_state`` (``resuming``, ``cleared``:
    an --overwrite removed the old run, ``started``: the first step was dispatched).

    """
    out = Path(cfg.out)
    is_main = jax.process_index() == 0
    resuming = _agree("checking the output directory", prepare_output_dir, cfg)  # before process 0 writes there
    run_state["resuming"] = resuming
    if resuming:
        saved = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        cfg = _merge_resume(cfg, saved, explicit)
        config = GPT2Config.from_hf_dict(saved["model_config"])
        from ..tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer.from_directory(out / "tokenizer")
        params = None
    else:
        if cfg.resume and cfg.model is None and cfg.config_preset is None:
            raise ValueError(f"--resume: {out} holds no training run to resume ({RUN_FILE} missing); to start one "
                             "there give --model or --config-preset, and --data")
        config, params, tokenizer = resolve_model_config(cfg)
        cfg = dataclasses.replace(cfg, decay_steps=cfg.decay_steps or cfg.steps)
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"--remat must be one of {', '.join(REMAT_POLICIES)}, got {cfg.remat!r}")
    note = precision.precision_note(cfg.dtype) if is_main else None
    if note:
        _log(note)
    # run.json keeps the Hugging Face config (no layout fields): the layout comes from the run's settings.
    config = config.replace(scan_layers=cfg.scan_layers)
    if params is not None:
        params = params_for(config, params)
    seq_len = cfg.seq_len or config.n_positions
    if not 0 < seq_len <= config.n_positions:
        raise ValueError(f"--seq-len {seq_len} must be in [1, n_positions={config.n_positions}]")
    if cfg.steps <= 0 or cfg.batch_size <= 0 or cfg.save_every <= 0:
        raise ValueError("--steps, --batch-size and --save-every must be positive")
    mesh = make_mesh(cfg.mesh_data, cfg.mesh_model)
    check_batch_size(cfg.batch_size, mesh, cfg.strategy, cfg.accum_steps)

    # Data (tokenised into out/data once, by process 0; the others then read that cache).
    def load_data():
        tokens = load_or_tokenize(cfg.data, out / "data", tokenizer, cfg.text_field,
                                  progress=cfg.progress and is_main)
        _check_vocab(tokens, config, "training")
        eval_tokens = None
        if cfg.eval_data:
            eval_tokens = load_or_tokenize(cfg.eval_data, out / "data" / "eval", tokenizer, cfg.text_field,
                                           progress=cfg.progress and is_main)
            _check_vocab(eval_tokens, config, "evaluation")
        return tokens, eval_tokens

    data = _agree("tokenising the data", _only_main, load_data)
    tokens, eval_tokens = _agree("reading the tokenised data", (lambda: data) if is_main else load_data)
    init_key, dropout_key, data_key = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    loader = WindowLoader(tokens, cfg.batch_size, seq_len, seed=np.asarray(data_key), shuffle=cfg.shuffle)
    if cfg.overwrite:  # everything checked: now the old run may go
        clear_run(out)
        run_state["cleared"] = True

    # Run files.
    def write_run_files():
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out / "tokenizer")
        _write_json(out / RUN_FILE, {"train": dataclasses.asdict(cfg), "model_config": config.to_hf_dict()})

    if not resuming:
        _agree("writing the run files", _only_main, write_run_files)

    # State: sharded over the mesh, from the newest checkpoint or fresh.
    lora = cfg.lora_config()
    if lora is not None:
        lora_targets(jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config)), lora.targets)  # named
    compiled = _compiled_functions(config, cfg.optimizer_config(), mesh, cfg.strategy, cfg.accum_steps, cfg.dtype,
                                   cfg.dropout, cfg.remat, lora)
    optimizer, schedule, shardings, b_sharding = (compiled.optimizer, compiled.schedule, compiled.shardings,
                                                  compiled.batch_sharding)
    state_shape = compiled.state_shape
    ckpt = CheckpointManager(out / "checkpoints", max_to_keep=cfg.keep, async_save=cfg.async_checkpointing)
    if resuming and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state(state_shape, shardings))
        if meta.get("dropout_key") != np.asarray(dropout_key).tolist():
            raise TrainingError("the checkpoint's rng key does not match the run's seed")
        _log(f"resuming {out} from step {int(state.step)}")
    else:
        if resuming:
            _log(f"{out} has no complete checkpoint yet: starting at step 0")
            if cfg.model is not None:
                params = resolve_model_config(cfg)[1]
        if params is None:
            params = init_params(init_key, config)
        state = compiled.create_state(params, jax.random.fold_in(init_key, 1))
        del params
    start = int(jax.device_get(state.step))
    if is_main:
        _truncate_metrics(out / METRICS_FILE, start)

    train_step = compiled.train_step
    nll_fn = compiled.nll_fn

    def meta(step: int) -> dict:
        return {"seed": cfg.seed, "data_position": {"step": step, "samples": step * cfg.batch_size,
                                                    "epoch": loader.epoch_of(step)},
                "dropout_key": np.asarray(dropout_key).tolist(), "tokens_seen": step * cfg.batch_size * seq_len}

    def model_params(state: TrainState):
        """The weights the model computes with: the base with the adapters merged in for a LoRA run."""
        if lora is None:
            return state.params
        return merge_lora(state.params["params"], state.params["lora"], lora)

    def run_eval(step: int) -> dict:
        result = evaluate(model_params(state), config, eval_tokens, seq_len=seq_len, batch_size=cfg.batch_size,
                          max_windows=cfg.eval_windows, progress=False, nll_fn=nll_fn)
        record = {"step": step, "eval_loss": result.loss, "eval_perplexity": result.perplexity,
                  "eval_tokens": result.n_tokens}
        _log(f"step {step}: eval loss {result.loss:.4f}, perplexity {result.perplexity:.2f}")
        return record

    from tqdm.auto import tqdm

    tokens_per_step = cfg.batch_size * seq_len
    metrics_file = open(out / METRICS_FILE, "a", encoding="utf-8") if is_main else None
    last_loss, last_eval, consecutive_skips = None, None, 0
    interrupted = False
    show_bar = cfg.progress and is_main
    bar = None  # opened after the first (compiling) step, so that its ETA counts compiled steps only
    postfix: dict = {}
    recent: list[tuple[int, float]] = []  # (step, wall time) of the last few logged steps, for tokens/s
    t0 = time.perf_counter()

    def emit(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def finish_step(step: int, metrics) -> None:
        """Log the metrics of ``step`` (1-based) once they are on the host."""
        nonlocal last_loss, consecutive_skips
        m = {k: v.item() for k, v in jax.device_get(metrics).items()}
        if not m.pop("params_finite", True):
            _refuse_non_finite_weights(step, m, ckpt.latest_step())
        now = time.perf_counter()
        recent.append((step, now))
        del recent[:-11]
        rate = (tokens_per_step * (recent[-1][0] - recent[0][0]) / (recent[-1][1] - recent[0][1])
                if len(recent) > 1 and recent[-1][1] > recent[0][1] else float("nan"))
        consecutive_skips = 0 if m["finite"] else consecutive_skips + 1
        if m["finite"]:
            last_loss = m["loss"]
        if step % cfg.log_every == 0 or step == cfg.steps or not m["finite"]:
            emit({"step": step, **m, "tokens": step * tokens_per_step, "tokens_per_s": rate,
                  "epoch": loader.epoch_of(step), "elapsed_s": now - t0})
        postfix.update(loss=f"{m['loss']:.4f}", tok_s=f"{rate:,.0f}" if math.isfinite(rate) else "-")
        if bar is not None:
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)  # redraws with this step's loss
        if consecutive_skips >= cfg.max_consecutive_skips:
            raise TrainingError(
                f"loss or gradients were non-finite for {consecutive_skips} consecutive steps (last: step {step}); "
                "those updates were skipped. Lower --learning-rate, use --dtype float32 or check the data.")

    my_rows = local_batch_rows(b_sharding, cfg.batch_size)  # the rows this process's devices hold

    def read_batch(step: int):
        return global_batch(loader.batch(step, rows=my_rows), b_sharding, cfg.batch_size)  # [batch, seq_len + 1]

    if is_main and start < cfg.steps:
        try:
            _log(estimate_line(config, state_shape.params, cfg.batch_size, seq_len, cfg.steps - start,
                               remat=cfg.remat, compute_dtype=precision.compute_dtype(cfg.dtype, state.params)))
        except Exception as e:  # an estimate must never stop a run
            _log(f"(no time estimate: {e})")

    # One step in flight at a time: each step's metrics are fetched (so the bar shows that step's loss) and a
    # stop request is checked before the next step is dispatched, so Ctrl-C stops after the step it interrupts.
    # The next batch is read while the current step runs.
    try:
        with _StopFlag() as stop:
            batch = read_batch(start) if start < cfg.steps else None
            for step in range(start, cfg.steps):
                if any_process(stop.signal is not None):  # arrived between two steps: nothing is in flight
                    if ckpt.latest_step() != step:
                        ckpt.save(state, meta(step))
                    interrupted = True
                    break
                stop.in_flight = step + 1
                phase = CompilePhase(_log, ticker=show_bar and sys.stderr.isatty()) if step == start and is_main \
                    else contextlib.nullcontext()
                with phase:
                    state, metrics = train_step(state, batch, jax.random.fold_in(dropout_key, step))
                    run_state["started"] = True
                    trained = state.params["lora"] if lora is not None else state.params
                    metrics = {**metrics, "params_finite": _all_finite(trained)}  # checked in finish_step
                    batch = read_batch(step + 1) if step + 1 < cfg.steps else None
                    finish_step(step + 1, metrics)  # waits for this step
                if step == start and show_bar:
                    bar = tqdm(total=cfg.steps, initial=step + 1, desc="training", unit="step", dynamic_ncols=True)
                    bar.set_postfix(postfix, refresh=True)
                done = step + 1
                stopping = any_process(stop.signal is not None)  # every process stops after the same step
                boundary = done % cfg.save_every == 0 or done == cfg.steps or stopping
                evaluate_now = eval_tokens is not None and cfg.eval_every and done % cfg.eval_every == 0
                if evaluate_now and done != cfg.steps:
                    emit(run_eval(done))
                if boundary:
                    ckpt.save(state, meta(done))
                if stopping:
                    interrupted = True
                    break
        if not interrupted and eval_tokens is not None:
            last_eval = run_eval(int(jax.device_get(state.step)))
            emit(last_eval)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        if metrics_file is not None:
            metrics_file.close()

    final_step = int(jax.device_get(state.step))
    if not interrupted and cfg.save_final and lora is not None:
        _export_lora(out, state, config, lora, cfg, tokenizer, is_main)
    elif not interrupted and cfg.save_final:
        host_params = _gather(state.params)
        if is_main:
            save_hf_directory(out / "final", host_params, config, tokenizer=tokenizer)
            _log(f"final weights: {out / 'final'} (Hugging Face format)")
    if is_main and cfg.plot and (out / METRICS_FILE).exists():
        plot_losses(out / METRICS_FILE, out / "loss.png")
    _log(f"{'stopped' if interrupted else 'finished'} at step {final_step}; metrics: {out / METRICS_FILE}")
    return TrainResult(state, config, out, last_loss, last_eval, interrupted)
