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


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident set size now (kB, from /proc/self/status); ``RssAnon``: its
    anonymous memory only (no pages of mapped files such as the libraries' code)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples ``RssAnon`` every ``interval`` seconds in a thread while in a ``with`` block;
    ``peak_kb``: the largest sample (torch's kernels release the GIL, so the thread runs)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_kb = 0

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self.peak_kb = rss_kb("RssAnon")

        def sample():
            while not self._stop.wait(self.interval):
                self.peak_kb = max(self.peak_kb, rss_kb("RssAnon"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, rss_kb("RssAnon"))
