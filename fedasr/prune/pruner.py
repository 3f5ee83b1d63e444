"""One small interface for every pruning method, with hooks at the round boundaries.

Server side (:class:`Pruner`)::

    init(weights, masks)                -> masks for round 1 (masks: from --init-from, or {})
    client_plan(round, masks)           -> ClientPruning: what clients are told this round
    update(round, weights, masks, reports) -> masks for the next round

Client side (:class:`ClientPruning`), inside local training::

    after_backward(model)   accumulate what the method asks for (|gradient|), mask gradients
    after_step(model)       re-apply the masks: pruned weights stay exactly zero
    report()                the client's extras, aggregated by the server (weighted by examples)

:class:`FederatedPruning` implements Lin et al. (Interspeech 2022): the server computes
masks from the aggregated model on a schedule, with a pattern, an importance and a
layer allocation; with ``refine`` it keeps dense shadow weights so that pruned weights
can return, without it a pruned group stays pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from fedasr.config import PruningSection
from fedasr.prune import allocation
from fedasr.prune.masks import Masks, apply_masks, mask_gradients, prunable_names
from fedasr.prune.patterns import Layer, tensor_layers, unit_layers
from fedasr.prune.schedule import sparsity_at


class ClientPruning:
    def __init__(self, masks: Masks, report_gradients: list[str] | None = None):
        self.masks = masks
        self.report_names = report_gradients or []
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._steps = 0

    def after_backward(self, model: nn.Module) -> None:
        if self.report_names:
            params = dict(model.named_parameters())
            for n in self.report_names:
                g = params[n].grad
                if g is not None:  # before masking: pruned positions need a gradient too (regrowth)
                    acc = self._grad_sum.get(n)
                    self._grad_sum[n] = g.detach().abs() if acc is None else acc + g.detach().abs()
            self._steps += 1
        if self.masks:
            mask_gradients(model, self.masks)

    def after_step(self, model: nn.Module) -> None:
        if self.masks:
            apply_masks(model, self.masks)

    def report(self) -> dict[str, torch.Tensor]:
        return {n: (g / max(1, self._steps)).cpu() for n, g in self._grad_sum.items()}


class Pruner:
    """Base: no masks, nothing reported."""

    refine = False

    def init(self, weights: dict[str, torch.Tensor], masks: Masks) -> Masks:
        return masks  # a pruned checkpoint fine-tuned without a pruning method keeps its masks

    def client_plan(self, rnd: int, masks: Masks) -> ClientPruning:
        return ClientPruning(masks)

    def update(self, rnd: int, weights: dict[str, torch.Tensor], masks: Masks,
               reports: dict[str, torch.Tensor] | None) -> Masks:
        return masks

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


class FederatedPruning(Pruner):
    def __init__(self, cfg: PruningSection, model: nn.Module, total_rounds: int, seed: int):
        self.cfg = cfg
        self.refine = cfg.refine
        self.total_rounds = total_rounds
        self.seed = seed
        self.names = prunable_names(model, cfg.include, cfg.exclude)
        self.families = model.group_table() if cfg.pattern == "unit" else None
        self.reports: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- hooks
    def init(self, weights: dict[str, torch.Tensor], masks: Masks) -> Masks:
        return self.compute(1, weights, masks) or masks

    def client_plan(self, rnd: int, masks: Masks) -> ClientPruning:
        wants = self.cfg.importance == "gradient" and self._recompute_after(rnd)
        return ClientPruning(masks, self.names if wants else None)

    def update(self, rnd: int, weights: dict[str, torch.Tensor], masks: Masks,
               reports: dict[str, torch.Tensor] | None) -> Masks:
        if reports:
            self.reports = reports
        if rnd >= self.total_rounds or not self._recompute_after(rnd):
            return masks
        return self.compute(rnd + 1, weights, masks)

    def state_dict(self) -> dict:
        return {"reports": self.reports or {}}

    def load_state_dict(self, d: dict) -> None:
        self.reports = dict(d.get("reports") or {}) or None

    # ---------------------------------------------------------------- masks
    def _recompute_after(self, rnd: int) -> bool:
        """Masks change after round ``rnd`` when the schedule moves or refinement is due."""
        now = sparsity_at(self.cfg, rnd, self.total_rounds)
        nxt = sparsity_at(self.cfg, rnd + 1, self.total_rounds)
        return nxt != now or (nxt > 0 and self.refine and rnd % self.cfg.update_every == 0)

    def layers(self, weights: dict[str, torch.Tensor], importance: str, norm: str,
               grads: dict[str, torch.Tensor] | None, generator: torch.Generator | None) -> list[Layer]:
        if self.families is not None:
            return unit_layers(weights, self.families, set(self.names), importance, norm, grads, generator)
        return tensor_layers(weights, self.names, self.cfg.pattern, importance, norm, grads, generator)

    def compute(self, rnd: int, weights: dict[str, torch.Tensor], masks: Masks) -> Masks:
        """Masks at the scheduled sparsity of round ``rnd`` from ``weights``."""
        target = sparsity_at(self.cfg, rnd, self.total_rounds)
        if target <= 0:
            return {}
        importance = self.cfg.importance
        if importance == "gradient" and not self.reports:
            importance = "magnitude"  # before any client has reported (round 1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
        layers = self.layers(weights, importance, self.cfg.norm, self.reports, gen)
        forced = None
        if masks and not self.refine:
            # groups already pruned stay pruned: a group is pruned when none of its elements is kept
            kept = {n: m.double() for n, m in masks.items()}
            full = {n: kept.get(n, torch.ones_like(weights[n], dtype=torch.float64)) for n in weights}
            forced = {l.name: l.scores == 0 for l in self.layers(full, "magnitude", "l1", None, None)}
        def build(t: float) -> Masks:
            keep = allocation.allocate(layers, t, self.cfg.allocation, self.cfg.max_layer_sparsity, forced)
            out: Masks = {}
            for layer in layers:
                for name, m in layer.expand(keep[layer.name]).items():
                    out[name] = out[name] & m if name in out else m
            if masks and not self.refine:
                for name, m in masks.items():
                    out[name] = out[name] & m if name in out else m
            return out

        if self.families is None:
            return build(target)
        # Unit families overlap (a predictor unit's consumer column lies in joiner.pred_proj,
        # whose rows are joiner units), so the zeros are not the sum of the plans: bisect the
        # planned target until the measured sparsity of the prunable tensors is the target.
        lo, hi, best = 0.0, self.cfg.max_layer_sparsity, None
        for _ in range(12):
            mid = (lo + hi) / 2
            cand = build(mid)
            got = self.measured_sparsity(cand, weights)
            if best is None or abs(got - target) < abs(best[0] - target):
                best = (got, cand)
            lo, hi = (mid, hi) if got < target else (lo, mid)
        return best[1]

    def measured_sparsity(self, masks: Masks, weights: dict[str, torch.Tensor]) -> float:
        total = sum(weights[n].numel() for n in self.names)
        pruned = sum(int((~masks[n]).sum()) for n in self.names if n in masks)
        return pruned / total


def make_pruner(cfg: PruningSection, model: nn.Module, total_rounds: int, seed: int) -> Pruner:
    if cfg.method == "federated_pruning":
        return FederatedPruning(cfg, model, total_rounds, seed)
    return Pruner()
