"""Pruning patterns (granularity) and group importance.

A *layer* is the unit of sparsity allocation; it owns *groups*, the units that are pruned
together. For the tensor patterns a layer is one prunable tensor:

- ``unstructured``: every element is a group.
- ``row``: a row (dim 0: one output unit) — for conv kernels (out, in, k) all of (in, k).
- ``column``: a column (dim 1: one input) — for conv kernels all of (out, k). Depthwise
  kernels (d, 1, k) have one column only, so ``column`` and ``half_column`` fall back to
  rows (channels) there.
- ``half_row`` / ``half_column``: each row (column) split into two halves, each half a group.
- ``coherent_column``: ``column``, except that the matrices reading the encoder's residual
  stream (:data:`~fedasr.model.groups.RESIDUAL_READERS`: FFN first linears, q/k/v, the conv
  module's first pointwise conv, the joiner's encoder projection) form ONE layer whose group
  j is input feature j in all of them: every block drops the same residual features (a
  narrower residual stream), instead of each matrix its own half of them.

LSTM weights (``weight_ih_lK``: 4H x E, ``weight_hh_lK``: 4H x H) have gate-major rows
(PyTorch's i, f, g, o blocks of H rows), so a row is one gate of one unit. Here:

- ``row``: one hidden unit — its 4 gate rows in *both* matrices (one pruning layer spans
  the two);
- ``half_row``: one unit's 4 gate rows over the first or the second half of one matrix's
  columns;
- ``column``: one input (a column of W_ih) or one recurrent input (a column of W_hh), all
  4H rows;

Except for ``row``, each matrix is its own layer, so neither the inputs nor the recurrence
can disappear as a whole.
- ``half_column``: a column restricted to the first or the second half of the units (all
  4 gates of each).

For ``unit`` a layer is one family of the model's group table
(:meth:`Transducer.group_table`): FFN hidden units, attention heads, conv-module channels,
LSTM predictor units and joiner units; a group removes one unit everywhere at once
(weights, biases and BatchNorm affine parameters), so masks can later become a physically
smaller model.

Group importance is per element, so groups of different sizes compare: ``l1`` is the mean
|w| over the group, ``l2`` the root mean square; ``gradient`` is the first-order Taylor
score |w|·ḡ (ḡ: mean |gradient| reported by the clients) averaged over the group;
``random`` a seeded uniform draw.

Across layers (global and adaptive allocation) magnitude scores are multiplied by the
layer's sqrt(fan-in): weights are initialised at ~1/sqrt(fan-in), so raw magnitudes would
always sacrifice the wide layers. That argument is about weight scale only: gradient and
random scores are compared as they are (a random score must be random across layers too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from fedasr.errors import FedasrError

_LSTM_WEIGHT = re.compile(r"^(?P<prefix>.*)\.weight_(?P<kind>ih|hh)_l(?P<layer>\d+)$")


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
    if pattern in ("column", "half_column") and len(shape) >= 2 and shape[1] == 1:
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


def lstm_group_ids(hidden: int, in_cols: int, rec_cols: int, pattern: str) -> torch.Tensor:
    """Group ids of an LSTM weight with gate-major rows, (4H, in_cols + rec_cols): one matrix
    (``rec_cols`` = 0), or [W_ih | W_hh] side by side for ``row``. See the module docstring."""
    rows, cols = 4 * hidden, in_cols + rec_cols
    unit = (torch.arange(rows) % hidden).view(-1, 1).expand(rows, cols)
    col = torch.arange(cols).view(1, -1).expand(rows, cols)
    if pattern == "unstructured":
        return torch.arange(rows * cols).view(rows, cols)
    if pattern == "row":
        return unit.contiguous()
    if pattern == "half_row":
        return 2 * unit + (col >= (cols + 1) // 2).long()
    if pattern == "column":
        return col.contiguous()
    if pattern == "half_column":
        return 2 * col + (unit >= (hidden + 1) // 2).long()
    raise FedasrError(f"pruning.pattern: unknown {pattern!r}")


def _lstm_pairs(names: list[str], weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """LSTM layer prefix ``...lstm.lK`` -> its prunable matrices among ``names`` (ih first)."""
    pairs: dict[str, list[str]] = {}
    for n in names:
        m = _LSTM_WEIGHT.match(n)
        if m and weights[n].dim() == 2 and weights[n].shape[0] % 4 == 0:
            pairs.setdefault(f"{m['prefix']}.l{m['layer']}", []).append(n)
    return {k: sorted(v, key=lambda n: "_hh_" in n) for k, v in pairs.items()}


def _layer(name: str, parts: list[tuple[str, torch.Tensor, torch.Tensor]], importance: str, norm: str,
           grads: dict[str, torch.Tensor] | None, generator: torch.Generator | None, scale: float) -> Layer:
    """One pruning layer over ``parts``: (param name, weight, group ids of its elements)."""
    G = max(int(gid.max()) for _, _, gid in parts) + 1
    total = torch.zeros(G, dtype=torch.float64)
    sizes = torch.zeros(G, dtype=torch.float64)
    for n, w, gid in parts:
        e = element_importance(w, importance, norm, (grads or {}).get(n), generator).reshape(-1)
        total.index_add_(0, gid.reshape(-1), e)
        sizes.index_add_(0, gid.reshape(-1), torch.ones_like(e))

    def expand(keep: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: keep[gid] for n, _, gid in parts}

    return Layer(name, _finish(total, sizes, importance, norm), sizes, expand,
                 scale if importance == "magnitude" else 1.0)


def tensor_layers(weights: dict[str, torch.Tensor], names: list[str], pattern: str, importance: str, norm: str,
                  grads: dict[str, torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> list[Layer]:
    if pattern == "coherent_column":
        from fedasr.model.groups import RESIDUAL_READERS

        readers = [n for n in names if RESIDUAL_READERS.match(n)]
        if not readers:
            raise FedasrError("pruning.pattern: coherent_column needs prunable residual-stream readers "
                              "(encoder.layers.* or joiner.enc_proj in pruning.include)")
        parts = [(n, weights[n], group_ids(tuple(weights[n].shape), "column")) for n in readers]
        scale = sum(fan_in_scale(w) * w.numel() for _, w, _ in parts) / sum(w.numel() for _, w, _ in parts)
        shared = _layer("encoder.residual_stream", parts, importance, norm, grads, generator, scale)
        return [shared] + tensor_layers(weights, [n for n in names if n not in readers], "column", importance, norm,
                                        grads, generator)
    lstm = _lstm_pairs(names, weights)
    lstm_of = {n: key for key, ns in lstm.items() for n in ns}
    layers = []
    for n in names:
        w = weights[n]
        key = lstm_of.get(n)
        if key is None:
            layers.append(_layer(n, [(n, w, group_ids(tuple(w.shape), pattern))], importance, norm, grads,
                                 generator, fan_in_scale(w)))
        elif pattern == "row":  # a unit spans both matrices: one layer
            if lstm[key][0] == n:
                layers.append(_lstm_layer(key, lstm[key], weights, pattern, importance, norm, grads, generator))
        else:
            gid = lstm_group_ids(w.shape[0] // 4, w.shape[1], 0, pattern)
            layers.append(_layer(n, [(n, w, gid)], importance, norm, grads, generator, fan_in_scale(w)))
    return layers


def _lstm_layer(key: str, names: list[str], weights: dict[str, torch.Tensor], pattern: str, importance: str,
                norm: str, grads, generator) -> Layer:
    hidden = weights[names[0]].shape[0] // 4
    widths = [weights[n].shape[1] for n in names]
    gid = lstm_group_ids(hidden, widths[0], sum(widths[1:]), pattern)
    parts, start = [], 0
    for n, width in zip(names, widths):
        parts.append((n, weights[n], gid[:, start:start + width]))
        start += width
    return _layer(key, parts, importance, norm, grads, generator, float(sum(widths)) ** 0.5)


def fan_in_scale(w: torch.Tensor) -> float:
    """sqrt(fan-in) of a weight (inputs x kernel per output unit)."""
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

        layers.append(Layer(fam.name, _finish(total, sizes, importance, norm), sizes, expand,
                            scale if importance == "magnitude" else 1.0))
    return layers
