#!/usr/bin/env python
"""Benchmark of the federated engines.

1. Overhead: (round wall time - sum of client compute time) / round wall time, for the
   `tiny` model on a speaker-sharded federation. Wall time covers everything the engine
   does per round: sampling, manifest loading, payload encoding/decoding, aggregation,
   the server step and the per-round checkpoint; client compute is what each client
   reports (from receiving its message to having encoded its reply). Goal: <= 5%
   embedded. With ``--engine flower`` the same run goes through `fedasr train --engine
   flower` on loopback (SuperLink + SuperNodes; 20 local steps): one SuperNode, so clients
   run in turn as in the embedded engine (goal <= 10%), and one per client (in parallel).
2. Memory: peak RSS of a run whose federation has 10 vs 1,000 clients, every client
   taking part in the round with 1 local step (cheap clients), so the server must stream
   1,000 updates. Goal: growth <= 10%.

Each measurement runs in a fresh subprocess. Usage:

    python scripts/bench_runner.py --corpus demo/corpus/LibriSpeech [--work /tmp/bench]
"""

from __future__ import annotations

import argparse
import json
import resource
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


def flower(a) -> None:
    """Round wall time vs the clients' compute, embedded and on Flower, same runs."""
    fed = shard(a.corpus, a.work / "fed-speaker", ["--by", "speaker"])
    sets = [f"fl.rounds={a.rounds}", "fl.clients_per_round=2", "fl.local_steps=20", "eval.every=1000",
            "keep_checkpoints=1", "train.max_duration=40"]
    args = [a for s in sets for a in ("--set", s)]
    results = {}
    for name, extra in (("embedded", []), ("flower, 1 SuperNode", ["--engine", "flower", "--slots", "1"]),
                        ("flower, 2 SuperNodes", ["--engine", "flower", "--slots", "2"])):
        out = a.work / f"run-{name.split(',')[0]}-{len(results)}"
        subprocess.run([sys.executable, "-m", "fedasr.cli", "train", "--federation", str(fed), "--out", str(out),
                        "--overwrite", *extra, *args], check=True, capture_output=True,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        wall = sum(r["round_time"] - r.get("eval_time", 0.0) for r in rows)
        client = sum(r["client_time"] for r in rows)
        results[name] = (wall, client)
        print(f"{name:<22} {len(rows)} rounds x 2 clients x 20 steps: round wall {wall / len(rows):6.1f} s, "
              f"clients {client / len(rows):6.1f} s -> overhead {100 * (wall - client) / wall:5.1f}%", flush=True)
    print("(goal: <= 10% engine overhead for Flower with the tiny model at 20 local steps; with 2 SuperNodes "
          "the clients run in parallel, so their summed compute can exceed the wall time)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="LibriSpeech-layout root with a 'train' split")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedasr-bench-runner"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--engine", choices=("embedded", "flower"), default="embedded")
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
