#!/usr/bin/env python
"""Benchmark of the synthetic transcript generator (the corpus synthesis front end).

Prints time per batch of sentences and its ratio to the budget it should stay well under
(these were wall-clock asserts in the tests, which a busy 2-core machine made flaky):

1. 50,000 'open'-domain sentences (budget 5 s), 200,000 (budget 20 s);
2. refusing an impossible request (10^12 'small' sentences) — budget 1 s: the grammar's
   capacity is checked before any sentence is drawn.

    python scripts/bench_text.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import random

from benchlib import best_time
from fedasr.data import text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    text.vocabulary("open")  # build the grammars outside the timing
    text.vocabulary("small")

    def refuse():
        try:
            text.generate_sentences("small", 10**12, random.Random(0))
        except ValueError:
            return
        raise AssertionError("an impossible request was accepted")

    rows = [
        ("open, 50,000 sentences", best_time(args.repeat, lambda: text.generate_sentences("open", 50_000,
                                                                                          random.Random(5))), 5.0),
        ("open, 200,000 sentences", best_time(args.repeat, lambda: text.generate_sentences("open", 200_000,
                                                                                           random.Random(0))), 20.0),
        ("small, refuse 10^12", best_time(args.repeat, refuse), 1.0),
    ]
    print(f"{'what':<28} {'seconds':>9} {'budget':>8} {'ratio':>7}")
    for what, secs, budget in rows:
        print(f"{what:<28} {secs:9.3f} {budget:8.1f} {secs / budget:7.3f}")


if __name__ == "__main__":
    main()
