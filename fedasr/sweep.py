"""`fedasr sweep` and `fedasr report`: WER-vs-sparsity curves from one recipe.

A sweep runs one training run per (scheme, sparsity) of the recipe's ``sweep:`` section
(sparsity 0 is a single shared dense run), evaluates each on the federation's test
splits, and ``report`` gathers them into ``wer_vs_sparsity.csv`` and ``.png``::

    SWEEP_DIR/recipe.yaml                 the recipe as given (with --sparsities applied)
    SWEEP_DIR/runs/dense/                 a normal run directory (+ results.json, log.txt)
    SWEEP_DIR/runs/SCHEME/s0.50/          ...
    SWEEP_DIR/wer_vs_sparsity.csv / .png

Each run is a subprocess of the `fedasr` CLI (its output goes to the run's log.txt), so
runs can go in parallel (``--jobs``) and a crash of one does not take the others down.
Re-running skips finished runs and resumes unfinished ones from their last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from fedasr.config import SweepScheme, apply_overrides, from_dict, parse_config, read_recipe
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.fsutil import atomic_write_bytes, atomic_write_text
from fedasr.rundir import RunDir

SWEEP_FILE = "sweep.json"


@dataclass
class SweepRun:
    scheme: str
    sparsity: float  # the target (0 for a knob scheme: the method decides)
    path: Path
    settings: list[str]  # --set overrides on top of the recipe
    knob: dict | None = None  # {key, value} of a knob scheme


def load_recipe(path: str | Path) -> dict:
    return read_recipe(path, "recipe")


def plan_runs(recipe: dict, out: Path) -> list[SweepRun]:
    cfg = parse_config(recipe)  # validates everything, sweep section included
    schemes = [from_dict(SweepScheme, s, "sweep.schemes") for s in cfg.sweep.schemes]
    if not schemes:
        raise FedasrError("sweep.schemes: the recipe lists no pruning scheme")
    runs: list[SweepRun] = []
    if any(s == 0 for s in cfg.sweep.sparsities):
        runs.append(SweepRun("dense", 0.0, out / "runs" / "dense", ["pruning.method=none"]))
    for i, sch in enumerate(schemes):
        if "method" not in sch.pruning:
            raise FedasrError(f"sweep.schemes[{i}].pruning.method: required (the scheme's pruning method)")
        base = [f"pruning.{k}={json.dumps(v)}" for k, v in _flatten(sch.pruning).items()] + list(sch.overrides)
        if sch.knob:  # the method decides its sparsity: one run per knob value
            leaf = sch.knob["key"].rsplit(".", 1)[-1]
            for v in sch.knob["values"]:
                runs.append(SweepRun(sch.name, 0.0, out / "runs" / sch.name / f"{leaf}{v}",
                                     base + [f"{sch.knob['key']}={json.dumps(v)}"], {"key": sch.knob["key"], "value": v}))
            continue
        for s in sorted(set(sch.sparsities if sch.sparsities is not None else cfg.sweep.sparsities)):
            if s == 0:
                continue
            runs.append(SweepRun(sch.name, float(s), out / "runs" / sch.name / f"s{s:.2f}",
                                 base + [f"pruning.target_sparsity={s}"]))
    # fail now, not in the middle of the sweep, when a scheme's settings are wrong
    for r in runs:
        parse_config(apply_overrides(recipe, r.settings))
    return runs


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a scheme's pruning settings as --set keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _finished(run: SweepRun, splits: list[str], rounds: int) -> bool:
    rd = RunDir(run.path)
    results, metrics = rd.results(), rd.metrics()
    return bool(metrics) and all(s in results for s in splits) and metrics[-1]["round"] >= rounds


def rounds_done(run: SweepRun) -> int:
    """Rounds a run has checkpointed so far (its metrics.jsonl is rewritten after each)."""
    return len(RunDir(run.path).metrics())


def _cli(args: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as f:
        f.write(f"$ fedasr {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "fedasr.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise FedasrError(f"{log.parent}: `fedasr {args[0]}` failed: {tail[0]}")


def resolved_recipe(recipe_path: str | Path, overrides: list[str] | None = None,
                    sparsities: list[float] | None = None) -> dict:
    """The recipe with ``--set`` overrides and ``--sparsities`` applied (``--sparsities``
    replaces every target list, the schemes' own included)."""
    extra = list(overrides or [])
    if sparsities is not None:
        extra.append(f"sweep.sparsities={json.dumps(sparsities)}")
    recipe = apply_overrides(load_recipe(recipe_path), extra)
    if sparsities is not None:
        for scheme in (recipe.get("sweep") or {}).get("schemes") or []:
            if isinstance(scheme, dict):
                scheme.pop("sparsities", None)
    return recipe


def run_sweep(recipe_path: str | Path, federation: str | Path, out: str | Path, *,
              sparsities: list[float] | None = None, overrides: list[str] | None = None, jobs: int = 1,
              progress: Callable[[SweepRun, str], None] | None = None) -> list[SweepRun]:
    out = Path(out)
    recipe = resolved_recipe(recipe_path, overrides, sparsities)
    fed = Federation(federation)
    runs = plan_runs(recipe, out)
    cfg = parse_config(recipe)
    splits = cfg.sweep.splits or [s for s, m in fed.eval_splits.items() if m["role"] == "test"]
    for s in splits:
        if s not in fed.eval_splits:
            raise FedasrError(f"sweep.splits: unknown split {s!r} (federation has: {', '.join(fed.eval_splits)})")
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.yaml"
    text = yaml.safe_dump(recipe, sort_keys=False)
    if recipe_file.is_file() and recipe_file.read_text() != text:
        raise FedasrError(f"{recipe_file}: this sweep directory was made with another recipe; use a new --out")
    atomic_write_text(recipe_file, text)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

    def one(run: SweepRun) -> SweepRun:
        if _finished(run, splits, cfg.fl.rounds):
            if progress:
                progress(run, "skipped (finished)")
            return run
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.path / SWEEP_FILE, json.dumps({"scheme": run.scheme, "sparsity": run.sparsity,
                                                             "settings": run.settings, "knob": run.knob}))
        log = run.path / "log.txt"
        if RunDir(run.path).latest() is not None:
            _cli(["train", "--resume", str(run.path)], log, threads)
        else:
            sets = [a for s in run.settings for a in ("--set", s)]
            _cli(["train", "--federation", str(fed.root), "--config", str(recipe_file), "--out", str(run.path),
                  "--overwrite", *sets], log, threads)
        evals = [a for s in splits for a in ("--split", s)]
        _cli(["eval", "--run", str(run.path), "--beam", str(cfg.sweep.beam), *evals], log, threads)
        if progress:
            progress(run, "done")
        return run

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        list(ex.map(one, runs))
    return runs


# ---------------------------------------------------------------------------- report
def collect(sweep_dir: str | Path) -> tuple[list[dict], list[str]]:
    from fedasr import codec
    from fedasr.checkpoint import read_checkpoint
    from fedasr.fl.server import is_bn_stat

    sweep_dir = Path(sweep_dir)
    rows, splits = [], []
    run_files = sorted((sweep_dir / "runs").glob(f"**/{SWEEP_FILE}"))
    if not run_files:
        raise FedasrError(f"{sweep_dir}: no sweep runs found (run `fedasr sweep` first)")
    for f in run_files:
        run = RunDir(f.parent)
        meta = json.loads(f.read_text())
        results = run.results()
        latest = run.latest()
        if not results or latest is None:
            continue  # unfinished run
        metrics = run.metrics()
        ckpt = read_checkpoint(latest)
        params = {k: v for k, v in ckpt["model"].items() if not is_bn_stat(k)}
        knob = meta.get("knob")
        row = {"scheme": meta["scheme"], "sparsity": meta["sparsity"],
               "knob": f"{knob['key'].rsplit('.', 1)[-1]}={knob['value']}" if knob else "",
               "achieved_sparsity": round(metrics[-1].get("sparsity", 0.0), 5)}
        for split, r in sorted(results.items()):
            row[f"wer_{split}"] = round(r["wer"], 5)
            if split not in splits:
                splits.append(split)
        row["nonzero_params"] = sum(int((v != 0).sum()) for v in params.values())
        row["model_bytes"] = len(codec.encode(params, ckpt["masks"]))
        row["comm_bytes"] = sum(m["bytes_down"] + m["bytes_up"] for m in metrics)
        row["num_params"] = metrics[-1].get("num_params", sum(v.numel() for v in params.values()))
        row["rounds"] = metrics[-1]["round"]
        rows.append(row)
    rows.sort(key=lambda r: (r["scheme"] != "dense", r["scheme"], r["sparsity"], r["achieved_sparsity"]))
    return rows, sorted(splits)


def plot_curves(rows: list[dict], splits: list[str], title: str):
    """One panel per split: WER vs sparsity, one line per scheme, the dense WER as a dashed
    reference and each point labelled with its model size; a last panel: WER vs model size
    (sparse-encoded MB), where an engineer picks a point by the size budget."""
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r["scheme"] == "dense"]
    schemes = sorted({r["scheme"] for r in rows} - {"dense"})
    colors = {sch: f"C{i}" for i, sch in enumerate(schemes)}
    fig, axes = plt.subplots(1, len(splits) + 1, figsize=(5.2 * (len(splits) + 1), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        key = f"wer_{split}"
        if dense and key in dense[0]:
            ax.axhline(100 * dense[0][key], color="0.4", ls="--", lw=1,
                       label=f"dense {100 * dense[0][key]:.1f}% ({dense[0]['model_bytes'] / 1e6:.1f} MB)")
        for sch in schemes:
            own = [r for r in rows if r["scheme"] == sch]
            knobbed = any(r.get("knob") for r in own)  # the method chose its sparsity: points
            pts = sorted((r for r in (own if knobbed else dense + own) if key in r),
                         key=lambda r: r["achieved_sparsity"])
            ax.plot([100 * r["achieved_sparsity"] for r in pts], [100 * r[key] for r in pts],
                    marker="D" if knobbed else "o", ls=":" if knobbed else "-", color=colors[sch], label=sch)
            for r in pts:
                if r["scheme"] != "dense":
                    label = f"{r['model_bytes'] / 1e6:.1f} MB" + (f" ({r['knob']})" if r.get("knob") else "")
                    ax.annotate(label, (100 * r["achieved_sparsity"], 100 * r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
        ax.set_title(split)
        ax.set_xlabel("sparsity of prunable weights (%)")
        ax.set_ylabel("WER (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for i, split in enumerate(splits):
        key = f"wer_{split}"
        for sch in schemes:
            pts = sorted((r for r in dense + [r for r in rows if r["scheme"] == sch] if key in r),
                         key=lambda r: r["model_bytes"])
            ax.plot([r["model_bytes"] / 1e6 for r in pts], [100 * r[key] for r in pts], marker="os^v"[i % 4],
                    ls=["-", ":", "-.", "--"][i % 4], color=colors[sch], label=f"{sch} · {split}")
        if dense and key in dense[0]:
            ax.plot([dense[0]["model_bytes"] / 1e6], [100 * dense[0][key]], marker="*", ms=10, color="0.3", ls="",
                    label=f"dense · {split}")
    ax.set_title("WER vs model size")
    ax.set_xlabel("model size, sparse-encoded (MB)")
    ax.set_ylabel("WER (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_report(sweep_dir: str | Path) -> tuple[list[dict], list[str], Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    rows, splits = collect(sweep_dir)
    if not rows:
        raise FedasrError(f"{sweep_dir}: no finished run to report")
    cols = ["scheme", "sparsity", "knob", "achieved_sparsity", *[f"wer_{s}" for s in splits], "nonzero_params",
            "num_params", "model_bytes", "comm_bytes", "rounds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    csv_path = sweep_dir / "wer_vs_sparsity.csv"
    atomic_write_text(csv_path, buf.getvalue())

    fig = plot_curves(rows, splits, f"WER vs sparsity — {sweep_dir.name}")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    png_path = sweep_dir / "wer_vs_sparsity.png"
    atomic_write_bytes(png_path, png.getvalue())
    return rows, splits, csv_path, png_path
