#!/usr/bin/env python
"""Host syncs per training step, counted on the CPU (fedasr.hostsync.HostSyncCounter): the
number of times a CUDA run of one ``train_step`` would make the host wait for the device.

The step is the recipe's (model, losses, masks of 50% sparsity applied by the pruning
hooks after backward and after the step, as every federated client does), on a synthetic
batch; one warm-up step first, then the counted ones. The count does not depend on the
batch's shape (only on the number of layers), so a small batch keeps it quick.

    python scripts/bench_host_syncs.py                                   # this tree
    python scripts/bench_host_syncs.py --tree /tmp/old_checkout          # another tree's fedasr
    python scripts/bench_host_syncs.py --recipe recipes/ci.yaml -B 4 -T 300 -U 30

``--tree``: import fedasr from that checkout (e.g. the commit before a change, for a
before/after comparison); the counter itself comes from this tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _counter_module():
    spec = importlib.util.spec_from_file_location("fedasr_hostsync_bench", REPO / "fedasr" / "hostsync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/librispeech100/federated_pruning.yaml"))
    p.add_argument("--tree", type=Path, help="import fedasr from this checkout instead")
    p.add_argument("-B", type=int, default=4)
    p.add_argument("-T", type=int, default=400, help="frames (10 ms) of the longest utterance")
    p.add_argument("-U", type=int, default=30)
    p.add_argument("--steps", type=int, default=2, help="steps counted (after one warm-up step)")
    p.add_argument("--sparsity", type=float, default=0.5, help="masks applied by the pruning hooks (0: none)")
    p.add_argument("--set", action="append", default=[], help="a recipe override (e.g. train.loss=full)")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--where", action="store_true", help="list the syncs by the line of fedasr that made them")
    a = p.parse_args(argv)
    sys.path.insert(0, str(a.tree.resolve() if a.tree else REPO))
    sys.path.insert(1, str(REPO / "scripts"))
    hostsync = _counter_module()
    import torch

    from benchlib import synthetic_batch
    from fedasr.config import load_config
    from fedasr.methods.base import ClientHooks
    from fedasr.model.transducer import ModelConfig, Transducer
    from fedasr.prune.masks import prunable_names
    from fedasr.trainer import make_optimizer, train_step

    torch.set_num_threads(1)
    cfg = load_config(a.recipe, ["device=cpu", *a.set])
    V = 256
    torch.manual_seed(0)
    model = Transducer(ModelConfig.preset(cfg.model.preset, vocab_size=V, **cfg.model.overrides))
    opt = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(1)
    masks = {} if a.sparsity <= 0 else {
        n: torch.rand(p.shape, generator=g) >= a.sparsity
        for n, p in model.named_parameters() if n in set(prunable_names(model, cfg.pruning.include, cfg.pruning.exclude))}
    hooks = ClientHooks(masks)
    batches = [synthetic_batch(a.B, a.T, a.U, V, seed=i) for i in range(a.steps + 1)]
    kw = dict(after_backward=hooks.after_backward, after_step=hooks.after_step)
    with hostsync.HostSyncCounter() as c:
        c.on_device(model.parameters(), model.buffers())
        c.counting = False  # the warm-up step: what it puts on the device is followed, nothing counted
        train_step(model, opt, batches[0], cfg.train, 0, **kw)
        c.counting = True
        for i in range(a.steps):
            train_step(model, opt, batches[i + 1], cfg.train, i + 1, **kw)
    res = {"tree": str(a.tree or REPO), "recipe": a.recipe, "model": cfg.model.preset,
           "layers": model.cfg.num_layers, "loss": cfg.train.loss, "shape": f"B{a.B} T{a.T} U{a.U} V{V}",
           "masked_tensors": len(masks), "syncs_per_step": c.syncs / a.steps,
           "copies_to_device_per_step": c.copies_to_device / a.steps,
           "by_kind": {k: v / a.steps for k, v in sorted(c.kinds.items())}}
    print(f"{res['tree']}: {cfg.model.preset} ({res['layers']} layers), train.loss={res['loss']}, {res['shape']}, "
          f"{len(masks)} masked tensors")
    print(f"  host syncs per training step: {res['syncs_per_step']:g}; host-to-device copies per step: "
          f"{res['copies_to_device_per_step']:g}")
    for k, v in res["by_kind"].items():
        print(f"    {v:7g}  {k}")
    if a.where:
        for (kind, where), v in sorted(c.where.items(), key=lambda kv: -kv[1]):
            print(f"    {v / a.steps:7g}  {kind:30s} {where}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
