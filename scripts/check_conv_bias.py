#!/usr/bin/env python
"""Evidence for the conv modules' depthwise biases (they sit right before BatchNorm).

In training mode BatchNorm subtracts each channel's batch mean, so a per-channel bias added
just before it cancels: the loss does not depend on it and its gradient is numerical noise.
AdamW divides a gradient by its own running RMS, so noise becomes a full-size step
(~lr per step). This prints, for one batch of the given federation's first client and the
recipe's model: the loss change when every depthwise bias moves by +1 (training mode), the
gradient sizes of those biases against the other parameters, and how far one and 20 AdamW
steps move them.

    python scripts/check_conv_bias.py --federation demo/federation [--set model.name=small]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federation", required=True)
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.client import make_dataset
    from fedasr.fl.client import model_config
    from fedasr.model.transducer import Transducer
    from fedasr.trainer import make_optimizer, transducer_loss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config(None, a.set)
    fed = Federation(a.federation)
    model = Transducer(model_config(cfg, fed.tokenizer.vocab_size))
    model.train()
    ds = make_dataset(fed.client_cuts(sorted(fed.client_ids)[0]), fed.tokenizer, fed.cmvn, cfg)
    ds.spec_augment = None
    batch = next(ds.batches(cfg.train.max_duration, seed=0))
    biases = [n for n, _ in model.named_parameters() if n.endswith("depthwise.bias")]
    params = dict(model.named_parameters())

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks
        return transducer_loss(model, batch, 0.0)[0]

    base = loss()
    base.backward()
    with torch.no_grad():
        for n in biases:
            params[n] += 1.0
        moved = loss()
        for n in biases:
            params[n] -= 1.0
    g_bias = max(float(params[n].grad.abs().max()) for n in biases)
    others = [float(p.grad.abs().mean()) for n, p in params.items() if n not in biases and p.grad is not None]
    b, m = float(base.detach()), float(moved)
    print(f"loss {b:.6f}; every depthwise bias +1 -> {m:.6f} (change {abs(m - b):.2e})")
    print(f"depthwise bias gradients: max |g| {g_bias:.2e}; other parameters: median mean |g| "
          f"{sorted(others)[len(others) // 2]:.2e}")
    opt = make_optimizer(model, cfg.train)
    start = {n: params[n].detach().clone() for n in biases}
    for step in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
        if step in (0, 19):
            d = max(float((params[n] - start[n]).abs().max()) for n in biases)
            print(f"after {step + 1} AdamW step(s) at lr {cfg.train.lr:g}: depthwise biases moved up to {d:.2e}")


if __name__ == "__main__":
    main()
