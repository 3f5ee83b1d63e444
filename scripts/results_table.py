#!/usr/bin/env python
"""README's results table from a sweep's CSV (`fedasr report`): one row per run, test WER and
its ratio to the same sweep's dense run on test-clean. tests/test_docs.py checks that README's
table is this script's output for the committed docs/wer_vs_sparsity_full.csv.

    python scripts/results_table.py [docs/wer_vs_sparsity_full.csv]
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def results_table(csv_path: Path) -> str:
    rows = list(csv.DictReader(Path(csv_path).open()))
    dense = next((float(r["wer_test-clean"]) for r in rows if r["scheme"] == "dense"), None)
    if dense is None:
        raise SystemExit(f"{csv_path}: no dense run to compare with")
    out = ["| scheme | target | sparsity reached | test-clean | vs dense | test-other | nonzero parameters |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        clean, other = float(r["wer_test-clean"]), float(r["wer_test-other"])
        target = r["knob"].replace("=", " = ") if r["knob"] else f"{float(r['sparsity']):.1f}"
        out.append(f"| {r['scheme']} | {target} | {100 * float(r['achieved_sparsity']):.1f}% | {100 * clean:.2f}% | "
                   f"{clean / dense:.2f}x | {100 * other:.2f}% | {int(r['nonzero_params']):,} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(results_table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/wer_vs_sparsity_full.csv")), end="")
