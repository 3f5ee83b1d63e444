#!/usr/bin/env python
"""Benchmark of the federated engines.

1. Overhead: (round wall time - sum of client compute time) / round wall time, for the
   `tiny` model on a speaker-sharded federation. Wall time covers everything the engine
   does per round: sampling, manifest loading, payload encoding/decoding, aggregation,
   the server step and the per-round checkpoint; client compute is what each client
   reports (from receiving its message to having encoded its reply). Goal: <= 5%
   embedded. With ``--engine flower`` the same run goes through `fedasr train --engine
   flower` on loopback (SuperLink + 2 SuperNodes with warm client workers; 2 clients x 20
   local steps, in parallel), interleaved with embedded runs: the Flower clients' compute
   against embedded's for the same messages (goal <= 1.1x), and the round's wall time
   beyond its longest client (goal <= 10%).
2. Memory: peak RSS of a run whose federation has 10 vs 1,000 clients, every client
   taking part in the round with 1 local step (cheap clients), so the server must stream
   1,000 updates. Goal: growth <= 10%.

Each measurement runs in a fresh subprocess. Usage:

    python scripts/bench_runner.py --corpus demo/corpus/LibriSpeech [--work /tmp/bench]
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


def child(fed: str, out: str, overrides: list[str]) -> None:
    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.runner import Runner

    cfg = load_config(None, overrides)
    runner = Runner(out, Federation(fed), cfg)
    runner.start(overwrite=True)
    t0 = time.perf_counter()
    rows = runner.run_rounds()
    wall = time.perf_counter() - t0
    client = sum(r["client_time"] for r in rows)
    print(json.dumps({"wall": wall, "client_time": client, "rounds": len(rows),
                      "clients": sum(len(r["clients"]) for r in rows),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(fed: Path, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", str(fed), str(out), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def shard(corpus: Path, out: Path, args: list[str]) -> Path:
    if not (out / "federation.yaml").is_file():
        subprocess.run([sys.executable, "-m", "fedasr.cli", "shard", "--corpus", str(corpus), "--train-split",
                        "train", "--vocab-size", "128", "--out", str(out), "--overwrite", *args],
                       check=True, capture_output=True)
    return out


def _train(fed: Path, out: Path, args: list[str], extra: list[str]) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedasr.cli", "train", "--federation", str(fed), "--out", str(out),
                    "--overwrite", *extra, *args], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def flower(a) -> None:
    """Embedded and Flower (2 SuperNodes, warm client workers) on the same messages,
    interleaved ``--repeats`` times; every client runs with one thread in both."""
    fed = shard(a.corpus, a.work / "fed-speaker", ["--by", "speaker"])
    sets = [f"fl.rounds={a.rounds}", "fl.clients_per_round=2", "fl.local_steps=20", "eval.every=1000",
            "keep_checkpoints=1", "train.max_duration=40"]
    args = [x for s in sets for x in ("--set", s)]
    ratios, overheads, emb_over, starts = [], [], [], []
    for rep in range(a.repeats):
        emb, _ = _train(fed, a.work / f"run-embedded-{rep}", args, [])
        flw, total = _train(fed, a.work / f"run-flower-{rep}", args, ["--engine", "flower", "--slots", "2"])
        assert [r["clients"] for r in emb] == [r["clients"] for r in flw]  # the same messages
        warm = slice(1, None) if len(emb) > 1 else slice(None)  # round 1: the workers load model and data
        ce = sum(sum(r["client_times"]) for r in emb[warm])
        cf = sum(sum(r["client_times"]) for r in flw[warm])
        wall_e = sum(r["round_time"] - r.get("eval_time", 0.0) for r in emb[warm])
        wall_f = sum(r["round_time"] - r.get("eval_time", 0.0) for r in flw[warm])
        crit = sum(max(r["client_times"]) for r in flw[warm])  # 2 SuperNodes: the clients run in parallel
        ratios.append(cf / ce)
        overheads.append((wall_f - crit) / wall_f)
        emb_over.append((wall_e - ce) / wall_e)
        starts.append(total - sum(r["round_time"] for r in flw))
        r1 = flw[0]
        print(f"repeat {rep + 1}: embedded {wall_e / len(emb[warm]):5.1f} s/round (clients {ce:5.1f} s, overhead "
              f"{100 * emb_over[-1]:4.1f}%); flower, 2 SuperNodes: {wall_f / len(flw[warm]):5.1f} s/round, clients "
              f"{cf:5.1f} s ({cf / ce:.2f}x embedded), critical path {crit:5.1f} s -> overhead "
              f"{100 * overheads[-1]:4.1f}%; round 1 {r1['round_time']:.1f} s (clients "
              f"{max(r1['client_times']):.1f} s); start-up and shut-down {starts[-1]:.0f} s", flush=True)
    print(f"median of {a.repeats} (rounds 2-{a.rounds}, {a.rounds - 1} x 2 clients x 20 steps, tiny): Flower clients' "
          f"compute {_median(ratios):.2f}x embedded (goal <= 1.1x); Flower round overhead beyond the clients' compute "
          f"{100 * _median(overheads):.1f}% (goal <= 10%); embedded {100 * _median(emb_over):.1f}%")
    print("(overhead = (round wall time - the round's longest client) / round wall time: with 2 SuperNodes the 2 "
          "clients run in parallel, one thread each; the machine is shared, so runs are interleaved)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="LibriSpeech-layout root with a 'train' split")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedasr-bench-runner"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--engine", choices=("embedded", "flower"), default="embedded")
    ap.add_argument("--repeats", type=int, default=2, help="--engine flower: interleaved embedded/Flower pairs")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.child[2:])
        return
    if a.corpus is None:
        ap.error("--corpus is required")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.engine == "flower":
        flower(a)
        return

    by_speaker = shard(a.corpus, a.work / "fed-speaker", ["--by", "speaker"])
    common = ["eval.every=1000", "keep_checkpoints=1", "train.max_duration=40"]
    r = measure(by_speaker, a.work / "run-overhead",
                [f"fl.rounds={a.rounds}", "fl.clients_per_round=4", "fl.local_steps=10", *common])
    overhead = (r["wall"] - r["client_time"]) / r["wall"]
    print(f"engine overhead (tiny, {r['rounds']} rounds x 4 clients x 10 steps): "
          f"wall {r['wall']:.1f} s, clients {r['client_time']:.1f} s -> overhead {100 * overhead:.2f}% (goal <= 5%)")

    cheap = ["fl.rounds=1", "fl.client_fraction=1.0", "fl.local_steps=1", "train.max_duration=10",
             "model.overrides={num_layers: 1}", *common]
    few = shard(a.corpus, a.work / "fed-10", ["--by", "iid", "--num-clients", "10"])
    many = shard(a.corpus, a.work / f"fed-{a.many}", ["--by", "iid", "--num-clients", str(a.many)])
    r10 = measure(few, a.work / "run-10", cheap)
    rmany = measure(many, a.work / f"run-{a.many}", cheap)
    growth = rmany["peak_rss_mb"] / r10["peak_rss_mb"] - 1
    print(f"peak RSS with 10 clients: {r10['peak_rss_mb']:.0f} MB; with {rmany['clients']} clients: "
          f"{rmany['peak_rss_mb']:.0f} MB -> growth {100 * growth:.1f}% (goal <= 10%)")
    print(f"({a.many}-client round: {rmany['wall']:.1f} s wall, {rmany['client_time']:.1f} s in clients)")


if __name__ == "__main__":
    main()
