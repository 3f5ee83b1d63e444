"""Federated Pruning (Lin et al., Interspeech 2022) as a pruning method.

The server computes masks from the aggregated dense weights on a schedule, with a pattern
(unstructured, rows, columns, halves, whole units), an importance (magnitude, clients'
gradients, random) and a layer allocation (uniform, global, adaptive). With ``refine``
masks are recomputed from the dense master weights every ``update_every`` rounds, so
pruned weights can return; without it a pruned group stays pruned.

Clients asked for gradient importance accumulate mean |gradient| (before masking) over
their local steps and send it up (a dense tensor per prunable weight, counted in
``bytes_up``); the server averages the reports with the FedAvg weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.methods.base import (ClientHooks, GradientMeanHooks, Instructions, MethodUpdate, PruningMethod, Report,
                                 RoundContext, register)
from fedasr.prune import allocation
from fedasr.prune.masks import Masks
from fedasr.prune.patterns import Layer, tensor_layers, unit_layers
from fedasr.prune.schedule import sparsity_at

PATTERNS = ("unstructured", "row", "column", "half_row", "half_column", "coherent_column", "unit")
IMPORTANCES = ("magnitude", "gradient", "random")
SCHEDULES = ("constant", "step", "cubic")
ALLOCATIONS = ("uniform", "global", "adaptive")


@dataclass
class FederatedPruningConfig:
    """Federated Pruning (Lin et al., Interspeech 2022): the server computes the masks from the
    aggregated model by a pattern, an importance, a schedule and a per-layer allocation."""

    # what is pruned together: unstructured (single weights) | row | column | half_row |
    # half_column | coherent_column (one input mask over the residual stream's readers) | unit
    # (whole FFN units, heads, conv channels, predictor and joiner units: `fedasr compact`able)
    pattern: str = "unstructured"
    # how groups are ranked: magnitude | gradient (first-order Taylor |w|·|g|, clients upload
    # their mean |gradient|) | random
    importance: str = "magnitude"
    norm: str = "l2"  # group norm for magnitude importance: l1 | l2
    schedule: str = "constant"  # how sparsity rises: constant (from start_round) | step | cubic (Zhu & Gupta)
    start_round: int = 1  # first round trained with masks
    end_round: Optional[int] = None  # cubic: round where the target is reached [default: 3/4 of rounds]
    initial_sparsity: float = 0.0  # cubic: s0
    power: float = 3.0  # cubic: the exponent (3: Zhu & Gupta's cubic; 1: linear)
    step_size: float = 0.1  # step: raise by this much ...
    step_every: int = 2  # ... every this many rounds
    # sparsity per layer: uniform (every layer at the target) | global (one threshold) | adaptive
    # (layers whose weights matter less pruned more)
    allocation: str = "uniform"
    max_layer_sparsity: float = 0.95  # no layer is pruned beyond this
    refine: bool = True  # recompute masks from the dense master weights, so pruned weights can return
    update_every: int = 1  # recompute masks every k rounds
    # refine: the masks are recomputed up to those of this round, which are then kept to the
    # end (a schedule still moving goes on to its target) [default: refined to the last round]
    refine_until: Optional[int] = None

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        choices = {"pattern": PATTERNS, "importance": IMPORTANCES, "schedule": SCHEDULES,
                   "allocation": ALLOCATIONS, "norm": ("l1", "l2")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise FedasrError(f"{p}{key}: unknown {getattr(self, key)!r} ({', '.join(allowed)})")
        for key in ("initial_sparsity", "step_size"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise FedasrError(f"{p}{key}: must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise FedasrError(f"{p}max_layer_sparsity: must be in (0, 1)")
        if self.start_round < 1 or self.update_every < 1 or self.step_every < 1:
            raise FedasrError(f"{p}start_round/update_every/step_every: must be at least 1")
        if not self.power > 0:
            raise FedasrError(f"{p}power: must be positive, got {self.power}")
        if self.refine_until is not None and self.refine_until < 1:
            raise FedasrError(f"{p}refine_until: must be at least 1 (or null: every round)")

    def check_common(self, pruning, prefix: str) -> None:
        if pruning.target_sparsity > self.max_layer_sparsity:
            raise FedasrError(f"{prefix}.max_layer_sparsity: {self.max_layer_sparsity} is below "
                              f"pruning.target_sparsity {pruning.target_sparsity}")


class GradientHooks(GradientMeanHooks):
    """Masks as usual, and accumulates the mean |gradient| of ``names`` (before masking:
    pruned positions need a gradient too, so that they can be regrown)."""

    def contribution(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()

    def report(self) -> Report:
        return Report({n: self.mean(n).cpu() for n in self._sum})


@register
class FederatedPruning(PruningMethod):
    name = "federated_pruning"
    Config = FederatedPruningConfig

    def __init__(self, cfg: FederatedPruningConfig, common, model: nn.Module, total_rounds: int, seed: int):
        super().__init__(cfg, common, model, total_rounds, seed)
        self.refine = cfg.refine
        self.param_names = [n for n, _ in model.named_parameters()]
        self.families = model.group_table() if cfg.pattern == "unit" else None
        self.reports: dict[str, torch.Tensor] | None = None  # the last aggregated gradient report

    @classmethod
    def whole_unit_masks(cls, cfg: FederatedPruningConfig) -> str | None:
        if cfg.pattern != "unit":
            return f"pruning.federated_pruning.pattern is {cfg.pattern!r} (only 'unit' removes whole units)"
        return None

    # ---------------------------------------------------------------- server
    def init(self, ctx: RoundContext) -> Masks:
        return self.compute(1, ctx.weights, ctx.masks) or ctx.masks

    def wants_gradients(self, rnd: int) -> bool:
        return self.cfg.importance == "gradient" and self._recompute_after(rnd)

    def configure(self, ctx: RoundContext) -> Instructions:
        return Instructions(meta={"report_gradients": self.wants_gradients(ctx.rnd)})

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        reports = aggregator.result()
        if reports:
            self.reports = reports
        if ctx.rnd >= self.total_rounds or not self._recompute_after(ctx.rnd):
            return MethodUpdate(ctx.masks)
        return MethodUpdate(self.compute(ctx.rnd + 1, ctx.weights, ctx.masks))

    def state_dict(self) -> dict:
        return {"reports": self.reports or {}}

    def load_state_dict(self, d: dict) -> None:
        self.reports = dict(d.get("reports") or {}) or None

    # ---------------------------------------------------------------- client
    def client_hooks(self, masks: Masks, instructions: Instructions) -> ClientHooks:
        if instructions.meta.get("report_gradients"):
            return GradientHooks(masks, self.names)
        return ClientHooks(masks)

    # ---------------------------------------------------------------- masks
    def target_at(self, rnd: int) -> float:
        return sparsity_at(self.cfg, self.common.target_sparsity, rnd, self.total_rounds)

    def _recompute_after(self, rnd: int) -> bool:
        """Masks change after round ``rnd`` when the schedule moves or refinement is due."""
        now, nxt = self.target_at(rnd), self.target_at(rnd + 1)
        refining = self.refine and (self.cfg.refine_until is None or rnd < self.cfg.refine_until)
        return nxt != now or (nxt > 0 and refining and rnd % self.cfg.update_every == 0)

    def layers(self, weights: dict[str, torch.Tensor], importance: str, norm: str,
               grads: dict[str, torch.Tensor] | None, generator: torch.Generator | None) -> list[Layer]:
        if self.families is not None:
            return unit_layers(weights, self.families, set(self.names), importance, norm, grads, generator)
        return tensor_layers(weights, self.names, self.cfg.pattern, importance, norm, grads, generator)

    def compute(self, rnd: int, weights: dict[str, torch.Tensor], masks: Masks,
                grads: dict[str, torch.Tensor] | None = None) -> Masks:
        """Masks at the scheduled sparsity of round ``rnd`` from the dense ``weights``
        (gradient importance: ``grads``, else the clients' last aggregated report)."""
        return self.masks_at(self.target_at(rnd), rnd, weights, masks, grads)

    def masks_at(self, target: float, rnd: int, weights: dict[str, torch.Tensor], masks: Masks,
                 grads: dict[str, torch.Tensor] | None = None) -> Masks:
        if target <= 0:
            return {}
        weights = {n: weights[n] for n in self.param_names}  # masks cover parameters, not buffers
        if masks and not self.refine:  # without refinement pruned weights are gone: rank what is served
            weights = {n: w * masks[n].to(w.dtype) if n in masks else w for n, w in weights.items()}
        grads = grads if grads is not None else self.reports
        importance = self.cfg.importance
        if importance == "gradient" and not grads:
            importance = "magnitude"  # before any client has reported (round 1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
        layers = self.layers(weights, importance, self.cfg.norm, grads, gen)
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
