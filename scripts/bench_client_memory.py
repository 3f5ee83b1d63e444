#!/usr/bin/env python
"""Peak memory of one client's local training round, per pruning method, measured in one run.

Each scenario runs in a fresh subprocess (so peaks do not mix): it builds the model, loads
one client's data, receives the round's message from the real server side and trains
``--steps`` local steps through the real client worker (the pruning method's hooks
included). Printed: the process's peak RSS, and its growth during the round over the RSS
just before it (the round's own working memory: activations, gradients, optimizer state,
the method's buffers), each as a ratio to dense training.

Scenarios at the same target sparsity: dense; Federated Pruning with magnitude importance;
Federated Pruning with gradient importance (the client accumulates a dense mean |grad| of
every prunable weight); FedTiny in an adjustment round (``block`` granularity: a dense
gradient accumulator for one block only, then a top-K report).

    python scripts/bench_client_memory.py --federation demo/federation [--sparsity 0.9] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import peak_rss_kb, rss_kb, run_isolated  # noqa: E402


def scenario(args) -> None:
    import torch

    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.client import ClientWorker, model_config
    from fedasr.fl.server import RoundInfo, Server
    from fedasr.model.transducer import Transducer

    torch.set_num_threads(1)
    sets = [f"fl.local_steps={args.steps}", "fl.clients_per_round=1", "fl.rounds=4"]
    if args.name != "dense":
        sets += [f"pruning.target_sparsity={args.sparsity}"]
    # FedTiny in an adjustment round right after its selection (one candidate, at round 1)
    fedtiny = ["pruning.method=fedtiny", "pruning.fedtiny.candidates=1", "pruning.fedtiny.adaptive_bn=false",
               "pruning.fedtiny.update_every=1", "pruning.fedtiny.start_round=1"]
    sets += {
        "dense": [],
        "fp-magnitude": ["pruning.method=federated_pruning", "pruning.federated_pruning.importance=magnitude",
                         "pruning.federated_pruning.schedule=constant", "pruning.federated_pruning.start_round=1"],
        "fp-gradient": ["pruning.method=federated_pruning", "pruning.federated_pruning.importance=gradient",
                        "pruning.federated_pruning.schedule=constant", "pruning.federated_pruning.start_round=1"],
        "fedtiny-block": fedtiny + ["pruning.fedtiny.granularity=block"],
        "fedtiny-entire": fedtiny + ["pruning.fedtiny.granularity=entire"],
    }[args.name]
    cfg = load_config(args.recipe, sets + ["device=cpu"])
    fed = Federation(args.federation)
    mcfg = model_config(cfg, fed.tokenizer.vocab_size)
    server = Server(cfg, Transducer(mcfg), fed.client_ids)
    server.start()
    if args.name.startswith("fedtiny"):
        server.method.selected = True
        assert server.masks, "FedTiny must be sparse in the measured round"
    rnd = 1
    client = sorted(fed.client_ids)[0]
    worker = ClientWorker(cfg, fed, Transducer(mcfg))
    ex = server.train_exchange(rnd)
    payload = ex.payload
    header = server.client_header(rnd, client)
    worker.dataset(client)  # warm the manifest reader
    before = rss_kb()
    reply = worker.handle(header, payload)
    peak = peak_rss_kb()
    info = RoundInfo([client])
    server.absorb(ex, reply, info)
    print(json.dumps({"name": args.name, "peak_kb": peak, "before_kb": before, "bytes_up": info.bytes_up,
                      "instructions": sorted(server.method.configure(server.ctx(rnd)).meta)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federation", required=True)
    ap.add_argument("--recipe", default="recipes/ci.yaml")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.name:
        scenario(args)
        return
    rows = []
    for name in ("dense", "fp-magnitude", "fp-gradient", "fedtiny-block", "fedtiny-entire"):
        rows.append(run_isolated(__file__, ["--federation", args.federation, "--recipe", args.recipe, "--sparsity",
                                            args.sparsity, "--steps", args.steps, "--name", name],
                                 label=name, env={"OMP_NUM_THREADS": "1"}))
    dense = rows[0]
    print(f"client round of {args.steps} local steps, target sparsity {args.sparsity} (1 thread)")
    print(f"{'scenario':<16} {'peak RSS MB':>12} {'/dense':>7} {'round growth MB':>16} {'/dense':>7} {'bytes up':>11}")
    for r in rows:
        grow, dgrow = r["peak_kb"] - r["before_kb"], dense["peak_kb"] - dense["before_kb"]
        print(f"{r['name']:<16} {r['peak_kb'] / 1024:12.1f} {r['peak_kb'] / dense['peak_kb']:7.3f} "
              f"{grow / 1024:16.1f} {grow / max(1, dgrow):7.3f} {r['bytes_up']:11,d}")


if __name__ == "__main__":
    main()
