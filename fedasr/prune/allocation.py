"""Spreading a target sparsity across layers, and choosing the groups to prune.

- ``uniform``: every layer is pruned to the target (to the nearest group).
- ``global``: one threshold on the per-element group importance over all layers; the
  lowest groups are pruned until the target share of prunable weights is reached. Scores
  are per element (mean |w| or RMS), i.e. normalised by group size, and multiplied by the
  layer's sqrt(fan-in) — weights are initialised at ~1/sqrt(fan-in), so raw magnitudes
  would always sacrifice the wide layers (magnitude only, see patterns.py).
- ``adaptive``: each layer gets its own sparsity from its importance. With I_l the mean
  per-element importance of layer l times its sqrt(fan-in), Ī the size-weighted mean,
  s_l = min(s_max, c · Ī / I_l), where c is solved (bisection) so that the size-weighted
  mean of s_l equals the target. Layers whose weights matter less (smaller magnitude, or
  smaller |w·g|) are pruned more; then groups are chosen within each layer as in uniform.
  Without refinement, groups already pruned for good are left out of I_l.

Every allocation rounds to whole groups and then caps: no layer is pruned beyond
``max_layer_sparsity``, and no layer loses all its groups (a module never disappears).
"""

from __future__ import annotations

import torch

from fedasr.prune.patterns import Layer


def _prune_lowest(layer: Layer, fraction: float, max_layer: float,
                  forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-vector for ``layer`` with the lowest-scoring groups pruned until ``fraction``
    of its elements are pruned (to the nearest group). The cap holds after rounding: at
    most ``max_layer`` of the elements, and never every group (a layer never disappears).
    ``forced`` groups (already pruned for good) are pruned first and stay pruned."""
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
    cap = int(torch.searchsorted(cum, torch.tensor(max_layer * layer.numel * (1 + 1e-12), dtype=cum.dtype),
                                 right=True))
    k = min(k, cap, len(cum) - 1)
    if forced is not None:
        k = max(k, int(forced.sum()))
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[order[:k]] = False
    return keep


def uniform(layers: list[Layer], target: float, max_layer: float, forced=None) -> dict[str, torch.Tensor]:
    return {l.name: _prune_lowest(l, target, max_layer, (forced or {}).get(l.name)) for l in layers}


def layer_importance(layer: Layer, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-element importance of the layer's live groups, times its scale. Groups
    already pruned for good (``forced``) are left out: their zeros would make the layer
    look unimportant and get it pruned further and further (a feedback loop)."""
    alive = torch.ones_like(layer.sizes, dtype=torch.bool) if forced is None else ~forced
    sizes = layer.sizes[alive]
    return (layer.scores[alive] * sizes).sum() / sizes.sum().clamp(min=1) * layer.scale


def adaptive_fractions(layers: list[Layer], target: float, max_layer: float,
                       forced: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    forced = forced or {}
    sizes = torch.tensor([l.numel for l in layers], dtype=torch.float64)
    imp = torch.stack([layer_importance(l, forced.get(l.name)) for l in layers]).double()
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
    fractions = adaptive_fractions(layers, target, max_layer, forced)
    return {l.name: _prune_lowest(l, fractions[l.name], max_layer, (forced or {}).get(l.name)) for l in layers}


def global_threshold(layers: list[Layer], target: float, max_layer: float, forced=None) -> dict[str, torch.Tensor]:
    forced = forced or {}
    scores = torch.cat([torch.where(forced[l.name], -torch.inf, l.scores * l.scale) if l.name in forced
                        else l.scores * l.scale for l in layers])
    sizes = torch.cat([l.sizes for l in layers])
    owner = torch.cat([torch.full((len(l.scores),), i) for i, l in enumerate(layers)])
    budget = [max_layer * l.numel for l in layers]
    used = [0.0] * len(layers)
    left = [len(l.scores) for l in layers]  # groups still kept per layer: never the last one
    goal = target * float(sizes.sum())
    pruned_total = 0.0
    keep = torch.ones(len(scores), dtype=torch.bool)
    for idx in torch.argsort(scores, stable=True).tolist():
        is_forced = bool(scores[idx] == -torch.inf)
        if pruned_total >= goal and not is_forced:
            break
        i = int(owner[idx])
        s = float(sizes[idx])
        if not is_forced and (used[i] + s > budget[i] * (1 + 1e-12) or left[i] <= 1):
            continue
        keep[idx] = False
        used[i] += s
        left[i] -= 1
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
        return uniform(layers, target, max_layer, forced)
    if how == "adaptive":
        return adaptive(layers, target, max_layer, forced)
    return global_threshold(layers, target, max_layer, forced)
