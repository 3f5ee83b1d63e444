"""FedDST (Bibikar et al., AAAI 2022, "Federated Dynamic Sparse Training: Computing Less,
Communicating Less, Yet Learning Better") as a pruning method.

Training is sparse from round 1: the server's initial mask keeps ``round((1 - s) N)``
weights, spread over the prunable tensors by ``allocation`` (``erk``: Erdős–Rényi-Kernel,
the authors' default; or ``uniform``) and chosen by ``init`` (``magnitude``: the largest
|w| of the starting model — the authors' code prunes its initial model by magnitude, and a
fedasr run usually starts from a trained seed; or ``random``). Every tensor keeps that
count for the whole run.

Every ``update_every`` rounds before ``end_round`` (default: half the rounds, as the
authors' code) is a readjustment round r:

- **clients** train as usual under the global mask, then each changes its own mask per
  tensor: with k_l = ceil(α_r · kept_l), α_r = α/2 (1 + cos(π r / end_round)), it drops the
  k_l kept weights of smallest magnitude (its trained weights) and regrows the k_l pruned
  positions where its mean gradient over the local steps (taken before masking) is
  largest, at zero (RigL). Its update travels under its own mask (a dropped weight is not
  sent; a regrown one is sent as its zero update) and its report carries the changes:
  k_l dropped and k_l regrown flat indices per tensor (int32).
- **the server** averages each position over the clients whose mask kept it (the paper's
  sparse aggregation: the FedAvg mean of the updates divided, per position, by the share of
  the aggregation weight that kept it), steps its optimiser, and sets the new mask tensor by
  tensor: the kept_l positions of largest aggregated magnitude among those some client
  kept; ties — the regrown weights are all zero — go to the positions more of the clients'
  weight kept. Positions that enter the mask start from zero with a fresh optimiser state.

Other rounds are plain sparse FedAvg under the fixed mask.

Where this departs from the paper and its code: the regrowth ranks the mean gradient over
the client's local steps (the code: a last mini-batch's gradient), among the positions
pruned before the round (the code may pick live ones); the count per tensor is k_l =
ceil(α_r kept_l) (the code re-derives it from an ERK reallocation); ties of the server's
magnitude ranking (zero-valued regrown weights) go to the positions more clients kept
rather than to the tie order of ``torch.topk``, so the count per tensor stays exact;
``erk`` is RigL's ERK (densities proportional to Σ dims / Π dims, capped at 1), where the
code scales the layers' sparsities instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.methods.base import (ClientHooks, GradientMeanHooks, Instructions, MeanAggregator, MethodUpdate,
                                 PruningMethod, Report, RoundContext, register)
from fedasr.methods.pai import needs_target
from fedasr.prune.allocation import LAYER_COUNTS, layer_counts, top_positions
from fedasr.prune.masks import Masks

INITS = ("magnitude", "random")


@dataclass
class FedDSTConfig:
    """FedDST (Bibikar et al., AAAI 2022): clients prune and regrow their own masks, the server
    aggregates sparsely (each position over the clients that kept it) and votes the next mask."""

    alpha: float = 0.05  # initial adjustment rate α (the authors' runs: 0.01-0.05)
    update_every: int = 2  # rounds between readjustments (ΔR; the authors' runs: 10-15 of 400+)
    end_round: Optional[int] = None  # α_r reaches 0 here [default: half the rounds]
    init: str = "magnitude"  # the initial mask: magnitude | random
    allocation: str = "erk"  # densities per tensor: erk (RigL's Erdős–Rényi-Kernel) | uniform

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not 0 < self.alpha <= 1:
            raise FedasrError(f"{p}alpha: must be in (0, 1]")
        if self.update_every < 1:
            raise FedasrError(f"{p}update_every: must be at least 1")
        if self.end_round is not None and self.end_round < 1:
            raise FedasrError(f"{p}end_round: must be at least 1")
        if self.init not in INITS:
            raise FedasrError(f"{p}init: unknown {self.init!r} ({', '.join(INITS)})")
        if self.allocation not in LAYER_COUNTS:
            raise FedasrError(f"{p}allocation: unknown {self.allocation!r} ({', '.join(LAYER_COUNTS)})")

    def check_common(self, pruning, prefix: str) -> None:
        needs_target(pruning, prefix)


# ---------------------------------------------------------------------------- client side
def readjust(mask: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's prune/regrow of one tensor: (dropped, regrown) flat indices — the ``k``
    kept positions of smallest |weight| and the ``k`` pruned positions of largest |grad|
    (ties: the lower index)."""
    m = mask.reshape(-1)
    w = weight.detach().reshape(-1).abs().double().cpu()
    g = grad.detach().reshape(-1).abs().double().cpu()
    drop = top_positions(torch.where(m, -w, -math.inf), k)
    grow = top_positions(torch.where(m, -math.inf, g), k)
    return drop, grow


class ReadjustHooks(GradientMeanHooks):
    """Masks as usual while training, accumulating the mean gradient (before masking) at
    the pruned positions of ``plan``'s tensors; :meth:`report` then readjusts the client's
    own mask (``plan``: tensor -> k) and reports the changes; the update travels under it."""

    def __init__(self, masks: Masks, plan: dict[str, int]):
        super().__init__(masks, plan)
        self.plan = plan
        self.model: nn.Module | None = None
        self.own: Masks | None = None

    def contribution(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return self.at_pruned(name, grad)

    def after_step(self, model: nn.Module) -> None:
        super().after_step(model)
        self.model = model  # its trained weights are ranked in report()

    def report(self) -> Report:
        params = dict(self.model.named_parameters()) if self.model is not None else {}
        out, own = {}, dict(self.masks)
        for n, k in self.plan.items():
            if n not in params:
                continue
            grad = self.mean(n) if n in self._sum else torch.zeros_like(params[n])
            drop, grow = readjust(self.masks[n], params[n], grad, int(k))
            m = self.masks[n].reshape(-1).clone()
            m[drop] = False
            m[grow] = True
            own[n] = m.view(self.masks[n].shape)
            out[f"{n}/drop"] = drop.to(torch.int32)
            out[f"{n}/grow"] = grow.to(torch.int32)
        self.own = own
        return Report(out)

    def upload_masks(self) -> Masks:
        return self.own if self.own is not None else self.masks


# ---------------------------------------------------------------------------- server side
class MaskVotes:
    """Server side of a readjustment round: per position, the aggregation weight of the
    clients whose own mask kept it (the round's mask, less what they dropped, plus what they
    regrew), from their reports; a report that does not match the round's mask and plan is
    rejected (ValueError)."""

    def __init__(self, masks: Masks, plan: dict[str, int]):
        self.masks = {n: masks[n].reshape(-1) for n in plan}
        self.shapes = {n: masks[n].shape for n in plan}
        self.plan = plan
        self.kept = {n: torch.zeros(m.numel(), dtype=torch.float64) for n, m in self.masks.items()}
        self.weight = 0.0

    def add(self, report: Report, weight: float) -> None:
        changes = {}
        for n, k in self.plan.items():  # validate everything first: a rejected report adds nothing
            got = []
            for what, kept in (("drop", True), ("grow", False)):
                idx = report.tensors.get(f"{n}/{what}")
                if idx is None or idx.dim() != 1 or idx.numel() != k or idx.is_floating_point():
                    raise ValueError(f"{n}: expected {k} {what} indices")
                idx = idx.long()
                if k and (int(idx.min()) < 0 or int(idx.max()) >= self.masks[n].numel()):
                    raise ValueError(f"{n}: {what} index out of range")
                if idx.unique().numel() != k or not bool((self.masks[n][idx] == kept).all()):
                    raise ValueError(f"{n}: {what} indices repeat or are not {'kept' if kept else 'pruned'} positions")
                got.append(idx)
            changes[n] = got
        for n, (drop, grow) in changes.items():
            own = self.masks[n].clone()
            own[drop] = False
            own[grow] = True
            self.kept[n] += weight * own.double()  # (exactly 0 where no client kept a position)
        self.weight += weight

    def shares(self) -> dict[str, torch.Tensor]:
        """Per tensor, the share of the aggregation weight whose mask kept each position."""
        return {n: (k / self.weight).view(self.shapes[n]) for n, k in self.kept.items()}


@register
class FedDST(PruningMethod):
    name = "feddst"
    Config = FedDSTConfig

    def __init__(self, cfg: FedDSTConfig, common, model: nn.Module, total_rounds: int, seed: int):
        super().__init__(cfg, common, model, total_rounds, seed)
        self.end_round = cfg.end_round if cfg.end_round is not None else max(1, total_rounds // 2)

    @classmethod
    def whole_unit_masks(cls, cfg: FedDSTConfig) -> str | None:
        return "FedDST's masks are unstructured"

    # ---------------------------------------------------------------- server
    def init(self, ctx: RoundContext) -> Masks:
        if ctx.masks:  # a pruned --init-from checkpoint: its masks
            return ctx.masks
        shapes = {n: tuple(ctx.weights[n].shape) for n in self.names}
        counts = layer_counts(shapes, 1.0 - self.common.target_sparsity, self.cfg.allocation)
        gen = torch.Generator().manual_seed(self.seed * 7919 + 31)
        masks = {}
        for n in self.names:
            w = ctx.weights[n]
            if self.cfg.init == "magnitude":
                keep = top_positions(w.detach().reshape(-1).abs(), counts[n])
            else:
                keep = torch.randperm(w.numel(), generator=gen)[:counts[n]]
            m = torch.zeros(w.numel(), dtype=torch.bool)
            m[keep] = True
            masks[n] = m.view(w.shape)
        return masks

    def adjusting(self, rnd: int) -> bool:
        # (at end_round itself the cosine rate is 0: nothing would change)
        return rnd % self.cfg.update_every == 0 and rnd < self.end_round

    def alpha_at(self, rnd: int) -> float:
        return self.cfg.alpha / 2 * (1 + math.cos(math.pi * rnd / self.end_round))

    def plan(self, ctx: RoundContext) -> dict[str, int]:
        """Tensor -> the number of weights each client drops and regrows this round."""
        if not self.adjusting(ctx.rnd):
            return {}
        a = self.alpha_at(ctx.rnd)
        out = {}
        for n, m in ctx.masks.items():
            kept = int(m.sum())
            k = min(math.ceil(a * kept), kept, m.numel() - kept)
            if k > 0:
                out[n] = k
        return out

    def configure(self, ctx: RoundContext) -> Instructions:
        plan = self.plan(ctx)
        return Instructions(meta={"readjust": plan}) if plan else Instructions()

    def report_aggregator(self, ctx: RoundContext):
        plan = self.plan(ctx)
        return MaskVotes(ctx.masks, plan) if plan else MeanAggregator()

    def aggregate_update(self, ctx: RoundContext, aggregator, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(aggregator, MaskVotes) or not aggregator.weight:
            return mean
        for n, share in aggregator.shares().items():  # each position over the clients that kept it
            mean[n] = torch.where(share > 0, mean[n] / share.clamp(min=1e-12), torch.zeros_like(mean[n]))
        return mean

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        if not isinstance(aggregator, MaskVotes) or not aggregator.weight:
            return MethodUpdate(ctx.masks)
        masks, reset = dict(ctx.masks), {}
        for n, share in aggregator.shares().items():
            old = ctx.masks[n]
            magnitude = torch.where(old & (share > 0), ctx.weights[n].detach().abs().double(), 0.0)
            keep = top_positions(magnitude, int(old.sum()), secondary=share)
            new = torch.zeros(old.numel(), dtype=torch.bool)
            new[keep] = True
            masks[n] = new.view(old.shape)
            reset[n] = masks[n] & ~old
        return MethodUpdate(masks, reset=reset, metrics={"regrown": sum(int(r.sum()) for r in reset.values())})

    # ---------------------------------------------------------------- client
    def client_hooks(self, masks: Masks, instructions: Instructions) -> ClientHooks:
        plan = instructions.meta.get("readjust")
        return ReadjustHooks(masks, plan) if plan else ClientHooks(masks)
