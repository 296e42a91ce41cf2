"""Wall-clock timing for the in-process benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def alternating_times(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds per call of each of `fns`, `runs` times each, called in turn (a, b, a, b, ...) so
    that every side sees the same load of a shared machine."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times
