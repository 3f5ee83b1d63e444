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

For the methods that keep an exact number of single weights (FedDST, PruneFL, SNIP,
SynFlow): :func:`layer_counts` (per-tensor counts, ``uniform`` or Erdős–Rényi-Kernel),
:func:`top_positions` (a ranking with deterministic ties) and :func:`keep_top` (one global
ranking with per-tensor floors).
"""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------------------- unstructured
# Counts per tensor and rankings of single weights, for the methods that keep an exact
# number of weights (FedDST, PruneFL, SNIP, SynFlow). Ties are broken deterministically.
LAYER_COUNTS = ("erk", "uniform")


def layer_counts(shapes: dict[str, tuple[int, ...]], density: float, how: str) -> dict[str, int]:
    """Weights kept per tensor at overall ``density``: their sum is round(density x total)
    exactly, and every tensor keeps at least one and at most all of its weights.

    - ``uniform``: density x size per tensor;
    - ``erk``: Erdős–Rényi-Kernel (Evci et al., 2020, RigL): d_l = ε (Σ dims_l) / (Π dims_l),
      ε solved so that the total is met; a tensor that would exceed 1 is dense and ε is
      solved again over the others.

    The fractions are rounded down and the remainder goes to the largest fractional parts
    (ties: the earlier tensor)."""
    names = list(shapes)
    sizes = torch.tensor([math.prod(shapes[n]) for n in names], dtype=torch.float64)
    goal = round(density * float(sizes.sum()))
    if how == "uniform":
        raw = sizes * density
    elif how == "erk":
        erk = torch.tensor([sum(shapes[n]) / math.prod(shapes[n]) for n in names], dtype=torch.float64)
        dense = torch.zeros(len(names), dtype=torch.bool)
        while True:
            eps = (goal - sizes[dense].sum()) / (erk[~dense] * sizes[~dense]).sum()
            over = (eps * erk > 1) & ~dense
            if not bool(over.any()):
                break
            dense |= over
        raw = torch.where(dense, sizes, eps * erk * sizes)
    else:
        raise ValueError(f"unknown layer allocation {how!r} ({', '.join(LAYER_COUNTS)})")
    counts = torch.minimum(torch.maximum(raw.floor(), torch.ones_like(raw)), sizes)
    left = goal - int(counts.sum())
    while left != 0:  # a few passes at most: one weight per tensor and pass
        step = 1 if left > 0 else -1
        room = counts < sizes if step > 0 else counts > 1
        order = torch.argsort((raw - counts) * step, descending=True, stable=True)
        order = order[room[order]][:abs(left)]
        if not len(order):
            break
        counts[order] += step
        left -= step * len(order)
    return {n: int(c) for n, c in zip(names, counts)}


def top_positions(primary: torch.Tensor, k: int, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` largest ``primary`` values, ties going to the larger
    ``secondary`` value, then to the lower index."""
    p = primary.reshape(-1)
    order = torch.arange(p.numel())
    if secondary is not None:
        order = torch.argsort(secondary.reshape(-1), descending=True, stable=True)
    order = order[torch.argsort(p[order], descending=True, stable=True)]
    return order[:max(0, int(k))]


def keep_top(scores: dict[str, torch.Tensor], n_keep: int, forced: dict[str, torch.Tensor] | None = None,
             max_layer: float = 1.0) -> dict[str, torch.Tensor]:
    """Masks keeping the ``n_keep`` highest ``scores`` over all tensors together (one global
    ranking; ties to the earlier tensor and position), never a ``forced`` position (True:
    pruned for good), except that every tensor keeps its best ``max(1, ceil((1 - max_layer)
    x size))`` weights first: no tensor is pruned beyond ``max_layer`` or disappears (the
    total is then at least the sum of those floors)."""
    forced = forced or {}
    names = list(scores)
    ranked, floors = [], 0
    for n in names:
        s = scores[n].detach().reshape(-1).double().clone()
        if n in forced:
            s[forced[n].reshape(-1)] = -math.inf
        floor = max(1, math.ceil((1.0 - max_layer) * s.numel() - 1e-9))
        s[top_positions(s, floor)] = math.inf  # each tensor's best first
        ranked.append(s)
        floors += floor
    sizes = [s.numel() for s in ranked]
    ranked = torch.cat(ranked)
    starts = torch.tensor([0] + sizes).cumsum(0)
    keep = torch.zeros(ranked.numel(), dtype=torch.bool)
    keep[top_positions(ranked, max(n_keep, floors))] = True
    return {n: keep[int(starts[i]):int(starts[i + 1])].view(scores[n].shape) for i, n in enumerate(names)}
