"""Pruning masks: boolean tensors keyed by parameter name.

Masks are applied by multiplying ``param.data`` after every optimizer step and by
masking gradients; no ``torch.nn.utils.prune`` hooks (slower, and silently skipped on
some modules).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from fedasr.aggregate import is_bn_stat
from fedasr.errors import FedasrError

Masks = dict[str, torch.Tensor]


def prunable_names(model: nn.Module, include: list[str], exclude: list[str] | None = None) -> list[str]:
    """Parameters with at least 2 dims whose name matches an ``include`` glob and no
    ``exclude`` glob (norms and biases are 1-D and never prunable; embeddings are not in
    the default globs)."""
    exclude = exclude or []
    names = [n for n, p in model.named_parameters()
             if p.dim() >= 2 and any(fnmatch(n, g) for g in include) and not any(fnmatch(n, g) for g in exclude)]
    if not names:
        raise FedasrError(f"pruning.include: no prunable parameter matches {include}")
    return names


def masks_like_parameters(model: nn.Module, masks: Masks) -> Masks:
    """``masks`` as multipliers on their parameters' device and in their dtype (made once,
    e.g. once per round: :func:`apply_masks` and :func:`mask_gradients` then copy nothing
    to the device)."""
    params = dict(model.named_parameters())
    return {n: m.to(device=params[n].device, dtype=params[n].dtype) for n, m in masks.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params[name]
        p.mul_(m.to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: Masks) -> None:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(m.to(device=g.device, dtype=g.dtype))


def sparsity_report(state: dict[str, torch.Tensor], names: list[str]) -> dict:
    """Share of zeros among the prunable tensors ``names`` of a state dict, overall and per tensor."""
    total = zeros = 0
    per_layer = {}
    for n in names:
        t = state[n]
        z = int((t == 0).sum())
        per_layer[n] = z / t.numel()
        total += t.numel()
        zeros += z
    all_params = sum(t.numel() for k, t in state.items() if t.is_floating_point() and not is_bn_stat(k))
    return {"sparsity": zeros / max(1, total), "prunable": total, "prunable_zeros": zeros,
            "prunable_fraction": total / max(1, all_params), "per_layer": per_layer}
