"""`fedasr prune`: one-shot pruning of a checkpoint (the centralized-pruning baseline),
with Federated Pruning's patterns, importances and allocations."""

from __future__ import annotations

from pathlib import Path

import torch

from fedasr.checkpoint import save_checkpoint
from fedasr.commands import load, prunable_names
from fedasr.config import PruningSection, resolve_device
from fedasr.configlib import from_dict
from fedasr.data.batching import AsrDataset
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError, OptionError
from fedasr.methods.federated_pruning import FederatedPruning, FederatedPruningConfig, GradientHooks
from fedasr.model.transducer import Transducer
from fedasr.prune.masks import apply_masks, sparsity_report
from fedasr.trainer import transducer_loss


def gradient_report(model: Transducer, names: list[str], fed: Federation, batches: int, seed: int,
                    device: str = "cpu") -> dict:
    """Mean |gradient| of ``names`` over ``batches`` training batches of the federation
    (what a client reports for gradient importance), computed on ``device``; returned on the CPU
    (the model is moved back there)."""
    ds = AsrDataset(fed.all_client_cuts(), fed.tokenizer, fed.cmvn, cache=False)
    acc = GradientHooks({}, names)
    dev = resolve_device(device)
    model.to(dev)
    # eval mode: BatchNorm normalises with (and does not update) the checkpoint's running
    # statistics, and no dropout; gradients flow all the same
    model.eval()
    torch.manual_seed(seed)
    for i, batch in enumerate(ds.batches(40.0, seed=seed)):
        if i >= batches:
            break
        model.zero_grad(set_to_none=True)
        loss, _ = transducer_loss(model, batch, 0.0)  # it moves the batch to the model's device
        loss.backward()
        acc.after_backward(model)
    model.zero_grad(set_to_none=True)
    model.to("cpu")
    return {k: v.cpu() for k, v in acc.report().tensors.items()}


def prune_checkpoint(path: str | Path, out: str | Path, *, sparsity: float, pattern: str, importance: str,
                     allocation: str, norm: str = "l2", federation: str | Path | None = None,
                     batches: int = 8, seed: int = 0, max_layer_sparsity: float = 0.95, device: str = "auto") -> dict:
    """One-shot pruning of the checkpoint ``path`` (a file, a run directory or RUN/checkpoints/latest)
    into ``out``; returns the sparsity report with the file pruned (``checkpoint``)."""
    if not 0 <= sparsity < 1:
        raise OptionError(f"--sparsity: must be in [0, 1), got {sparsity}")
    ckpt = load(path)
    path = ckpt.path
    model, tok = ckpt.model, ckpt.tokenizer
    cfg = from_dict(FederatedPruningConfig, {"pattern": pattern, "importance": importance, "norm": norm,
                                             "allocation": allocation, "refine": False,
                                             "max_layer_sparsity": max(max_layer_sparsity, sparsity)}, "")
    # the method prunes exactly the checkpoint's prunable tensors: their names are the globs
    # (a parameter name has no glob character, so each matches itself only)
    common = PruningSection(method="federated_pruning", target_sparsity=sparsity, include=prunable_names(ckpt),
                            exclude=[])
    method = FederatedPruning(cfg, common, model, total_rounds=1, seed=seed)
    grads = None
    if importance == "gradient":
        if federation is None:
            raise OptionError("--importance gradient: needs --federation to compute gradients on training data")
        fed = Federation(federation)
        if fed.tokenizer.proto != tok.proto:
            raise FedasrError(f"{path}: the checkpoint's tokenizer differs from {fed.root}/tokenizer.model")
        grads = gradient_report(model, method.names, fed, batches, seed, device)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    masks = method.compute(1, weights, ckpt.masks, grads)
    apply_masks(model, masks)
    config = dict(ckpt.config)
    config["pruned_from"] = str(path)
    config["oneshot_pruning"] = {"sparsity": sparsity, "pattern": pattern, "importance": importance,
                                 "allocation": allocation, "norm": norm, "seed": seed}
    save_checkpoint(out, model, tok, masks=masks, config=config)
    return {**sparsity_report(model.state_dict(), method.names), "checkpoint": str(path)}
