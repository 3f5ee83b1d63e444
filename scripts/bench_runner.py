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
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import peak_rss_kb, rss_kb, run_isolated


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
                      "peak_rss_mb": peak_rss_kb() / 1024}))


def measure(fed: Path, out: Path, overrides: list[str]) -> dict:
    return run_isolated(__file__, ["--child", fed, out, *overrides], label="run")


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
    """Embedded, Flower with 1 SuperNode (clients in turn, as embedded) and Flower with 2
    SuperNodes (in parallel) on the same messages, one after the other ``--repeats`` times;
    every client runs with one thread."""
    fed = a.federation or shard(a.corpus, a.work / "fed-speaker", ["--by", "speaker"])
    sets = [f"fl.rounds={a.rounds}", "fl.clients_per_round=2", "fl.local_steps=20", "eval.every=1000",
            "keep_checkpoints=1", "train.max_duration=40"]
    args = [x for s in sets for x in ("--set", s)]
    res: dict[str, list[tuple[float, float]]] = {"1": [], "2": []}  # slots -> [(compute ratio, overhead)]
    emb_over = []
    for rep in range(a.repeats):
        emb, _ = _train(fed, a.work / f"run-embedded-{rep}", args, [])
        warm = slice(1, None) if len(emb) > 1 else slice(None)  # round 1: the workers load model and data
        ce = sum(sum(r["client_times"]) for r in emb[warm])
        wall_e = sum(r["round_time"] - r.get("eval_time", 0.0) for r in emb[warm])
        emb_over.append((wall_e - ce) / wall_e)
        print(f"repeat {rep + 1}: embedded {wall_e / len(emb[warm]):5.1f} s/round, clients {ce:5.1f} s, overhead "
              f"{100 * emb_over[-1]:4.1f}%", flush=True)
        for slots in ("1", "2"):
            flw, total = _train(fed, a.work / f"run-flower{slots}-{rep}", args,
                                ["--engine", "flower", "--slots", slots])
            assert [r["clients"] for r in emb] == [r["clients"] for r in flw]  # the same messages
            cf = sum(sum(r["client_times"]) for r in flw[warm])
            wall_f = sum(r["round_time"] - r.get("eval_time", 0.0) for r in flw[warm])
            # the clients' compute on the critical path: in turn (1 SuperNode) or in parallel (2)
            crit = sum(sum(r["client_times"]) if slots == "1" else max(r["client_times"]) for r in flw[warm])
            res[slots].append((cf / ce, (wall_f - crit) / wall_f))
            r1 = flw[0]
            print(f"  flower, {slots} SuperNode(s): {wall_f / len(flw[warm]):5.1f} s/round, clients {cf:5.1f} s "
                  f"({cf / ce:.2f}x embedded), on the critical path {crit:5.1f} s -> overhead "
                  f"{100 * res[slots][-1][1]:4.1f}%; round 1 {r1['round_time']:.1f} s; start-up and shut-down "
                  f"{total - sum(r['round_time'] for r in flw):.0f} s", flush=True)
    n = f"rounds 2-{a.rounds}" if a.rounds > 1 else "1 round"
    print(f"median of {a.repeats} ({n} x 2 clients x 20 steps, tiny, one thread per client): "
          f"Flower clients' compute with 1 SuperNode {_median([x for x, _ in res['1']]):.2f}x embedded "
          f"(goal <= 1.1x), with 2 SuperNodes {_median([x for x, _ in res['2']]):.2f}x; round overhead beyond the "
          f"clients' compute: 1 SuperNode {100 * _median([y for _, y in res['1']]):.1f}%, 2 SuperNodes "
          f"{100 * _median([y for _, y in res['2']]):.1f}% (goal <= 10%); embedded {100 * _median(emb_over):.1f}%")
    print("(overhead = (round wall time - the clients' compute on its critical path) / round wall time; the machine "
          "is shared with other jobs, so the runs alternate)")


def _flower_procs(home: Path) -> dict[int, tuple[str, int]]:
    """{pid: (role, RSS bytes)} of the processes of a local Flower federation (its FLWR_HOME)."""
    marker = f"FLWR_HOME={home}".encode()
    roles = (("fedasr.fl.flower.worker", "worker"), ("fedasr.fl.flower.supernode", "supernode"),
             ("fedasr.fl.flower.node", "node"), ("flwr-serverapp", "serverapp"), ("flower-superexec", "superexec"),
             ("flower-superlink", "superlink"))
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if marker not in Path(f"/proc/{d}/environ").read_bytes():
                continue
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            rss = rss_kb(pid=d) * 1024
        except (OSError, ValueError, IndexError):
            continue
        role = next((r for key, r in roles if key in cmd), None)
        if role is not None:
            out[int(d)] = (role, rss)
    return out


def _node_of(pid: int, procs: dict[int, tuple[str, int]]) -> int | None:
    """The fedasr node process (``fedasr.fl.flower.node``) a SuperNode-side process belongs to."""
    while pid > 1:
        if procs.get(pid, ("",))[0] == "node":
            return pid
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
    return None


def scale(a) -> None:
    """A 100-client federation on loopback: 10 clients a round on 4 SuperNode slots, 3
    rounds; RSS of the SuperLink and the SuperNodes after every round; one SuperNode
    killed in the middle of round 2; nothing left running afterwards."""
    from fedasr.fl.flower.launch import process_tree

    fed = a.federation
    out = a.work / "run-scale"
    home = (out / "flower" / "home").resolve()
    sets = ["fl.rounds=3", "fl.clients_per_round=10", "fl.local_steps=2", "fl.min_clients=1", "eval.every=1000",
            "keep_checkpoints=1", "train.max_duration=20"]
    cmd = [sys.executable, "-m", "fedasr.cli", "train", "--engine", "flower", "--federation", str(fed),
           "--out", str(out), "--overwrite", "--slots", "4", "--round-timeout", str(a.round_timeout),
           *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    rss: dict[int, dict[str, int]] = {}  # round -> {"superlink": bytes, node pid: bytes}
    seen, killed, kill_at = 0, None, None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        if len(rows) > seen:
            seen = len(rows)
            procs = _flower_procs(home)
            snap: dict = {"superlink": sum(r for role, r in procs.values() if role in ("superlink", "superexec",
                                                                                       "serverapp"))}
            for pid, (role, r) in procs.items():
                node = _node_of(pid, procs) if role in ("node", "supernode", "worker") else None
                if node is not None:
                    snap[node] = snap.get(node, 0) + r
                    snap[(node, role)] = snap.get((node, role), 0) + r
            rss[seen] = snap
            if seen == 1:  # kill one SuperNode half a round into round 2
                kill_at = time.monotonic() + 0.5 * json.loads(rows[0])["round_time"]
        if kill_at is not None and killed is None and time.monotonic() >= kill_at:
            nodes = sorted(p for p, (role, _) in _flower_procs(home).items() if role == "node")
            killed = nodes[-1]
            for p in process_tree(killed):
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
            print(f"killed SuperNode (fedasr node pid {killed} and its processes) "
                  f"{time.monotonic() - kill_at + 0.5 * json.loads(rows[0])['round_time']:.1f} s into round 2",
                  flush=True)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    total = time.perf_counter() - t0
    left = _flower_procs(home)
    if proc.returncode != 0:
        print(f"run failed ({proc.returncode}): {stderr.strip().splitlines()[-1:] or stdout[-300:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    for r in rows:
        ideal = sum(r["client_times"]) / 4
        print(f"round {r['round']}: {len(r['clients'])} clients, {len(r['dropped'])} dropped, "
              f"wall {r['round_time']:5.1f} s, "
              f"clients' compute {sum(r['client_times']):5.1f} s (/4 slots: {ideal:4.1f} s) -> beyond it "
              f"{100 * (r['round_time'] - ideal) / r['round_time']:4.1f}%"
              + "".join(f"; dropped {d['client']}: {d['reason'][:90]}" for d in r["dropped"]))
    survivors = [p for p in rss.get(1, {}) if isinstance(p, int) and p != killed]
    mb = 1 / 2 ** 20
    for key, name in [("superlink", "SuperLink + SuperExec + ServerApp")] + [(p, f"SuperNode {p}") for p in survivors]:
        vals = [rss[n].get(key, 0) * mb for n in sorted(rss)]
        print(f"RSS {name}: " + " / ".join(f"{v:.0f}" for v in vals) + " MB after rounds " +
              "/".join(map(str, sorted(rss))) + (f" -> round 3 vs 1: {100 * (vals[-1] / vals[0] - 1):+.1f}%"
                                                 if len(vals) >= 3 and vals[0] else "")
              + ("" if key == "superlink" else " (" + ", ".join(
                  f"{role} " + "/".join(f"{rss[n].get((key, role), 0) * mb:.0f}" for n in sorted(rss))
                  for role in ("node", "supernode", "worker")) + ")"))
    print(f"run: exit {proc.returncode}, {total:.0f} s in all; processes left running afterwards: {len(left)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="LibriSpeech-layout root with a 'train' split")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedasr-bench-runner"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--engine", choices=("embedded", "flower"), default="embedded")
    ap.add_argument("--repeats", type=int, default=2, help="--engine flower: interleaved embedded/Flower pairs")
    ap.add_argument("--scale", action="store_true", help="--engine flower: the 100-client scenario on --federation")
    ap.add_argument("--federation", type=Path, help="--engine flower: use this federation [default: shard --corpus]; "
                    "--scale: a federation of (say) 100 clients")
    ap.add_argument("--round-timeout", type=float, default=90.0, help="--scale: seconds a round waits")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.child[2:])
        return
    a.work.mkdir(parents=True, exist_ok=True)
    if a.scale:
        if a.federation is None:
            ap.error("--scale needs --federation")
        scale(a)
        return
    if a.corpus is None and not (a.engine == "flower" and a.federation):
        ap.error("--corpus is required")
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
