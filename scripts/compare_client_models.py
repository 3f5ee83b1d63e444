#!/usr/bin/env python
"""Masked against compacted clients (``fl.client_model``): the same FP unit run twice, the
largest differences of the served weights printed per tensor (README, compacted clients).

    python scripts/compare_client_models.py --federation demo/federation [--rounds 3] \\
        [--set train.optimizer=sgd] [--set fl.aggregation=fedadam]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAST  # noqa: E402  (the tests' fast model and round settings)


def main() -> None:
    import torch

    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.runner import Runner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federation", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fed = Federation(args.federation)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("masked", "compact"):
            cfg = load_config(None, FAST + [
                f"fl.rounds={args.rounds}", "eval.every=0", "model.overrides.dropout=0.0",
                "pruning.method=federated_pruning", f"pruning.target_sparsity={args.sparsity}",
                "pruning.federated_pruning.pattern=unit", "pruning.federated_pruning.schedule=constant"]
                + args.sets + [f"fl.client_model={mode}"])
            r = Runner(Path(tmp) / mode, fed, cfg)
            r.start()
            rows = r.run_rounds()
            out[mode] = (r.server.served_state(), r.masks, dict(r.model.named_parameters()))
            print(f"{mode}: bytes down/up per round {[(x['bytes_down'], x['bytes_up']) for x in rows]}")
    (a, ma, params), (b, mb, _) = out["masked"], out["compact"]
    print("same masks:", set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma))
    diffs = sorted(((float((a[k].double() - b[k].double()).abs().max()), k) for k in a if a[k].numel()), reverse=True)
    print(f"max |difference| over parameters: {max(d for d, k in diffs if k in params):.3g}")
    for d, k in diffs[: args.top]:
        print(f"  {d:10.3g}  {k}{'' if k in params else '  (buffer)'}")


if __name__ == "__main__":
    main()
