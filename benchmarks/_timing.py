"""Timing shared by the benchmarks: the median wall time of a callable over several runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` (the caller warms up and blocks on results inside ``fn``)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
