"""What ``gpt2-jax train`` tells the user before and while it works: a time estimate and the compile phase.

Before the first step, :func:`estimate_line` turns the model size, the tokens per step and this machine's measured
matmul rate into a floor on the time per step and for the whole run::

    estimate: 124M params, 8,192 tokens/step -> 6.54 TFLOP/step; at this cpu's measured float32 matmul rate
    (171 GFLOP/s) a step takes at least 38 s, 2,000 steps at least 21.2 h (a floor: ...)

The count is the usual one (Kaplan et al. 2020; nanoGPT's ``estimate_mfu``): a forward pass costs 2 FLOPs per
weight per token, the backward pass twice that, so ``6 N`` per token for the ``N`` weights of the blocks, plus
``6 d V`` for the LM head tied to ``wte`` and ``12 L T d`` for attention's two ``T x T`` products per layer
(computed in full, as the explicit path does). Remat recomputes the forward pass: ``8/6`` of that. A training step
reaches some fraction of a large square GEMM's rate (small and elementwise work, the optimizer, the host), so the
figure is a floor; the progress bar's ETA, from compiled steps only, is the measurement.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from ..config import GPT2Config

__all__ = ["estimate_line", "format_duration", "measured_matmul_tflops", "train_flops_per_token"]


def train_flops_per_token(config: GPT2Config, n_params: int, seq_len: int, remat: str = "none") -> float:
    """Forward + backward FLOPs per trained token of a model with ``n_params`` parameters in all (see the
    module docstring for the count)."""
    d, v, layers = config.n_embd, config.vocab_size, config.n_layer
    embeddings = v * d + config.n_positions * d  # wte, wpe: looked up, not multiplied
    blocks = max(n_params - embeddings, 0)
    forward = 2 * blocks + 2 * d * v + 4 * layers * seq_len * d  # per token
    passes = 4 if remat != "none" else 3  # forward + backward (2x forward) [+ recomputed forward]
    return float(passes * forward)


@functools.lru_cache(maxsize=4)
def measured_matmul_tflops(dtype: str = "float32") -> float:
    """This process's default device's square-GEMM rate in TFLOP/s (:mod:`gpt2_jax.inspect.peaks`; measured once
    per process, about a second)."""
    from ..inspect.peaks import measure_matmul_tflops

    return measure_matmul_tflops(dtype, target_s=0.02, max_n=4096)[0]


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3.2 min``, ``5.5 h``, ``2.1 days``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _si(n: float, unit: str = "") -> str:
    """``124M``, ``6.54 TFLOP``: three significant digits with an SI prefix (a space before a unit)."""
    space = " " if unit else ""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{space}{prefix}{unit}"
    return f"{n:.3g}{space}{unit}"


def estimate_line(config: GPT2Config, params: Any, batch_size: int, seq_len: int, steps: int, *,
                  remat: str = "none", compute_dtype: str = "float32", tflops: float | None = None,
                  platform: str | None = None) -> str:
    """One line estimating the time per step and for ``steps`` steps (a floor; see the module docstring).

    Args:
        config: the architecture.
        params: the params (or their shapes) to count.
        batch_size, seq_len: rows and tokens per row of one optimizer step.
        steps: the steps still to run.
        remat: the remat policy (anything but ``none`` recomputes the forward pass).
        compute_dtype: the matmul dtype whose rate is measured.
        tflops: the matmul rate to assume (default: measured now, :func:`measured_matmul_tflops`).
        platform: the device kind to name (default: the default backend).
    """
    import jax

    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    tokens = batch_size * seq_len
    flops = train_flops_per_token(config, n_params, seq_len, remat) * tokens
    if tflops is None:
        tflops = measured_matmul_tflops(compute_dtype)
    platform = platform or jax.default_backend()
    per_step = flops / (tflops * 1e12)
    return (f"estimate: {_si(n_params)} params, {tokens:,} tokens/step -> {_si(flops, 'FLOP')}/step; at this "
            f"{platform}'s measured {compute_dtype} matmul rate ({_si(tflops * 1e12, 'FLOP/s')}) a step takes at "
            f"least {format_duration(per_step)}, {steps:,} steps at least {format_duration(per_step * steps)} "
            "(a floor: the bar's ETA, from compiled steps, is the measurement)")


class CompilePhase:
    """The first train step, narrated: ``compiling the train step (first call)...`` when it starts, the elapsed
    seconds every ``every`` s while it runs (only on a terminal), and ``compiled ... in X s`` when it ends.

    The first call of a jitted step traces and compiles it before it runs (13 s for the tiny preset, minutes at gpt2
    size on a CPU); without this the progress bar would sit at 0 with a meaningless ETA.
    """

    def __init__(self, log, *, ticker: bool = False, every: float = 10.0):
        self._log, self._ticker, self._every = log, ticker, every
        self._start = 0.0
        self._done = None
        self._thread = None

    def __enter__(self) -> "CompilePhase":
        import threading
        import time

        self._start = time.perf_counter()
        self._log("compiling the train step (first call)...")
        if self._ticker:
            self._done = threading.Event()

            def tick():
                while not self._done.wait(self._every):
                    self._log(f"  still compiling: {format_duration(time.perf_counter() - self._start)}")

            self._thread = threading.Thread(target=tick, name="gpt2-jax-compile-ticker", daemon=True)
            self._thread.start()
        return self

    @property
    def elapsed(self) -> float:
        """Seconds since the phase started."""
        import time

        return time.perf_counter() - self._start

    def __exit__(self, exc_type, *exc) -> None:
        if self._done is not None:
            self._done.set()
        if exc_type is None:
            self._log(f"compiled the train step and ran the first step in {format_duration(self.elapsed)}; "
                      "training (the ETA counts compiled steps only)")
