"""Weight-for-weight equivalence of training runs across a code change.

Trains four configurations that together exercise every part of the federated core
(dense FedAvg; Federated Pruning with a column pattern, a step schedule and mask
refinement under FedAdam; FedTiny with its BatchNorm candidate selection and prune/regrow;
ASP with a shrink of the architecture), with the embedded engine and with Flower, and
writes a digest of each run's last checkpoint: the SHA-256 of every weight, mask and
training-state tensor, and the metrics rows without their timings.

    python scripts/check_equivalence.py --out /tmp/eq_before          # on the old tree
    python scripts/check_equivalence.py --out /tmp/eq_after           # on the new tree
    python scripts/check_equivalence.py --compare /tmp/eq_before/digest.json /tmp/eq_after/digest.json

A control that the comparison can fail: ``--configs dense_fedavg --engines embedded --set
fl.server_lr=0.999`` gives a digest that differs in weights and metrics.

``--federation`` reuses a federation; without it a small synthetic one is built in OUT
(the tests' corpus: 4 speakers x 12 utterances, 2 server speakers). ``bytes_up`` may
differ by a few bytes between runs: a reply carries the client's own timing as text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

FAST = ["fl.clients_per_round=2", "fl.local_steps=2", "train.max_duration=20", "eval.dev_max_utterances=4",
        "train.warmup_steps=5", "eval.every=2",
        "model.overrides={num_layers: 1, d_model: 64, ffn_dim: 128, pred_hidden: 64, pred_embed_dim: 64, "
        "joint_dim: 64}"]

CONFIGS = {
    "dense_fedavg": ["fl.rounds=3", "fl.aggregation=fedavg"],
    "fp_column_refine": ["fl.rounds=4", "fl.aggregation=fedadam", "pruning.method=federated_pruning",
                         "pruning.target_sparsity=0.5",
                         "pruning.federated_pruning={pattern: column, schedule: step, step_size: 0.2, step_every: 1, "
                         "refine: true}"],
    "fedtiny_selection": ["fl.rounds=4", "pruning.method=fedtiny", "pruning.target_sparsity=0.5",
                          "pruning.fedtiny={candidates: 2, start_round: 1, update_every: 1, end_round: 3, "
                          "phase_batches: 1}"],
    "asp_shrink": ["fl.rounds=3", "fl.aggregation=fedavgm", "pruning.method=asp",
                   "pruning.asp={k: 0.8, patience: 1, max_prune_round: 2}"],
}
ENGINES = ("embedded", "flower")
TOLERANT = ("bytes_up",)  # the reply's timing text: a few bytes either way


def build_federation(out: Path) -> Path:
    from fedasr.data import synth
    from fedasr.data.federation import ShardOptions, shard

    fed = out / "federation"
    if (fed / "federation.yaml").is_file():
        return fed
    plan = synth.plan_corpus(speakers=4, utterances_per_speaker=12, seed=7, domain="small", test_other_speakers=1,
                             dev_per_speaker=2, test_per_speaker=2, server_speakers=2)
    synth.synthesize_corpus(out / "corpus", plan, jobs=2)
    shard(ShardOptions(corpus=out / "corpus" / "LibriSpeech", train_splits=["train"], dev_splits=["dev"],
                       test_splits=["test-clean", "test-other"], server_splits=["train-server"], out=fed,
                       vocab_size=48, jobs=2))
    return fed


def tensor_sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(t.numpy().tobytes() if t.dtype != torch.bfloat16
                                                           else t.view(torch.int16).numpy().tobytes()).hexdigest()[:16]


def digest_tree(x, skip=()):
    """Tensors -> their hashes; dicts and lists recursively; timings dropped."""
    if isinstance(x, torch.Tensor):
        return tensor_sha(x)
    if isinstance(x, dict):
        return {str(k): digest_tree(v, skip) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))
                if not (isinstance(k, str) and ("time" in k or k in skip))}
    if isinstance(x, (list, tuple)):
        return [digest_tree(v, skip) for v in x]
    return x


def digest_run(run: Path) -> dict:
    from fedasr.checkpoint import read_checkpoint

    latest = sorted((run / "checkpoints").glob("round_*.pt"))[-1]
    ck = read_checkpoint(latest)
    st = dict(ck["state"])
    st.pop("torch_rng", None)
    history = st.pop("history")
    return {"checkpoint": latest.name, "model_config": ck["model_config"], "weights": digest_tree(ck["model"]),
            "masks": digest_tree(ck["masks"]), "state": digest_tree(st),
            "metrics": digest_tree(history, skip=TOLERANT), "bytes_up": [r.get("bytes_up") for r in history]}


def train(fed: Path, out: Path, engine: str, settings: list[str]) -> None:
    args = [sys.executable, "-m", "fedasr.cli", "train", "--federation", str(fed), "--out", str(out), "--overwrite"]
    if engine == "flower":
        args += ["--engine", "flower", "--slots", "2"]
    for s in FAST + settings:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{out}: training failed:\n{res.stderr[-3000:]}{res.stdout[-2000:]}")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"{key}: only in {'the second' if key in b else 'the first'}")
            bad += 1
            continue
        x, y = a[key], b[key]
        diffs = [part for part in ("checkpoint", "model_config", "weights", "masks", "state", "metrics")
                 if x[part] != y[part]]
        up = max((abs(p - q) for p, q in zip(x["bytes_up"], y["bytes_up"]) if p is not None), default=0)
        if up >= 16 or len(x["bytes_up"]) != len(y["bytes_up"]):
            diffs.append(f"bytes_up (max diff {up})")
        n = len(x["weights"]) + len(x["masks"])
        print(f"{key}: {'IDENTICAL' if not diffs else 'DIFFERS in ' + ', '.join(diffs)} "
              f"({n} weight/mask tensors, {len(x['metrics'])} metric rows, {x['checkpoint']})")
        bad += bool(diffs)
    print("all identical" if not bad else f"{bad} differ")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--federation", type=Path)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--set", action="append", default=[], help="a setting added to every configuration "
                    "(e.g. a deliberate change, to see the comparison fail)")
    ap.add_argument("--compare", nargs=2, type=Path)
    a = ap.parse_args()
    if a.compare:
        raise SystemExit(compare(*a.compare))
    if a.out is None:
        ap.error("--out is needed (or --compare A B)")
    a.out.mkdir(parents=True, exist_ok=True)
    fed = a.federation or build_federation(a.out)
    digest = {}
    for name in a.configs.split(","):
        for engine in a.engines.split(","):
            run = a.out / f"{name}-{engine}"
            print(f"training {run.name} ...", flush=True)
            train(fed, run, engine, CONFIGS[name] + a.set)
            digest[run.name] = digest_run(run)
    (a.out / "digest.json").write_text(json.dumps(digest, indent=1, sort_keys=True))
    print(f"wrote {a.out / 'digest.json'}")


if __name__ == "__main__":
    main()
