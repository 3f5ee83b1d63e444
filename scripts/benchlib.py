"""Helpers shared by the benchmark scripts (run as `python scripts/bench_*.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Sequence


def best_time(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeat`` timed calls of ``fn`` (seconds): the least disturbed run."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def rss_kb(field: str = "VmRSS", pid: int | str = "self") -> int:
    """A process's resident set size now (kB, from /proc/PID/status; this process by
    default); ``RssAnon``: its anonymous memory only (no pages of mapped files such as the
    libraries' code). 0 when the process has no such line (a zombie)."""
    with open(f"/proc/{pid}/status") as f:
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


def peak_rss_kb() -> int:
    """This process's peak resident set size so far (kB, ``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def synthetic_batch(B: int, T: int, U: int, V: int, seed: int, num_features: int = 80):
    """A random training batch: ``B`` utterances of up to ``T`` frames (the first exactly
    ``T``, the others in [T/2, T]) with up to ``U`` tokens of a ``V``-symbol vocabulary."""
    import torch

    from fedasr.data.batching import Batch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    lens[0] = T
    ulens = torch.randint(U // 2, U + 1, (B,), generator=g)
    ulens[0] = U
    return Batch([str(i) for i in range(B)], [""] * B, torch.randn(B, T, num_features, generator=g), lens,
                 torch.randint(1, V, (B, U), generator=g), ulens)


def run_isolated(script: str, args: Sequence[str], *, label: str, env: dict | None = None,
                 soft: bool = False) -> dict | None:
    """Run ``python SCRIPT ARGS`` in a fresh process (its memory peak is its own, nothing
    is shared with earlier measurements) and return the JSON object its last stdout line
    holds; ``env``: variables added to this process's environment (e.g. one thread). A
    failed child ends the benchmark with the last line of its stderr, or with ``soft``
    prints its stderr and returns None."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if soft:
            print(f"{label:>10}: failed\n{err}")
            return None
        raise SystemExit(f"{label} failed: {err.splitlines()[-1] if err else f'exit status {proc.returncode}'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
