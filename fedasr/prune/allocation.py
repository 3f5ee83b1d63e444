"""Spreading a target sparsity across layers, and choosing the groups to prune.

- ``uniform``: every layer is pruned to the target (to one group).
- ``global``: one threshold on the per-element group importance over all layers; the
  lowest groups are pruned until the target share of prunable weights is reached. Scores
  are per element (mean |w| or RMS), i.e. normalised by group size, and multiplied by the
  layer's sqrt(fan-in) — weights are initialised at ~1/sqrt(fan-in), so raw magnitudes
  would always sacrifice the wide layers. No layer goes beyond ``max_layer_sparsity``.
- ``adaptive``: each layer gets its own sparsity from its importance. With I_l the mean
  per-element importance of layer l times its sqrt(fan-in), Ī the size-weighted mean,
  s_l = min(s_max, c · Ī / I_l), where c is solved (bisection) so that the size-weighted
  mean of s_l equals the target. Layers whose weights matter less (smaller magnitude, or
  smaller |w·g|) are pruned more; then groups are chosen within each layer as in uniform.
"""

from __future__ import annotations

import torch

from fedasr.prune.patterns import Layer


def _prune_lowest(layer: Layer, fraction: float, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-vector for ``layer`` with the lowest-scoring groups pruned until ``fraction``
    of its elements are pruned (within one group). ``forced`` groups are pruned first."""
    scores = layer.scores.clone()
    if forced is not None:
        scores[forced] = -torch.inf
    order = torch.argsort(scores, stable=True)
    target = fraction * layer.numel
    cum = torch.cumsum(layer.sizes[order], 0)
    # number of groups k such that the pruned size is closest to the target
    k = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
    if k < len(cum):
        below = float(cum[k - 1]) if k > 0 else 0.0
        if abs(float(cum[k]) - target) < abs(below - target):
            k += 1
    if forced is not None:
        k = max(k, int(forced.sum()))
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[order[:k]] = False
    return keep


def uniform(layers: list[Layer], target: float, forced=None) -> dict[str, torch.Tensor]:
    return {l.name: _prune_lowest(l, target, (forced or {}).get(l.name)) for l in layers}


def adaptive_fractions(layers: list[Layer], target: float, max_layer: float) -> dict[str, float]:
    sizes = torch.tensor([l.numel for l in layers], dtype=torch.float64)
    imp = torch.stack([(l.scores * l.sizes).sum() / l.sizes.sum() * l.scale for l in layers]).double()
    imp = imp.clamp(min=1e-30)
    mean = (imp * sizes).sum() / sizes.sum()
    rel = mean / imp

    def avg(c: float) -> float:
        return float(((rel * c).clamp(max=max_layer) * sizes).sum() / sizes.sum())

    lo, hi = 0.0, 1.0
    while avg(hi) < target and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < target else (lo, mid)
    frac = (rel * hi).clamp(max=max_layer)
    return {l.name: float(f) for l, f in zip(layers, frac)}


def adaptive(layers: list[Layer], target: float, max_layer: float, forced=None) -> dict[str, torch.Tensor]:
    fractions = adaptive_fractions(layers, target, max_layer)
    return {l.name: _prune_lowest(l, fractions[l.name], (forced or {}).get(l.name)) for l in layers}


def global_threshold(layers: list[Layer], target: float, max_layer: float, forced=None) -> dict[str, torch.Tensor]:
    forced = forced or {}
    scores = torch.cat([torch.where(forced[l.name], -torch.inf, l.scores * l.scale) if l.name in forced
                        else l.scores * l.scale for l in layers])
    sizes = torch.cat([l.sizes for l in layers])
    owner = torch.cat([torch.full((len(l.scores),), i) for i, l in enumerate(layers)])
    budget = [max_layer * l.numel for l in layers]
    used = [0.0] * len(layers)
    goal = target * float(sizes.sum())
    pruned_total = 0.0
    keep = torch.ones(len(scores), dtype=torch.bool)
    for idx in torch.argsort(scores, stable=True).tolist():
        if pruned_total >= goal and scores[idx] != -torch.inf:
            break
        i = int(owner[idx])
        s = float(sizes[idx])
        if used[i] + s > budget[i] and scores[idx] != -torch.inf:
            continue
        keep[idx] = False
        used[i] += s
        pruned_total += s
    out, start = {}, 0
    for l in layers:
        out[l.name] = keep[start:start + len(l.scores)]
        start += len(l.scores)
    return out


def allocate(layers: list[Layer], target: float, how: str, max_layer: float,
             forced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-vectors per layer. ``forced``: per layer, groups that must stay pruned (fixed masks)."""
    if how == "uniform":
        return uniform(layers, target, forced)
    if how == "adaptive":
        return adaptive(layers, target, max_layer, forced)
    return global_threshold(layers, target, max_layer, forced)
