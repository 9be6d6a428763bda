"""Range checks of numeric settings, shared by :class:`~gpt2_jax.training.loop.TrainConfig`,
:class:`~gpt2_jax.training.optim.OptimizerConfig`, :func:`~gpt2_jax.training.evaluate.evaluate` and the CLIs.

Each check raises ``ValueError`` with one line naming the option, what it means, the allowed range and the value
given, e.g. ``--b2 (Adam beta2, the second-moment decay) must be in [0, 1), got 2.0``. The CLIs build their
configs right after parsing, so a bad value stops ``gpt2-jax train`` / ``eval`` before any model or data is
loaded (exit status 2), and the Python API refuses the same values.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["check_int", "check_float", "flag"]

_FLAGS = {"learning_rate": "--lr", "config_overrides": "--config"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def flag(name: str) -> str:
    """The command-line option of a config field (``learning_rate`` -> ``--lr``, ``accum_steps`` -> ``--accum-steps``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _label(name: str, meaning: str) -> str:
    """``--seq-len (seq_len, tokens per window)``: the option, the Python field when it is spelled differently,
    and what it means."""
    parts = ([] if flag(name) == "--" + name else [name]) + ([meaning] if meaning else [])
    return f"{flag(name)} ({', '.join(parts)})" if parts else flag(name)


def check_int(name: str, value, meaning: str = "", low: int | None = None, high: int | None = None,
              optional: bool = False) -> None:
    """``value`` must be an int (not a bool) in ``[low, high]`` (None: unbounded), or None when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{_label(name, meaning)} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bound = f">= {low}"
        elif low is None:
            bound = f"<= {high}"
        else:
            bound = f"in [{low}, {high}]"
        raise ValueError(f"{_label(name, meaning)} must be {bound}, got {value}")


def check_float(name: str, value, meaning: str = "", low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """``value`` must be a real number, finite in float32 (params and optimizer state are float32, so 1e39 would
    silently be inf), in the interval given by ``low``/``high`` (``*_open``: that end excluded)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{_label(name, meaning)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{_label(name, meaning)} must be a finite float32 number, got {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        if high is None:
            bound = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            bound = f"{'<' if high_open else '<='} {high:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{_label(name, meaning)} must be {bound}, got {value:g}")
