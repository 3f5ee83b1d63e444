"""`fedasr info`: what a checkpoint holds — per-layer shape, sparsity and nonzeros;
parameter, byte (dense and sparse-encoded) and FLOP totals."""

from __future__ import annotations

from pathlib import Path

from fedasr import codec
from fedasr.commands import load, prunable_names
from fedasr.model.flops import count_flops
from fedasr.prune.masks import sparsity_report


def checkpoint_info(path: str | Path, seconds: float = 10.0) -> dict:
    ckpt = load(path)
    model = ckpt.model
    state = model.state_dict()
    names = prunable_names(ckpt)
    rep = sparsity_report(state, names)
    params = {n: p.detach() for n, p in model.named_parameters()}
    layers = [{"name": n, "shape": list(p.shape), "numel": p.numel(), "nonzeros": int((p != 0).sum()),
               "sparsity": float((p == 0).float().mean()), "prunable": n in names}
              for n, p in params.items() if p.dim() >= 2]
    masks = ckpt.masks
    return {
        "checkpoint": str(ckpt.path),
        "parameters": sum(p.numel() for p in params.values()),
        "nonzeros": sum(int((p != 0).sum()) for p in params.values()),
        "prunable": rep["prunable"],
        "prunable_fraction": rep["prunable_fraction"],
        "sparsity": rep["sparsity"],
        "masked_tensors": len(masks),
        "dense_bytes": len(codec.encode(params)),
        "sparse_bytes": len(codec.encode(params, masks)),
        **count_flops(model, seconds),
        "layers": layers,
    }
