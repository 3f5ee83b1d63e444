"""Helpers shared by the benchmark scripts (run as `python scripts/bench_*.py`)."""

from __future__ import annotations

import time
from typing import Callable


def best_time(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeat`` timed calls of ``fn`` (seconds): the least disturbed run."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def rss_kb() -> int:
    """This process's resident set size now (kB, from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
