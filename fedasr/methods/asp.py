"""Automatic Structured Pruning (Nguyen, Le, Avila, 2024, arXiv 2411.01759) on the
Conformer-Transducer.

After each round's aggregation (from ``start_round``, at most one pruning step per round),
for every structured family of the model (FFN hidden units, attention heads, conv-module
channels, predictor units, joiner units — the group table) the server computes each
unit's L1 norm (its weights: incoming and outgoing slices), and the mean μ and standard
deviation σ of the family's norms. Units whose norm falls outside the band μ ± kσ are
removed (``sides: both``, what the authors' code does: it keeps the units inside the
two-sided band), or only those below μ − kσ (``sides: lower``, the reading "remove the
unimportant units"); every family keeps at least one unit. The step is taken only if the
parameter count falls; pruning stops once it has not fallen for ``patience`` rounds, or
after ``max_prune_round``.

The model then shrinks physically (:mod:`fedasr.model.compact`): the server copies the
surviving weights (the authors' code rebuilds and re-initialises the smaller model; we
never re-initialise), compacts its optimiser state the same way, and sends clients the
smaller dense model, so ``bytes_down``/``bytes_up`` fall with it. The authors prune the
conv filters of image CNNs; the unit families here are this toolkit's extension of their
rule to the Conformer-Transducer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.methods.base import MethodUpdate, PruningMethod, RoundContext, register
from fedasr.model.compact import compactable
from fedasr.model.groups import KINDS

SIDES = ("both", "lower")


@dataclass
class ASPConfig:
    """Automatic Structured Pruning (Nguyen et al., 2024): units outside a band of mean ± k
    standard deviations of their family's norms leave the model, until the parameter count
    stops falling; the method decides its own sparsity (k is the knob)."""

    k: float = 2.2  # band half-width in standard deviations (the authors' FEMNIST CNN config)
    sides: str = "both"  # both: keep units inside mu +- k sigma | lower: remove only below mu - k sigma
    patience: int = 3  # stop after this many rounds without a fall in the parameter count
    start_round: int = 1  # first round after which the aggregated model may be pruned
    max_prune_round: Optional[int] = None  # last such round [default: half the rounds]
    kinds: list = field(default_factory=lambda: list(KINDS))  # unit families that may shrink

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.k > 0:
            raise FedasrError(f"{p}k: must be positive")
        if self.sides not in SIDES:
            raise FedasrError(f"{p}sides: unknown {self.sides!r} ({', '.join(SIDES)})")
        if self.patience < 1 or self.start_round < 1:
            raise FedasrError(f"{p}patience/start_round: must be at least 1")
        if self.max_prune_round is not None and self.max_prune_round < 1:
            raise FedasrError(f"{p}max_prune_round: must be at least 1")
        for kind in self.kinds:
            if kind not in KINDS:
                raise FedasrError(f"{p}kinds: unknown {kind!r} ({', '.join(KINDS)})")


def unit_norms(model: nn.Module, fam, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 norm of each unit: the sum of |w| over its weight slices (>= 2-D parameters)."""
    params = {n for n, p in model.named_parameters() if p.dim() >= 2}
    total = torch.zeros(fam.num_units, dtype=torch.float64)
    for m in fam.members:
        if m.param in params:
            moved = weights[m.param].detach().double().abs().movedim(m.dim, 0)
            total += moved[m.index.reshape(-1)].reshape(fam.num_units, -1).sum(1)
    return total


def band_keep(norms: torch.Tensor, k: float, sides: str) -> torch.Tensor:
    mu, sigma = norms.mean(), norms.std(unbiased=False)  # population sigma, as np.std
    keep = norms >= mu - k * sigma
    if sides == "both":
        keep &= norms <= mu + k * sigma
    if not bool(keep.any()):  # a family keeps at least one unit: its largest-norm one
        keep[int(norms.argmax())] = True
    return keep


@register
class AutomaticStructuredPruning(PruningMethod):
    name = "asp"
    Config = ASPConfig

    def __init__(self, cfg: ASPConfig, common, model: nn.Module, total_rounds: int, seed: int):
        super().__init__(cfg, common, model, total_rounds, seed)
        self.max_round = cfg.max_prune_round if cfg.max_prune_round is not None else max(1, total_rounds // 2)
        self.stalled = 0  # rounds without a fall in the parameter count
        self.stopped = False

    def plan(self, ctx: RoundContext) -> dict[str, torch.Tensor]:
        keep = {}
        for fam in compactable(ctx.model):
            if fam.kind in self.cfg.kinds:
                k = band_keep(unit_norms(ctx.model, fam, ctx.weights), self.cfg.k, self.cfg.sides)
                if not bool(k.all()):
                    keep[fam.name] = k
        return keep

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        if self.stopped or ctx.rnd < self.cfg.start_round or ctx.rnd > self.max_round:
            return MethodUpdate(ctx.masks)
        keep = self.plan(ctx)
        if keep:  # removing any unit removes parameters: the count falls
            self.stalled = 0
            return MethodUpdate(ctx.masks, keep=keep,
                                metrics={"asp_removed_units": sum(int((~k).sum()) for k in keep.values())})
        self.stalled += 1  # every unit inside its band: the count did not fall this round
        if self.stalled >= self.cfg.patience:
            self.stopped = True
        return MethodUpdate(ctx.masks, metrics={"asp_stalled": self.stalled})

    def state_dict(self) -> dict:
        return {"stalled": self.stalled, "stopped": self.stopped}

    def load_state_dict(self, d: dict) -> None:
        self.stalled = int(d.get("stalled", 0))
        self.stopped = bool(d.get("stopped", False))
