#!/usr/bin/env python
"""Benchmark of in-round pruning masks, ratios measured in one run.

1. Masked training step / dense training step (goal <= 1.05) for a preset (default
   `small`) on CPU: the same batches, steps alternating between a dense model and a
   masked one (gradients masked after backward, weights re-masked after the step).
2. Upload bytes at sparsity s / dense bytes (goal <= (1 - s) + 1/32 + 1%), from the real
   payload encoder, for the prunable tensors and for the whole update.

    python scripts/bench_pruning.py [--preset small] [--steps 6] [--sparsity 0.5 0.8]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import synthetic_batch
from fedasr import codec
from fedasr.config import PruningSection, TrainSection
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.methods.base import ClientHooks
from fedasr.methods.federated_pruning import FederatedPruning, FederatedPruningConfig
from fedasr.trainer import make_optimizer, train_step


def step(model, opt, b, hooks, cfg, i: int) -> float:
    """Seconds of the trainer's real optimisation step ``i`` on batch ``b`` (with the
    method's client hooks when ``hooks`` is given)."""
    t0 = time.perf_counter()
    train_step(model, opt, b, cfg, i, after_backward=hooks.after_backward if hooks else None,
               after_step=hooks.after_step if hooks else None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8])
    a = ap.parse_args()
    V = 256
    torch.manual_seed(0)
    cfg = TrainSection()
    dense = Transducer(ModelConfig.preset(a.preset, vocab_size=V))
    masked = Transducer(ModelConfig.preset(a.preset, vocab_size=V))
    masked.load_state_dict(dense.state_dict())
    fp_cfg = FederatedPruningConfig(pattern="unstructured")
    common = PruningSection(method="federated_pruning", target_sparsity=a.sparsity[0])
    pruner = FederatedPruning(fp_cfg, common, masked, total_rounds=1, seed=0)
    masks = pruner.compute(1, {n: p.detach() for n, p in masked.named_parameters()}, {})
    plan = ClientHooks(masks)
    plan.after_step(masked)
    opt_d, opt_m = make_optimizer(dense, cfg), make_optimizer(masked, cfg)
    batches = [synthetic_batch(a.batch, a.frames, a.tokens, V, i) for i in range(a.steps + 1)]
    step(dense, opt_d, batches[0], None, cfg, 0)  # warm-up
    step(masked, opt_m, batches[0], plan, cfg, 0)
    td = tm = 0.0
    for i, b in enumerate(batches[1:], 1):  # alternate to share any drift in machine speed
        td += step(dense, opt_d, b, None, cfg, i)
        tm += step(masked, opt_m, b, plan, cfg, i)
    print(f"{a.preset}: {dense.num_parameters():,} parameters, batch {a.batch} x {a.frames} frames, "
          f"{a.steps} steps each, {torch.get_num_threads()} threads")
    print(f"dense step {td / a.steps:.3f} s, masked step ({100 * a.sparsity[0]:.0f}% unstructured) "
          f"{tm / a.steps:.3f} s -> masked/dense = {tm / td:.3f} (goal <= 1.05)")
    zeros = all(bool(torch.all(dict(masked.named_parameters())[n][~m] == 0)) for n, m in masks.items())
    print(f"pruned weights exactly zero after training: {zeros}")

    state = {k: v.detach() for k, v in dense.state_dict().items()}
    for s in a.sparsity:
        common.target_sparsity = s
        m = FederatedPruning(fp_cfg, common, dense, total_rounds=1, seed=0).compute(
            1, {n: p.detach() for n, p in dense.named_parameters()}, {})
        prunable = {k: state[k] for k in m}
        ratio_p = len(codec.encode(prunable, m)) / len(codec.encode(prunable))
        ratio_all = len(codec.encode(state, m)) / len(codec.encode(state))
        goal = (1 - s) + 1 / 32 + 0.01
        print(f"sparsity {s:.2f}: upload bytes / dense = {ratio_p:.4f} for the prunable tensors "
              f"(goal <= {goal:.4f}: {'ok' if ratio_p <= goal else 'MISSED'}); {ratio_all:.4f} for the whole update")


if __name__ == "__main__":
    main()
