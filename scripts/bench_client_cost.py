#!/usr/bin/env python
"""What one client's local training round costs, per pruning method, against dense, in one run.

The server side (this process) builds each scenario's round message with the real server
(the method's masks, instructions and, for compacted clients, the smaller architecture);
each client round runs in a fresh subprocess that holds only the client: it builds the
model the message names, loads one client's data, and trains ``--steps`` local steps
through the real client worker (the method's hooks included). Scenarios run ``--repeat``
times, interleaved (A B C ... A B C ...), and the medians are reported: the machine may be
shared, so timings are noisy.

Measured (per subprocess): peak RSS, the round's memory growth (peak over the RSS just
before the round: activations, gradients, optimizer state, the method's buffers; "anon":
the same for anonymous memory only, sampled every 2 ms, without the pages of the libraries'
code that a round's first kernels fault in; a warm-up
step of a micro model first pays the process's one-time costs, see ``warm_up``), and
seconds per local step (median over the steps after the first).
Counted: training FLOPs of one step (forward + backward of the first batch under
``torch.utils.flop_counter``: matmuls and convolutions; the RNN-T loss itself is not
counted), as trained (dense-equivalent: every weight the client holds) and effective
(each module scaled by its share of nonzero weights, i.e. what ideal sparse kernels
would do); the bytes of parameters + gradients + AdamW's two moments as the client
stores them (plus the method's gradient accumulators); bytes down/up as encoded.

Scenarios (``small`` preset by default): dense; Federated Pruning column at ``--sparsity``;
FP unit at ``--sparsity`` with masked and compacted clients; FP unit compacted at
``--high``; FedTiny at 0.9 in an adjustment round; ASP after ``--asp-shrinks`` shrinks
of the initial model at k = ``--asp-k``.

    python scripts/bench_client_cost.py --federation demo/federation --steps 3 --repeat 2 --trim
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import AnonPeak, peak_rss_kb, rss_kb, run_isolated  # noqa: E402

FP = ["pruning.method=federated_pruning", "pruning.federated_pruning.schedule=constant",
      "pruning.federated_pruning.start_round=1", "pruning.federated_pruning.allocation=uniform"]
FEDTINY = ["pruning.method=fedtiny", "pruning.fedtiny.candidates=1", "pruning.fedtiny.adaptive_bn=false",
           "pruning.fedtiny.update_every=1", "pruning.fedtiny.start_round=1", "pruning.fedtiny.granularity=block"]


def scenarios(args) -> dict[str, list[str]]:
    s, hi = args.sparsity, args.high
    return {
        "dense": [],
        f"FP column {s}": FP + [f"pruning.target_sparsity={s}", "pruning.federated_pruning.pattern=column"],
        f"FP unit {s}, masked": FP + [f"pruning.target_sparsity={s}", "pruning.federated_pruning.pattern=unit",
                                      "fl.client_model=masked"],
        f"FP unit {s}, compact": FP + [f"pruning.target_sparsity={s}", "pruning.federated_pruning.pattern=unit",
                                       "fl.client_model=compact"],
        f"FP unit {hi}, compact": FP + [f"pruning.target_sparsity={hi}", "pruning.federated_pruning.pattern=unit",
                                        "fl.client_model=compact"],
        "FedTiny 0.9": FEDTINY + ["pruning.target_sparsity=0.9"],
        f"ASP k={args.asp_k}, shrunk": ["pruning.method=asp", f"pruning.asp.k={args.asp_k}",
                                        f"pruning.asp.max_prune_round={args.asp_shrinks}"],
    }


def config(args, sets: list[str]):
    from fedasr.config import load_config

    base = [f"model.preset={args.preset}", f"fl.local_steps={args.steps}", "fl.clients_per_round=1", "fl.rounds=8",
            "device=cpu"]
    return load_config(args.recipe, base + sets)


def prepare(args, name: str, sets: list[str], out: Path) -> dict:
    """The server side: the round message of scenario ``name`` (written to ``out``)."""
    import torch

    from fedasr.data.federation import Federation
    from fedasr.fl.client import model_config
    from fedasr.fl.server import RoundInfo, Server
    from fedasr.model.transducer import Transducer

    cfg = config(args, sets)
    fed = Federation(args.federation)
    torch.manual_seed(0)
    server = Server(cfg, Transducer(model_config(cfg, fed.tokenizer.vocab_size)), fed.client_ids)
    server.start()
    dense_params = server.model.num_parameters()
    if name.startswith("FedTiny"):
        server.method.selected = True  # an adjustment round right after its selection
        assert server.masks, "FedTiny must be sparse in the measured round"
    if name.startswith("ASP"):  # shrink the initial model as ASP's first rounds would
        for rnd in range(1, args.asp_shrinks + 1):
            server._apply(server.method.update(server.ctx(rnd), None), RoundInfo([]))
    rnd = 1
    client = sorted(fed.client_ids)[0]
    ex = server.train_exchange(rnd)
    payload = ex.payload
    header = server.client_header(rnd, client)
    (out / "payload").write_bytes(payload)
    (out / "header").write_bytes(header)
    nonzero = sum(int((v != 0).sum()) for k, v in server.served_state().items()
                  if k in dict(server.model.named_parameters()))
    return {"server": server, "exchange": ex, "client": client, "bytes_down": server.down_bytes(payload, header),
            "dense_params": dense_params, "nonzero": nonzero}


class TimedHooks:
    """The method's client hooks, timing every local step (at its optimizer step)."""

    def __init__(self, hooks, trim: bool = False):
        self.hooks = hooks
        self.trim = None
        if trim:  # glibc: give freed heap memory back after every step
            import ctypes

            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        self.stamps = [time.perf_counter()]
        self.rss = [rss_kb()]  # after every step: how the round's memory builds up

    def after_backward(self, model):
        self.hooks.after_backward(model)

    def after_step(self, model):
        self.hooks.after_step(model)
        if self.trim is not None:
            self.trim(0)
        self.stamps.append(time.perf_counter())
        self.rss.append(rss_kb())

    def report(self):
        return self.hooks.report()


def client(args) -> None:
    """One client round in this (fresh) process; prints its measurements as JSON."""
    import torch

    from fedasr.data.federation import Federation
    from fedasr.fl.client import train_client
    from fedasr.fl.client import ClientWorker
    from fedasr.fl.messages import decode_down
    from fedasr.model.transducer import ModelConfig, Transducer

    torch.set_num_threads(1)
    cfg = config(args, json.loads(args.sets))
    fed = Federation(args.federation)
    work = Path(args.work)
    payload, header = (work / "payload").read_bytes(), (work / "header").read_bytes()
    msg = decode_down(payload)
    with torch.random.fork_rng():
        model = Transducer(ModelConfig.from_dict(msg.arch))  # the model the client is sent
    seen = {}

    def timed(name, model, weights, data, cfg, **kw):
        kw["hooks"] = seen["hooks"] = TimedHooks(kw["hooks"], trim=args.trim)
        return train_client(name, model, weights, data, cfg, **kw)

    worker = ClientWorker(cfg, fed, model, train_fn=timed)
    data = worker.dataset(args.client)  # warm the manifest reader
    if not args.cold:
        warm_up(data, cfg, msg.arch)
    before, before_anon = rss_kb(), rss_kb("RssAnon")
    with AnonPeak() as anon:
        reply = worker.handle(header, payload)
    peak = peak_rss_kb()
    (work / "reply").write_bytes(reply)
    stamps = seen["hooks"].stamps
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    model = worker.model
    params = list(model.parameters())
    stored = sum(p.numel() * p.element_size() for p in params) * 4  # weights, gradients, AdamW's m and v
    buffers = sum(t.numel() * t.element_size() for t in getattr(seen["hooks"].hooks, "_sum", {}).values())
    row = {"peak_kb": peak, "before_kb": before, "anon_growth_kb": anon.peak_kb - before_anon,
           "step_s": statistics.median(steps[1:] or steps), "rss_steps_kb": seen["hooks"].rss,
           "client_params": sum(p.numel() for p in params), "stored_bytes": stored + buffers, "method_bytes": buffers}
    if args.flops:
        row.update(training_flops(model, msg, data, cfg))
    print(json.dumps(row))


def warm_up(data, cfg, arch: dict) -> None:
    """One training step of a micro model of the same kind on one utterance: the one-time
    costs of a process's first step (lazily loaded libraries and kernels: torchaudio's RNN-T
    loss, the convolution and LSTM kernels, the feature reader) are then paid before the
    measured round, not counted as its working memory."""
    import torch

    from fedasr.model.transducer import ModelConfig, Transducer
    from fedasr.trainer import transducer_loss

    small = {"d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 16, "subsampling_channels": 4,
             "pred_embed_dim": 8, "pred_hidden": 8, "joint_dim": 8, "widths": None}
    with torch.random.fork_rng():
        micro = Transducer(ModelConfig.from_dict({**arch, **small}))
    batch = next(iter(data.batches(cfg.train.max_duration, shuffle=False, num_buckets=1, max_cuts=1)))
    loss, _ = transducer_loss(micro, batch, cfg.train.ctc_weight, cfg.train.simple_loss_weight)
    loss.backward()
    torch.optim.AdamW(micro.parameters()).step()


def training_flops(model, msg, data, cfg) -> dict:
    """FLOPs of one training step (forward + backward) on the client's first batch.

    The forward is counted per module (``flop_counter`` attributes forward ops reliably);
    the backward in total. Effective: every weight module's forward and its two backward
    products (input and weight gradient, as many FLOPs each as its forward) scaled by the
    module's share of nonzero weights; the remaining backward ops unscaled."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedasr.model.flops import weight_density
    from fedasr.prune.masks import apply_masks
    from fedasr.trainer import transducer_loss

    model.load_state_dict(msg.weights)
    apply_masks(model, msg.masks)
    model.train()
    batch = next(iter(data.batches(cfg.train.max_duration, shuffle=True, num_buckets=1, seed=0)))
    density = weight_density(model)
    with FlopCounterMode(display=False) as fwd:
        loss, _ = transducer_loss(model, batch, cfg.train.ctc_weight, cfg.train.simple_loss_weight)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    counts = fwd.get_flop_counts()
    forward = sum(counts.get("Global", {}).values())
    backward = sum(bwd.get_flop_counts().get("Global", {}).values())
    weighted = saved = 0.0
    for key, ops in counts.items():
        name = key.split(".", 1)[1] if "." in key else None  # (keys start with the root module's class)
        if name in density:
            weighted += sum(ops.values())
            saved += sum(ops.values()) * (1 - density[name])
    return {"flops": int(forward + backward), "flops_effective": int(forward + backward - 3 * saved),
            "flops_forward": int(forward), "flops_weight_modules": int(weighted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federation", required=True)
    ap.add_argument("--recipe", default="recipes/ci.yaml")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--high", type=float, default=0.8, help="the second FP unit compact sparsity")
    ap.add_argument("--asp-k", type=float, default=1.6)
    ap.add_argument("--asp-shrinks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    for hidden in ("--sets", "--work", "--client"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trim", action="store_true",
                    help="malloc_trim after every local step (RSS then follows the live memory more closely)")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up step before the measured round (its growth then includes one-time costs)")
    args = ap.parse_args()
    if args.work:
        client(args)
        return
    from fedasr.fl.server import RoundInfo

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_client_cost_"))
    prepared, measured = {}, {}
    for i, (name, sets) in enumerate(scenarios(args).items()):
        (tmp / str(i)).mkdir()
        prepared[name] = (i, sets, prepare(args, name, sets, tmp / str(i)))
    for rep in range(args.repeat):
        for name, (i, sets, prep) in prepared.items():
            cmd = ["--federation", args.federation, "--recipe", args.recipe,
                   "--preset", args.preset, "--steps", str(args.steps), "--sets", json.dumps(sets),
                   "--work", str(tmp / str(i)), "--client", prep["client"]] + (["--flops"] if rep == 0 else []) + (
                   ["--cold"] if args.cold else []) + (["--trim"] if args.trim else [])
            row = run_isolated(__file__, cmd, label=name, env={"OMP_NUM_THREADS": "1"})
            if rep == 0:  # the server absorbs the reply (a check that it is a valid update): bytes up
                info = RoundInfo([prep["client"]])
                prep["server"].absorb(prep["exchange"], (tmp / str(i) / "reply").read_bytes(), info)
                row["bytes_up"] = info.bytes_up
            measured.setdefault(name, []).append(row)
    rows = []
    for name, reps in measured.items():
        prep = prepared[name][2]
        first = reps[0]
        med = {k: statistics.median(r[k] for r in reps) for k in ("peak_kb", "step_s")}
        med["growth_kb"] = statistics.median(r["peak_kb"] - r["before_kb"] for r in reps)
        med["anon_growth_kb"] = statistics.median(r["anon_growth_kb"] for r in reps)
        rows.append({"name": name, **first, **med, "bytes_down": prep["bytes_down"],
                     "dense_params": prep["dense_params"], "nonzero": prep["nonzero"],
                     "steps_s": [r["step_s"] for r in reps],
                     "growth_all_kb": [r["peak_kb"] - r["before_kb"] for r in reps],
                     "anon_growth_all_kb": [r["anon_growth_kb"] for r in reps]})
    d = rows[0]
    print(f"client round of {args.steps} local steps, {args.preset} preset, 1 thread; medians of {args.repeat} "
          f"interleaved runs ({time.perf_counter() - t_start:.0f} s in all); ratios to dense")
    head = (f"{'scenario':<22} {'params':>10} {'nonzero':>10} {'peak RSS MB':>11} {'x':>5} {'growth MB':>9} {'x':>5} "
            f"{'anon MB':>7} {'x':>5} {'s/step':>7} {'x':>5} {'GFLOP/step':>10} {'x':>5} {'eff x':>5} "
            f"{'state MB':>8} {'x':>5} "
            f"{'down MB':>7} {'x':>5} {'up MB':>6} {'x':>5}")
    print(head)
    for r in rows:
        print(f"{r['name']:<22} {r['client_params']:>10,d} {r['nonzero']:>10,d} {r['peak_kb'] / 1024:11.1f} "
              f"{r['peak_kb'] / d['peak_kb']:5.2f} {r['growth_kb'] / 1024:9.1f} {r['growth_kb'] / d['growth_kb']:5.2f} "
              f"{r['anon_growth_kb'] / 1024:7.1f} {r['anon_growth_kb'] / d['anon_growth_kb']:5.2f} "
              f"{r['step_s']:7.3f} {r['step_s'] / d['step_s']:5.2f} {r['flops'] / 1e9:10.2f} "
              f"{r['flops'] / d['flops']:5.2f} {r['flops_effective'] / d['flops']:5.2f} "
              f"{r['stored_bytes'] / 2**20:8.1f} {r['stored_bytes'] / d['stored_bytes']:5.2f} "
              f"{r['bytes_down'] / 2**20:7.2f} {r['bytes_down'] / d['bytes_down']:5.2f} "
              f"{r['bytes_up'] / 2**20:6.2f} {r['bytes_up'] / d['bytes_up']:5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
