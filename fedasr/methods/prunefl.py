"""PruneFL (Jiang et al., IEEE TNNLS 2022, "Model Pruning Enables Efficient Federated Learning
on Edge Devices") as a pruning method.

1. **Initial pruning on the server's data** (before round 1; the federation's
   ``--server-split``): from the dense model, reconfigurations (below) are repeated until
   the target number of weights ``n = round((1 - s) N)`` is reached; each may remove at most
   ``max_decrease`` of every tensor's kept weights, so from a dense start this takes about
   ⌈log(1 - s) / log(1 - max_decrease)⌉ of them (7 at s = 0.9 and the paper's 0.3). Above the
   target nothing is admitted (the smallest-magnitude weights leave); the first
   reconfiguration whose stayers are fewer than n admits the candidates by their squared
   gradient summed over ``init_batches`` batches of the server's data, which ends it.
2. **Adaptive pruning during the rounds.** Every ``reconfig_every`` rounds the clients
   report, per prunable weight, the sum over their local steps of the squared gradient
   (taken before masking, so pruned weights have one too: a dense tensor per prunable
   weight, counted in ``bytes_up``); the server averages them with the FedAvg weights and
   reconfigures.

A reconfiguration (:func:`stayers`, then :func:`admit`): in every prunable tensor the
``floor(δ · kept)`` kept weights of smallest magnitude become candidates (δ =
``max_decrease``, halving every ``decrease_half_life`` rounds when set), the other kept
weights stay; the candidates — those and every pruned weight — are ranked by importance /
cost (the paper's ratio, one ranking over all tensors) and admitted in that order:

- ``density: fixed`` (default): until exactly ``n`` weights are kept, so the sparsity is the
  target at every round (what a comparison at fixed sparsities needs);
- ``density: adaptive``: the paper's greedy — a candidate j is admitted while its
  importance/cost exceeds Σ importance / (T0 + Σ cost) over what is kept so far, with the
  target as the cap (the paper's maximum density): the sparsity is at least the target.
  T0 is ``time_constant`` times the dense model's prunable cost (the round's time that
  pruning does not save).

Where this departs from the paper and its code: the cost per parameter is uniform — fedasr
trains dense tensors with masks, so a pruned weight saves its upload (the same for every
parameter) and no computation, whereas the paper measured per-layer sparse-kernel times;
clients are stateless between rounds, so their importance is that of the reconfiguration
round's local steps (the code accumulates it on the clients over the rounds since the last
reconfiguration), and it is the sum of the squared per-step gradients (the code squares
the gradient summed over the round, times the samples seen); the initial pruning scores the
server's data without training on it (fedasr's seed model has been trained on it
centrally: ``seed_model`` of a sweep recipe) and stops at the target rather than when the
density settles; the non-prunable parameters' importance is left out of the ratio.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.methods.base import (ClientHooks, GradientMeanHooks, Instructions, MethodUpdate, PruningMethod, Report,
                                 RoundContext, register, require_server_batches)
from fedasr.methods.pai import gradient_sums, needs_target
from fedasr.prune.allocation import top_positions
from fedasr.prune.masks import Masks

DENSITIES = ("fixed", "adaptive")


@dataclass
class PruneFLConfig:
    """PruneFL (Jiang et al., IEEE TNNLS 2022): an initial pruning on the server's data, then
    reconfigurations by importance (squared gradients) against cost."""

    reconfig_every: int = 5  # rounds between reconfigurations (the paper: 50 of 10,000)
    max_decrease: float = 0.3  # share of a tensor's kept weights that may leave per reconfiguration
    decrease_half_life: Optional[float] = None  # rounds over which max_decrease halves [default: never]
    # fixed: exactly the target kept at every reconfiguration | adaptive: the paper's greedy
    # importance/cost admission, the target as the cap (the sparsity is at least the target)
    density: str = "fixed"
    time_constant: float = 0.0  # adaptive: the round's fixed time, in units of the dense prunable cost
    init_batches: int = 4  # server batches of the initial pruning's importance

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.reconfig_every < 1:
            raise FedasrError(f"{p}reconfig_every: must be at least 1")
        if not 0 < self.max_decrease < 1:
            raise FedasrError(f"{p}max_decrease: must be in (0, 1)")
        if self.decrease_half_life is not None and not self.decrease_half_life > 0:
            raise FedasrError(f"{p}decrease_half_life: must be positive")
        if self.density not in DENSITIES:
            raise FedasrError(f"{p}density: unknown {self.density!r} ({', '.join(DENSITIES)})")
        if not self.time_constant >= 0:
            raise FedasrError(f"{p}time_constant: must be >= 0")
        if self.init_batches < 1:
            raise FedasrError(f"{p}init_batches: must be at least 1")

    def check_common(self, pruning, prefix: str) -> None:
        needs_target(pruning, prefix)


def stayers(masks: Masks, weights: dict[str, torch.Tensor], max_decrease: float) -> Masks:
    """The kept weights that stay through a reconfiguration: in each tensor all but the
    ``floor(max_decrease · kept)`` of smallest magnitude (ties: the later position stays)."""
    out = {}
    for n, m in masks.items():
        flat = m.reshape(-1)
        w = weights[n].detach().reshape(-1).abs().double()
        low = top_positions(torch.where(flat, -w, -math.inf), math.floor(max_decrease * int(flat.sum())))
        s = flat.clone()
        s[low] = False
        out[n] = s.view(m.shape)
    return out


def admit(stay: Masks, importance: dict[str, torch.Tensor], n_keep: int, cost: dict[str, float],
          time_constant: float = 0.0, adaptive: bool = False) -> Masks:
    """``stay`` plus the candidates (every other position) with the highest importance /
    cost, over all tensors together (ties: the earlier tensor and position): up to ``n_keep``
    kept in all (``adaptive``: only while a candidate's ratio exceeds Σ importance /
    (T0 + Σ cost) of what is kept so far, T0 = ``time_constant`` x the total cost)."""
    names = list(stay)
    staying = torch.cat([stay[n].reshape(-1) for n in names])
    imp = torch.cat([importance[n].detach().reshape(-1).double() for n in names])
    c = torch.cat([torch.full((stay[n].numel(),), float(cost[n]), dtype=torch.float64) for n in names])
    room = max(0, n_keep - int(staying.sum()))
    cand = (~staying).nonzero().squeeze(1)
    ratio = imp / c
    order = cand[top_positions(ratio[cand], room if not adaptive else cand.numel())]
    if adaptive and room:
        gain, price = imp[order], c[order]
        num = imp[staying].sum() + torch.cumsum(gain, 0) - gain  # before admitting each candidate
        den = time_constant * c.sum() + c[staying].sum() + torch.cumsum(price, 0) - price
        fails = (ratio[order] * den <= num).nonzero()
        room = min(room, int(fails[0]) if len(fails) else len(order))
    keep = staying.clone()
    keep[order[:room]] = True
    out, start = {}, 0
    for n in names:
        out[n] = keep[start:start + stay[n].numel()].view(stay[n].shape)
        start += stay[n].numel()
    return out


class SquaredGradientHooks(GradientMeanHooks):
    """Masks as usual, and reports Σ over the local steps of the squared gradient of every
    prunable weight (before masking)."""

    def contribution(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * grad

    def report(self) -> Report:
        return Report({n: s.cpu() for n, s in self._sum.items()})


@register
class PruneFL(PruningMethod):
    name = "prunefl"
    Config = PruneFLConfig
    needs_server_data = True

    def __init__(self, cfg: PruneFLConfig, common, model: nn.Module, total_rounds: int, seed: int):
        super().__init__(cfg, common, model, total_rounds, seed)
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        self.n_keep = round((1.0 - common.target_sparsity) * sum(sizes[n] for n in self.names))
        self.cost = {n: 1.0 for n in self.names}  # uniform: see the module docstring

    @classmethod
    def whole_unit_masks(cls, cfg: PruneFLConfig) -> str | None:
        return "PruneFL's masks are unstructured"

    def admit(self, stay: Masks, importance: dict[str, torch.Tensor]) -> Masks:
        return admit(stay, importance, self.n_keep, self.cost, self.cfg.time_constant, self.cfg.density == "adaptive")

    # ---------------------------------------------------------------- server
    def init(self, ctx: RoundContext) -> Masks:
        if ctx.masks:  # a pruned --init-from checkpoint: its masks
            return ctx.masks
        batches = require_server_batches(ctx, self.name)
        masks = {n: torch.ones(ctx.weights[n].shape, dtype=torch.bool) for n in self.names}
        kept = sum(m.numel() for m in masks.values())
        while True:  # reconfigurations down to the target; the last one admits by importance
            stay = stayers(masks, ctx.weights, self.cfg.max_decrease)
            staying = sum(int(m.sum()) for m in stay.values())
            if staying < self.n_keep:
                data = itertools.islice(batches(), self.cfg.init_batches)
                return self.admit(stay, gradient_sums(ctx.model, self.names, masks, data, square=True))
            if staying == kept:
                if kept == self.n_keep:
                    return masks  # (at the target, and max_decrease removes nothing more)
                raise FedasrError(f"pruning.prunefl.max_decrease: {self.cfg.max_decrease} removes no weight "
                                  f"of any tensor, so the target sparsity is never reached")
            masks, kept = stay, staying

    def reconfiguring(self, rnd: int) -> bool:
        return rnd % self.cfg.reconfig_every == 0 and rnd < self.total_rounds

    def decrease_at(self, rnd: int) -> float:
        h = self.cfg.decrease_half_life
        return self.cfg.max_decrease * (0.5 ** (rnd / h) if h else 1.0)

    def configure(self, ctx: RoundContext) -> Instructions:
        return Instructions(meta={"report_sqgrad": self.reconfiguring(ctx.rnd)})

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        importance = aggregator.result()
        if not self.reconfiguring(ctx.rnd) or not importance:
            return MethodUpdate(ctx.masks)
        masks = self.admit(stayers(ctx.masks, ctx.weights, self.decrease_at(ctx.rnd)), importance)
        return MethodUpdate(masks, metrics={
            "regrown": sum(int((masks[n] & ~m).sum()) for n, m in ctx.masks.items()),
            "removed": sum(int((m & ~masks[n]).sum()) for n, m in ctx.masks.items())})

    # ---------------------------------------------------------------- client
    def client_hooks(self, masks: Masks, instructions: Instructions) -> ClientHooks:
        if instructions.meta.get("report_sqgrad"):
            return SquaredGradientHooks(masks, self.names)
        return ClientHooks(masks)
