#!/usr/bin/env python
"""Learning speed: dev WER against wall-clock seconds and against steps, per configuration.

Each configuration (a recipe, plus ``--set`` overrides) is trained with the real runner —
centralized (the union of the clients' data) or federated — until a budget of training
seconds or of steps is spent; the dev WER is measured every ``--eval-every`` rounds (not
counted as training time). Training steps are the optimizer steps of every client (a
federated round of 2 clients x 20 steps is 40 steps), so centralized and federated curves
compare at equal compute. Same seeds -> the same curve against steps (on CPU).

Writes OUT/learning.csv (one row per evaluation), OUT/learning.png (WER vs seconds and vs
steps, one line per configuration) and OUT/summary.csv (one row per configuration: steps,
seconds per step, final and best dev WER, test WERs with --test), and prints the table.

    python scripts/bench_learning.py --federation demo/federation --recipe recipes/ci.yaml \\
        --variant base --variant "stateless: model.overrides.predictor=stateless" \\
        --mode centralized --budget-seconds 600 --out docs/learning/run1
    python scripts/bench_learning.py ... --configs a.yaml b.yaml      # one configuration per file
    python scripts/bench_learning.py --merge runs/a runs/b --out docs/learning   # union of runs

A variant is ``NAME`` or ``NAME: key=value; key=value`` (``--set`` syntax on top of the
recipe). ``--budget-steps`` makes the stopping point independent of the machine's load,
so configurations can be compared in parallel runs; seconds per step are measured all the
same (pair it with ``--threads`` and a quiet machine when timings matter).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    sets = [s.strip() for s in rest.split(";") if s.strip()]
    return name.strip(), sets


class _Stop(Exception):
    pass


def run_variant(name: str, recipe: str | None, sets: list[str], args) -> tuple[list[dict], dict]:
    import torch

    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.evaluate import evaluate
    from fedasr.fl.runner import Runner

    torch.set_num_threads(args.threads)
    cfg = load_config(recipe, sets + [f"eval.every={args.eval_every}", "keep_checkpoints=1"])
    rounds = args.max_rounds
    if args.budget_steps and not args.budget_seconds:  # the run's length is known: round-based
        # schedules (fl.server_lr_schedule) see it as fl.rounds
        rounds = min(rounds, -(-args.budget_steps // (cfg.fl.clients_per_round * cfg.fl.local_steps)))
    cfg = load_config(recipe, sets + [f"eval.every={args.eval_every}", "keep_checkpoints=1", f"fl.rounds={rounds}"])
    if args.dev_utterances:
        cfg.eval.dev_max_utterances = args.dev_utterances
    fed = Federation(args.federation)
    steps_per_round = cfg.fl.clients_per_round * cfg.fl.local_steps
    rows: list[dict] = []
    train_seconds = 0.0

    class Watch:
        def round_start(self, rnd, clients):
            pass

        def client_done(self, client, ok):
            pass

        def round_end(self, row):
            nonlocal train_seconds
            train_seconds += row["round_time"] - row.get("eval_time", 0.0)
            steps = row["round"] * steps_per_round
            if "dev_wer" in row:
                rows.append({"variant": name, "mode": args.mode, "round": row["round"], "steps": steps,
                             "train_seconds": round(train_seconds, 2), "dev_wer": round(row["dev_wer"], 5),
                             "dev_loss": round(row["dev_loss"], 5), "train_loss": row.get("train_loss")})
                print(f"  {name}: step {steps} ({train_seconds:.0f} s) dev WER {100 * row['dev_wer']:.2f}%",
                      flush=True)
            over = (args.budget_seconds and train_seconds >= args.budget_seconds) or (
                args.budget_steps and steps >= args.budget_steps)
            if over:
                if "dev_wer" not in row:  # end on a measured point
                    t0 = time.perf_counter()
                    d = runner.dev_eval()
                    rows.append({"variant": name, "mode": args.mode, "round": row["round"], "steps": steps,
                                 "train_seconds": round(train_seconds, 2), "dev_wer": round(d["dev_wer"], 5),
                                 "dev_loss": round(d["dev_loss"], 5), "train_loss": row.get("train_loss")})
                    print(f"  {name}: step {steps} ({train_seconds:.0f} s) dev WER {100 * d['dev_wer']:.2f}% "
                          f"(eval {time.perf_counter() - t0:.0f} s)", flush=True)
                raise _Stop

    with tempfile.TemporaryDirectory(prefix="bench_learning-") as tmp:
        runner = Runner(Path(tmp) / "run", fed, cfg, centralized=args.mode == "centralized", events=Watch())
        runner.start()
        try:
            runner.run_rounds()
        except _Stop:
            pass
        steps = rows[-1]["steps"] if rows else 0
        summary = {"variant": name, "mode": args.mode, "settings": "; ".join(sets), "steps": steps,
                   "train_seconds": round(train_seconds, 1),
                   "seconds_per_step": round(train_seconds / max(1, steps), 4),
                   "final_dev_wer": rows[-1]["dev_wer"] if rows else None,
                   "best_dev_wer": min(r["dev_wer"] for r in rows) if rows else None,
                   "parameters": runner.model.num_parameters()}
        if args.test:
            model = runner.local  # the device copy; federated: load the global weights into it
            if model is not runner.model:
                model.load_state_dict(runner.model.state_dict())
            for split in [s for s, m in fed.eval_splits.items() if m["role"] == "test"]:
                res, _ = evaluate(model, fed.split_cuts(split), fed.tokenizer, fed.cmvn, beam=1)
                summary[f"wer_{split}"] = round(res["wer"], 5)
    return rows, summary


def write_outputs(out: Path, rows: list[dict], summaries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedasr.fsutil import atomic_write_bytes, atomic_write_text

    def to_csv(items: list[dict]) -> str:
        cols = []
        for r in items:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(items)
        return buf.getvalue()

    atomic_write_text(out / "learning.csv", to_csv(rows))
    atomic_write_text(out / "summary.csv", to_csv(summaries))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    colors = plt.get_cmap("tab10" if len(summaries) <= 10 else "tab20")
    for i, s in enumerate(summaries):
        pts = [r for r in rows if r["variant"] == s["variant"] and r["mode"] == s["mode"]]
        style = {"marker": ".", "label": f"{s['variant']} ({s['mode'][:4]})", "color": colors(i % colors.N),
                 "linestyle": "-" if s["mode"] == "centralized" else "--"}
        axes[0].plot([r["train_seconds"] for r in pts], [100 * r["dev_wer"] for r in pts], **style)
        axes[1].plot([r["steps"] for r in pts], [100 * r["dev_wer"] for r in pts], **style)
    for ax, xl in zip(axes, ("training seconds (evaluation excluded)", "training steps (all clients)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("dev WER (%)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 105)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Learning speed")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "learning.png", png.getvalue())


def read_csv(path: Path) -> list[dict]:
    def value(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def merge(folders: list[str], out: Path) -> None:
    """One table and one figure from several runs (e.g. an ablation run in parallel)."""
    rows, summaries = [], []
    for d in folders:
        for name, dest in (("learning.csv", rows), ("summary.csv", summaries)):
            path = Path(d) / name
            if not path.is_file():
                raise SystemExit(f"{path}: missing (not a bench_learning output folder)")
            dest += read_csv(path)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, rows, summaries)
    print(f"wrote {out}/learning.csv, learning.png, summary.csv ({len(summaries)} configurations)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federation")
    ap.add_argument("--recipe", default="recipes/ci.yaml", help="Base recipe of the --variant configurations.")
    ap.add_argument("--variant", action="append", default=[], help="NAME or 'NAME: key=value; key=value'.")
    ap.add_argument("--configs", nargs="*", default=[], help="Recipe files, one configuration each.")
    ap.add_argument("--set", dest="common", action="append", default=[], help="Applied to every configuration.")
    ap.add_argument("--mode", choices=("centralized", "federated"), default="centralized")
    ap.add_argument("--budget-seconds", type=float, default=0.0, help="Training seconds per configuration.")
    ap.add_argument("--budget-steps", type=int, default=0, help="Training steps per configuration.")
    ap.add_argument("--eval-every", type=int, default=4, help="Rounds between dev evaluations.")
    ap.add_argument("--dev-utterances", type=int, default=0, help="Dev utterances (0: the recipe's).")
    ap.add_argument("--max-rounds", type=int, default=100000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--test", action="store_true", help="Also decode the test splits at the end.")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="Output folders of earlier runs: write their union to --out (no training).")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if not args.federation:
        ap.error("give --federation")
    if not args.budget_seconds and not args.budget_steps:
        ap.error("give --budget-seconds or --budget-steps")
    configs = [(parse_variant(v)[0], args.recipe, parse_variant(v)[1]) for v in args.variant]
    configs += [(Path(c).stem, c, []) for c in args.configs]
    if not configs:
        ap.error("give at least one --variant or --configs file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, summaries = [], []
    for name, recipe, sets in configs:
        print(f"{name}: {'; '.join(args.common + sets) or '(recipe as is)'}", flush=True)
        r, s = run_variant(name, recipe, args.common + sets, args)
        rows += r
        summaries.append(s)
        write_outputs(out, rows, summaries)  # after each configuration: a crash keeps what was measured
    (out / "command.txt").write_text(" ".join([Path(sys.executable).name, *sys.argv]) + "\n")
    print(f"\n{'variant':<24} {'steps':>6} {'s/step':>7} {'final dev':>9} {'best dev':>9}"
          + "".join(f" {k[4:]:>11}" for k in summaries[0] if k.startswith("wer_")))
    for s in summaries:
        print(f"{s['variant']:<24} {s['steps']:>6} {s['seconds_per_step']:>7.3f} {100 * s['final_dev_wer']:>8.2f}% "
              f"{100 * s['best_dev_wer']:>8.2f}%" + "".join(f" {100 * v:>10.2f}%" for k, v in s.items()
                                                          if k.startswith("wer_")))
    print(f"wrote {out}/learning.csv, learning.png, summary.csv")


if __name__ == "__main__":
    main()
