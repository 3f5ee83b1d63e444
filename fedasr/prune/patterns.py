"""Pruning patterns (granularity) and group importance.

A *layer* is the unit of sparsity allocation; it owns *groups*, the units that are pruned
together. For the tensor patterns a layer is one prunable tensor:

- ``unstructured``: every element is a group.
- ``row``: a row (dim 0: one output unit) — for conv kernels (out, in, k) all of (in, k).
- ``column``: a column (dim 1: one input) — for conv kernels all of (out, k). Depthwise
  kernels (d, 1, k) have one column only, so they fall back to rows (channels).
- ``half_row`` / ``half_column``: each row (column) split into two halves, each half a group.

For ``unit`` a layer is one family of the model's group table
(:meth:`Transducer.group_table`): FFN hidden units, attention heads, conv-module channels,
LSTM predictor units and joiner units; a group removes one unit everywhere at once
(weights, biases and BatchNorm affine parameters), so masks can later become a physically
smaller model.

Group importance is per element, so groups of different sizes compare: ``l1`` is the mean
|w| over the group, ``l2`` the root mean square; ``gradient`` is the first-order Taylor
score |w|·ḡ (ḡ: mean |gradient| reported by the clients) averaged over the group;
``random`` a seeded uniform draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fedasr.errors import FedasrError


@dataclass
class Layer:
    name: str
    scores: torch.Tensor  # (G,) per-element importance of each group
    sizes: torch.Tensor  # (G,) prunable elements in each group
    expand: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # keep (G,) bool -> {param: mask}
    scale: float = 1.0  # sqrt(fan-in): weights start at ~1/scale, so scores*scale compare across layers

    @property
    def numel(self) -> int:
        return int(self.sizes.sum())


def group_ids(shape: tuple[int, ...], pattern: str) -> torch.Tensor:
    """Integer tensor of ``shape`` giving each element's group within its tensor."""
    numel = 1
    for s in shape:
        numel *= s
    rows = shape[0]
    cols = numel // rows
    if pattern == "column" and len(shape) >= 2 and shape[1] == 1:
        pattern = "row"  # depthwise kernels: a single input column
    if pattern == "unstructured":
        return torch.arange(numel).view(shape)
    if pattern == "row":
        return torch.arange(rows).view(-1, 1).expand(rows, cols).reshape(shape)
    if pattern == "column":
        ids = torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
        return ids.expand(shape).contiguous()
    if pattern == "half_row":
        half = (torch.arange(cols) >= (cols + 1) // 2).long()
        return (2 * torch.arange(rows).view(-1, 1) + half.view(1, -1)).reshape(shape)
    if pattern == "half_column":
        half = (torch.arange(rows) >= (rows + 1) // 2).long().view(-1, *([1] * (len(shape) - 1)))
        col = torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
        return (2 * col + half).expand(shape).contiguous()
    raise FedasrError(f"pruning.pattern: unknown {pattern!r}")


def element_importance(weight: torch.Tensor, importance: str, norm: str,
                       grad: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Per-element importance whose group mean (l1) or root mean (l2) is the group score."""
    w = weight.detach().double()
    if importance == "magnitude":
        return w.abs() if norm == "l1" else w * w
    if importance == "gradient":
        if grad is None:
            raise FedasrError("pruning.importance: gradient importance needs the clients' gradient reports")
        return w.abs() * grad.detach().double().abs()
    if importance == "random":
        return torch.rand(w.shape, generator=generator, dtype=torch.float64)
    raise FedasrError(f"pruning.importance: unknown {importance!r}")


def _finish(total: torch.Tensor, sizes: torch.Tensor, importance: str, norm: str) -> torch.Tensor:
    mean = total / sizes.clamp(min=1)
    return mean.sqrt() if importance == "magnitude" and norm == "l2" else mean


def tensor_layers(weights: dict[str, torch.Tensor], names: list[str], pattern: str, importance: str, norm: str,
                  grads: dict[str, torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> list[Layer]:
    layers = []
    for n in names:
        w = weights[n]
        gid = group_ids(tuple(w.shape), pattern).reshape(-1)
        G = int(gid.max()) + 1
        e = element_importance(w, importance, norm, (grads or {}).get(n), generator).reshape(-1)
        total = torch.zeros(G, dtype=torch.float64).index_add_(0, gid, e)
        sizes = torch.zeros(G, dtype=torch.float64).index_add_(0, gid, torch.ones_like(e))

        def expand(keep: torch.Tensor, n=n, gid=gid, shape=w.shape) -> dict[str, torch.Tensor]:
            return {n: keep[gid].view(shape)}

        layers.append(Layer(n, _finish(total, sizes, importance, norm), sizes, expand, fan_in_scale(w)))
    return layers


def fan_in_scale(w: torch.Tensor) -> float:
    """sqrt(fan-in) of a weight (inputs x kernel per output unit; LSTM: per gate row)."""
    return float(w[0].numel()) ** 0.5


def unit_layers(weights: dict[str, torch.Tensor], families, prunable: set[str], importance: str, norm: str,
                grads: dict[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> list[Layer]:
    """One layer per group family; scores from the family's prunable member weights."""
    layers = []
    for fam in families:
        members = [m for m in fam.members if m.param in weights]
        scored = [m for m in members if m.param in prunable]
        if not scored:
            continue
        total = torch.zeros(fam.num_units, dtype=torch.float64)
        sizes = torch.zeros(fam.num_units, dtype=torch.float64)
        scale = sum(fan_in_scale(weights[m.param]) * weights[m.param].numel() for m in scored) / sum(
            weights[m.param].numel() for m in scored)
        for m in scored:
            e = element_importance(weights[m.param], importance, norm, (grads or {}).get(m.param), generator)
            moved = e.movedim(m.dim, 0)  # (D, ...)
            per_index = moved.reshape(moved.shape[0], -1).sum(1)  # importance of each slice along dim
            count = moved[0].numel()
            total += per_index[m.index].sum(1)
            sizes += count * m.index.shape[1]

        def expand(keep: torch.Tensor, members=members) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for m in members:
                w = weights[m.param]
                drop = m.index[~keep].reshape(-1)
                mask = out.get(m.param, torch.ones(w.shape, dtype=torch.bool))
                mask.index_fill_(m.dim, drop, False)
                out[m.param] = mask
            return out

        layers.append(Layer(fam.name, _finish(total, sizes, importance, norm), sizes, expand, scale))
    return layers
