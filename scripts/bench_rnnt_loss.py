#!/usr/bin/env python
"""Benchmark the RNN-T loss implementations on CPU: time and peak memory.

For each implementation (fedasr's ``rnnt_loss``, the plain autograd
``rnnt_loss_reference`` and, when importable, ``torchaudio.functional.rnnt_loss``)
a fresh Python subprocess is started so that measurements do not interfere.
Inside it:

* time: one untimed warm-up forward+backward, then ``--repeats`` timed
  forward-only calls and ``--repeats`` timed forward+backward calls
  (``loss.backward()`` into ``logits.grad``, reset to ``None`` each time);
  the median is reported, in milliseconds.
* memory: the growth of the process's resident set size during the first
  (warm-up) forward+backward, i.e. ``ru_maxrss`` after it minus the current
  RSS (``/proc/self/statm``) just before it, with the inputs already built.
  It counts every byte torch touched for the loss: temporaries, tensors saved
  for backward and the ``logits.grad`` buffer itself (one logits-sized tensor,
  printed as "logits size" for scale).  If an earlier peak (e.g. at import)
  was higher than the baseline, the figure is a lower bound and marked "*".

Usage::

    python scripts/bench_rnnt_loss.py                # B=16 T=200 U=40 V=256
    python scripts/bench_rnnt_loss.py -B 8 -T 400 -U 60 -V 500 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("fedasr", "reference", "torchaudio")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-B", "--batch", type=int, default=16)
    p.add_argument("-T", "--frames", type=int, default=200)
    p.add_argument("-U", "--labels", type=int, default=40, help="max target length")
    p.add_argument("-V", "--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--full-lengths",
        action="store_true",
        help="all utterances use the full T and U (default: lengths drawn in [0.6, 1] x max)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# worker (runs in a fresh subprocess)
# --------------------------------------------------------------------------


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "torchaudio":
        import torchaudio.functional as taf

        def fn(x, y, tl, ul):
            return taf.rnnt_loss(x, y.int(), tl.int(), ul.int(), blank=0, reduction="mean")

    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from fedasr.model.loss import rnnt_loss, rnnt_loss_reference

        impl = rnnt_loss if args.worker == "fedasr" else rnnt_loss_reference

        def fn(x, y, tl, ul):
            return impl(x, y, tl, ul, blank=0, reduction="mean")

    B, T, U, V = args.batch, args.frames, args.labels, args.vocab
    g = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(B, T, U + 1, V, generator=g).requires_grad_(True)
    targets = torch.randint(1, V, (B, U), generator=g, dtype=torch.int32)
    if args.full_lengths:
        t_lens = torch.full((B,), T, dtype=torch.int32)
        u_lens = torch.full((B,), U, dtype=torch.int32)
    else:
        t_lens = (T * (0.6 + 0.4 * torch.rand(B, generator=g))).int().clamp(1, T)
        u_lens = (U * (0.6 + 0.4 * torch.rand(B, generator=g))).int().clamp(0, U)
        t_lens[0], u_lens[0] = T, U  # the padded dims are tight, as torchaudio requires

    def fwd_bwd():
        logits.grad = None
        loss = fn(logits, targets, t_lens, u_lens)
        loss.backward()
        return loss

    # memory: RSS growth during the first forward+backward
    baseline = _current_rss_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = fwd_bwd()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_norm = float(logits.grad.norm())

    fwd_times, fb_times = [], []
    for _ in range(args.repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(logits, targets, t_lens, u_lens)
            fwd_times.append(time.perf_counter() - t0)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fwd_bwd()
        fb_times.append(time.perf_counter() - t0)
    return {
        "impl": args.worker,
        "loss": float(loss),
        "grad_norm": grad_norm,
        "fwd_ms": 1e3 * statistics.median(fwd_times),
        "fwd_bwd_ms": 1e3 * statistics.median(fb_times),
        "peak_extra_mib": max(0, peak_after - baseline) / 1024,
        "lower_bound": peak_before > baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def _available(impl: str) -> bool:
    if impl != "torchaudio":
        return True
    try:
        import torchaudio.functional  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        print(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}", file=sys.stderr)
        return 2
    B, T, U, V = args.batch, args.frames, args.labels, args.vocab
    logits_mib = B * T * (U + 1) * V * 4 / 2**20
    print(
        f"rnnt_loss benchmark: B={B} T={T} U={U} V={V} float32, "
        f"{'full' if args.full_lengths else 'variable'} lengths, repeats={args.repeats}, "
        f"logits size {logits_mib:.1f} MiB"
    )
    results = {}
    for impl in impls:
        if not _available(impl):
            print(f"{impl:>10}: not installed, skipped")
            continue
        cmd = [sys.executable, __file__, "--worker", impl, "-B", str(B), "-T", str(T), "-U", str(U),
               "-V", str(V), "--repeats", str(args.repeats), "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.full_lengths:
            cmd.append("--full-lengths")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{impl:>10}: failed\n{proc.stderr.strip()}")
            continue
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])

    if not results:
        return 1
    first = next(iter(results.values()))
    print(f"torch {first['torch']}, {first['threads']} thread(s)")
    print(f"{'impl':>10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak extra MiB':>15} {'loss':>12} {'|grad|':>10}")
    for r in results.values():
        mark = "*" if r["lower_bound"] else " "
        print(
            f"{r['impl']:>10} {r['fwd_ms']:9.1f} {r['fwd_bwd_ms']:11.1f} {r['peak_extra_mib']:14.1f}{mark} "
            f"{r['loss']:12.5f} {r['grad_norm']:10.6f}"
        )
    if "fedasr" in results:
        ours = results["fedasr"]
        for other in ("reference", "torchaudio"):
            if other in results:
                r = results[other]
                print(
                    f"{other}/fedasr: fwd+bwd time x{r['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}, "
                    f"fwd time x{r['fwd_ms'] / ours['fwd_ms']:.2f}, "
                    f"peak memory x{r['peak_extra_mib'] / max(ours['peak_extra_mib'], 1e-9):.2f}, "
                    f"loss diff {abs(r['loss'] - ours['loss']):.2e}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
