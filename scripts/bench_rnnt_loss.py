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
  RSS (``VmRSS`` of ``/proc/self/status``) just before it, with the inputs already built.
  It counts every byte torch touched for the loss: temporaries, tensors saved
  for backward and the ``logits.grad`` buffer itself (one logits-sized tensor,
  printed as "logits size" for scale).  If an earlier peak (e.g. at import)
  was higher than the baseline, the figure is a lower bound and marked "*".

``--pruned S`` compares the full and the pruned loss *including the joiner*
(``Joiner(enc_dim, pred_dim, joint_dim, V)`` on random encoder/predictor outputs):

* ``full``: ``joiner(enc, pred)`` -> ``(B, T, U+1, V)`` -> ``rnnt_loss``;
* ``full+simple``: the same plus ``0.5 x rnnt_loss_simple`` (what a recipe with
  ``simple_loss_weight: 0.5`` computes with ``train.loss: full``);
* ``pruned``: ``rnnt_loss_simple`` with its occupation -> ``prune_ranges(S)`` ->
  ``joiner.forward_pruned`` -> ``(B, T, S, V)`` -> ``rnnt_loss_pruned`` (+ 0.5 x the simple
  loss): everything ``train.loss: pruned`` computes after the encoder and predictor.

Memory is measured as above, each in a fresh subprocess; time in one further subprocess
that interleaves the three (``--repeats`` rounds of full, full+simple, pruned
forward+backward; medians), so that load from other processes hits them alike. The
ratios printed are pruned / full (the conservative one: the full side without the simple
loss) and pruned / full+simple.

Usage::

    python scripts/bench_rnnt_loss.py                # B=16 T=200 U=40 V=256
    python scripts/bench_rnnt_loss.py -B 8 -T 400 -U 60 -V 500 --repeats 5 --threads 1
    python scripts/bench_rnnt_loss.py --pruned 5 -B 8 -T 200 -U 40 -V 256 --threads 1
    python scripts/bench_rnnt_loss.py --ops -B 16 -T 300 -U 100 -V 256   # aten ops per fwd+bwd
    python scripts/bench_rnnt_loss.py --ops --tree /tmp/old_checkout     # ... of another tree

``--ops`` counts the aten operations (each a kernel launch on a GPU) of one forward and
backward of each loss (``full``: ``rnnt_loss`` on given logits; ``simple``:
``rnnt_loss_simple`` with its occupation; ``pruned``: ``rnnt_loss_pruned`` on a band of 5;
``simple+pruned``: what ``train.loss: pruned`` computes after the model: the simple loss,
``prune_ranges``, the pruned loss), with a dispatch mode, on the CPU; for the full loss both
of its paths (``BATCH_UTTERANCES``: per utterance, the CPU's; whole batch, every other
device's). It also counts them at half the label length: the difference is the share of
the label loop (ops per label position), which only a fused kernel would remove.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchlib import peak_rss_kb, rss_kb, run_isolated

IMPLS = ("fedasr", "reference", "torchaudio")
JOINER_IMPLS = ("full", "full+simple", "pruned")


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
    p.add_argument("--pruned", type=int, default=0, metavar="S",
                   help="compare full vs pruned loss (band of S) including the joiner")
    p.add_argument("--enc-dim", type=int, default=144, help="--pruned: joiner input (encoder) width")
    p.add_argument("--pred-dim", type=int, default=256, help="--pruned: joiner input (predictor) width")
    p.add_argument("--joint-dim", type=int, default=256, help="--pruned: joiner hidden width")
    p.add_argument("--ops", action="store_true", help="count aten ops per forward+backward of each loss")
    p.add_argument("--tree", type=Path, help="--ops: import fedasr from this checkout")
    p.add_argument("--json", type=Path, help="--ops: also write the counts here")
    p.add_argument("--worker", choices=IMPLS + JOINER_IMPLS + ("joiner-time",), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# worker (runs in a fresh subprocess)
# --------------------------------------------------------------------------


def _lengths(args, g):
    import torch

    B, T, U = args.batch, args.frames, args.labels
    if args.full_lengths:
        return torch.full((B,), T, dtype=torch.int32), torch.full((B,), U, dtype=torch.int32)
    t_lens = (T * (0.6 + 0.4 * torch.rand(B, generator=g))).int().clamp(1, T)
    u_lens = (U * (0.6 + 0.4 * torch.rand(B, generator=g))).int().clamp(0, U)
    t_lens[0], u_lens[0] = T, U  # the padded dims are tight, as torchaudio requires
    return t_lens, u_lens


def _joiner_setup(args):
    """Inputs and forward+backward closures of the full / full+simple / pruned losses."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedasr.model.loss import prune_ranges, rnnt_loss, rnnt_loss_pruned, rnnt_loss_simple
    from fedasr.model.transducer import Joiner

    B, T, U, V = args.batch, args.frames, args.labels, args.vocab
    torch.manual_seed(args.seed)
    joiner = Joiner(args.enc_dim, args.pred_dim, args.joint_dim, V)
    g = torch.Generator().manual_seed(args.seed)
    enc = torch.randn(B, T, args.enc_dim, generator=g).requires_grad_(True)
    pred = torch.randn(B, U + 1, args.pred_dim, generator=g).requires_grad_(True)
    am = torch.randn(B, T, V, generator=g).requires_grad_(True)
    lm = torch.randn(B, U + 1, V, generator=g).requires_grad_(True)
    targets = torch.randint(1, V, (B, U), generator=g, dtype=torch.int32)
    t_lens, u_lens = _lengths(args, g)
    leaves = [enc, pred, am, lm, *joiner.parameters()]

    def full():
        return rnnt_loss(joiner(enc, pred), targets, t_lens, u_lens)

    def full_simple():
        return full() + 0.5 * rnnt_loss_simple(am, lm, targets, t_lens, u_lens)

    def pruned():
        simple, occ = rnnt_loss_simple(am, lm, targets, t_lens, u_lens, return_occupation=True)
        ranges = prune_ranges(occ, t_lens, u_lens, args.pruned)
        logits = joiner.forward_pruned(enc, pred, ranges)
        return rnnt_loss_pruned(logits, targets, ranges, t_lens, u_lens) + 0.5 * simple

    fns = {"full": full, "full+simple": full_simple, "pruned": pruned}

    def fwd_bwd(name):
        for x in leaves:
            x.grad = None
        loss = fns[name]()
        loss.backward()
        return loss

    return fwd_bwd, leaves


def _joiner_worker(args) -> dict:
    import torch

    fwd_bwd, leaves = _joiner_setup(args)
    out = {"impl": args.worker, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.worker == "joiner-time":
        times = {name: [] for name in JOINER_IMPLS}
        for name in JOINER_IMPLS:
            fwd_bwd(name)  # warm-up
        for _ in range(args.repeats):
            for name in JOINER_IMPLS:
                t0 = time.perf_counter()
                fwd_bwd(name)
                times[name].append(time.perf_counter() - t0)
        out["fwd_bwd_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        return out
    baseline = rss_kb()
    peak_before = peak_rss_kb()
    loss = fwd_bwd(args.worker)
    peak_after = peak_rss_kb()
    out.update(loss=float(loss), peak_extra_mib=max(0, peak_after - baseline) / 1024,
               lower_bound=peak_before > baseline,
               grad_norm=float(torch.cat([x.grad.flatten() for x in leaves if x.grad is not None]).norm()))
    return out


def _worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker in JOINER_IMPLS + ("joiner-time",):
        return _joiner_worker(args)
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
    t_lens, u_lens = _lengths(args, g)

    def fwd_bwd():
        logits.grad = None
        loss = fn(logits, targets, t_lens, u_lens)
        loss.backward()
        return loss

    # memory: RSS growth during the first forward+backward
    baseline = rss_kb()
    peak_before = peak_rss_kb()
    loss = fwd_bwd()
    peak_after = peak_rss_kb()
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


def _run_worker(args, impl: str):
    cmd = ["--worker", impl, "-B", str(args.batch), "-T", str(args.frames),
           "-U", str(args.labels), "-V", str(args.vocab), "--repeats", str(args.repeats), "--seed", str(args.seed),
           "--pruned", str(args.pruned), "--enc-dim", str(args.enc_dim), "--pred-dim", str(args.pred_dim),
           "--joint-dim", str(args.joint_dim)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.full_lengths:
        cmd.append("--full-lengths")
    return run_isolated(__file__, cmd, label=impl, soft=True)


def _joiner_main(args) -> int:
    B, T, U, V, S = args.batch, args.frames, args.labels, args.vocab, args.pruned
    print(f"full vs pruned RNN-T loss including the joiner: B={B} T={T} U={U} V={V} S={S}, joiner "
          f"{args.enc_dim}+{args.pred_dim} -> {args.joint_dim} -> {V}, float32, "
          f"{'full' if args.full_lengths else 'variable'} lengths, repeats={args.repeats}")
    mem = {impl: _run_worker(args, impl) for impl in JOINER_IMPLS}
    timing = _run_worker(args, "joiner-time")
    if timing is None or any(r is None for r in mem.values()):
        return 1
    ms = timing["fwd_bwd_ms"]
    print(f"torch {timing['torch']}, {timing['threads']} thread(s)")
    print(f"{'impl':>12} {'fwd+bwd ms':>11} {'peak extra MiB':>15} {'loss':>12}")
    for impl, r in mem.items():
        mark = "*" if r["lower_bound"] else " "
        print(f"{impl:>12} {ms[impl]:11.1f} {r['peak_extra_mib']:14.1f}{mark} {r['loss']:12.5f}")
    for base in ("full", "full+simple"):
        print(f"pruned/{base}: peak memory x{mem['pruned']['peak_extra_mib'] / max(mem[base]['peak_extra_mib'], 1e-9):.3f}, "
              f"fwd+bwd time x{ms['pruned'] / ms[base]:.3f}")
    return 0


def _count_ops(fn) -> tuple[int, int]:
    """(aten ops, of which not views) dispatched by ``fn()``: a view (select, slice,
    transpose) launches no kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            Count.kernels += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n, Count.kernels


def _ops_main(args) -> int:
    """Aten ops per forward+backward of each loss, at U and U/2 (the label loop's share)."""
    import torch

    sys.path.insert(0, str((args.tree or Path(__file__).resolve().parents[1]).resolve()))
    from fedasr.model import loss as L

    torch.set_num_threads(args.threads or 1)
    B, T, V, S = args.batch, args.frames, args.vocab, 5
    paths = [None] if not hasattr(L, "BATCH_UTTERANCES") else [False, True]

    def counts(U: int) -> dict:
        g = torch.Generator().manual_seed(args.seed)
        logits = torch.randn(B, T, U + 1, V, generator=g)
        am, lm = torch.randn(B, T, V, generator=g), torch.randn(B, U + 1, V, generator=g)
        band = torch.randn(B, T, S, V, generator=g)
        targets = torch.randint(1, V, (B, U), generator=g, dtype=torch.int32)
        t_lens, u_lens = _lengths(argparse.Namespace(batch=B, frames=T, labels=U, full_lengths=args.full_lengths), g)
        occ = L.rnnt_loss_simple(am, lm, targets, t_lens, u_lens, return_occupation=True)[1]
        ranges = L.prune_ranges(occ, t_lens, u_lens, S)

        def run(make):
            leaves = [x.detach().requires_grad_(True) for x in (logits, am, lm, band)]
            return lambda: make(*leaves).backward()

        def simple_pruned(_, a, m, b):
            simple, o = L.rnnt_loss_simple(a, m, targets, t_lens, u_lens, return_occupation=True)
            r = L.prune_ranges(o, t_lens, u_lens, S)
            return L.rnnt_loss_pruned(b, targets, r, t_lens, u_lens) + 0.5 * simple

        out = {}
        for path in paths:
            if path is not None:
                L.BATCH_UTTERANCES = path
            name = "full" + ("" if path is None else " (whole batch)" if path else " (per utterance)")
            out[name] = _count_ops(run(lambda x, a, m, b: L.rnnt_loss(x, targets, t_lens, u_lens)))
        if paths != [None]:
            L.BATCH_UTTERANCES = None
        out["simple"] = _count_ops(run(lambda x, a, m, b: L.rnnt_loss_simple(a, m, targets, t_lens, u_lens)))
        out["pruned"] = _count_ops(run(lambda x, a, m, b: L.rnnt_loss_pruned(b, targets, ranges, t_lens, u_lens)))
        out["simple+pruned"] = _count_ops(run(simple_pruned))
        return out

    U = args.labels
    full, half = counts(U), counts(U // 2)
    print(f"aten ops per forward+backward, B={B} T={T} U={U} V={V} (pruned: S={S}), "
          f"{'full' if args.full_lengths else 'variable'} lengths; fedasr from {args.tree or 'this tree'}")
    print(f"{'loss':>26} {'ops':>7} {'(no views)':>10} {'at U/2':>7} {'per label position':>19} "
          f"{'label loop share':>17}")
    res = {}
    for k in full:
        (ops, kernels), (ops_h, _) = full[k], half[k]
        per_u = (ops - ops_h) / (U - U // 2)
        share = per_u * U / ops
        res[k] = {"ops": ops, "non_view_ops": kernels, "ops_half_u": ops_h, "ops_per_label_position": per_u,
                  "label_loop_share": share}
        print(f"{k:>26} {ops:7d} {kernels:10d} {ops_h:7d} {per_u:19.1f} {100 * share:16.0f}%")
    if args.json:
        args.json.write_text(json.dumps({"shape": [B, T, U, V], "tree": str(args.tree or ""), "counts": res},
                                        indent=1))
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.ops:
        return _ops_main(args)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    if args.pruned:
        return _joiner_main(args)
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
        r = _run_worker(args, impl)
        if r is not None:
            results[impl] = r

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
