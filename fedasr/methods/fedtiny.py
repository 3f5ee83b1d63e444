"""FedTiny (Huang et al., ICDCS 2023, "Distributed Pruning Towards Tiny Neural Networks in
Federated Learning") on the Conformer-Transducer.

1. **Adaptive BatchNorm selection** (at the start of round ``start_round``, default 1:
   before any training; a later start trains the dense model federatedly until then, a
   stand-in for the paper's server pre-training). The server draws ``candidates`` coarse
   masks from the model as it is then (initial, ``--init-from``, or after the dense
   rounds): layer-wise magnitude pruning to per-layer densities ``d_l = d (1 + u_l)``,
   ``u_l ~ U[-noise, noise)`` (``allocation: erk``: ``d_l = d^ERK_l (1 + u_l)``, the
   Erdős–Rényi-Kernel densities FedDST starts from, a departure), redrawn until the overall density is within ``density_tolerance`` of the target
   ``d = 1 - target_sparsity`` (the authors' ``noise-uniform-magnitude``). Two evaluate-only
   client phases follow: ``bn_stats`` — each client applies each candidate and recomputes
   the BatchNorm statistics (the Conformer's conv modules) by forward passes over
   ``phase_batches`` of its batches, and reports them; the server pools them (weighted by
   the FedAvg weights; pooled variance). ``candidate_loss`` — each client evaluates every
   candidate's RNN-T loss with the pooled statistics and reports it; the server keeps the
   candidate with the lowest weighted loss and installs its statistics. Training is sparse
   from then on: clients never hold a dense model.
2. **Progressive pruning.** Every ``update_every`` rounds up to ``end_round`` one part of
   the model (``granularity``: a prunable ``layer``, a ``block`` — a Conformer layer, the
   predictor, the joiner — or the ``entire`` model; cycling from the output side) is
   adjusted: clients accumulate their mean gradient at the *pruned* positions of those
   layers over their local steps and report only its top-K magnitudes (K indices + K
   values per layer, never a dense gradient), with K_l = ceil(α_t · live weights of l) and
   α_t = α/2 (1 + cos(π t / end_round)). The server sums the reports (FedAvg weights),
   regrows the K positions with the largest |aggregated gradient| and prunes the same
   number of smallest-magnitude live weights, so the density stays at the target.
   Regrown weights start at zero, with a fresh server-optimiser state.

Departures from the paper and the authors' code (the ``fedlottery`` branch of their FedML
fork): the server has no data, so the candidates come from the initial model, a
``--init-from`` warm start or ``start_round - 1`` federated dense rounds (no few-shot
server pre-training); BatchNorm statistics are
recomputed from scratch (cumulative average over ``phase_batches``) rather than as a
momentum average from the server's statistics, and pooled with the intended
data-weighted mean (the code keeps the last client's); clients report their gradient
accumulated over all local steps (the code: the last mini-batch), and the round's number
``t`` drives the cosine decay (the code counts adjustments); the number regrown equals the
number pruned, as the paper states.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.methods.base import (ClientHooks, GradientMeanHooks, Instructions, MeanAggregator, MethodUpdate,
                                 PruningMethod, Report, RoundContext, register)
from fedasr.prune.allocation import LAYER_COUNTS, layer_counts
from fedasr.prune.masks import Masks, apply_masks
from fedasr.trainer import batchnorms, recalibrate_batchnorm

GRANULARITIES = ("layer", "block", "entire")
PHASES = ("bn_stats", "candidate_loss")


@dataclass
class FedTinyConfig:
    """FedTiny (Huang et al., ICDCS 2023): a coarse mask chosen among candidates with BatchNorm
    statistics the clients recompute, then progressive prune/regrow from the clients' top-K
    gradients."""

    candidates: int = 5  # coarse masks to select from
    # per-layer base densities d_l around which the candidates are drawn: uniform (d_l = d, the
    # paper's) | erk (Erdős–Rényi-Kernel, as FedDST: small layers keep more)
    allocation: str = "uniform"
    density_noise: float = 0.5  # per-layer density d_l (1 + u), u ~ U[-noise, noise)
    density_tolerance: float = 0.02  # overall density within this relative error of the target
    phase_batches: int = 4  # client batches for BatchNorm recalibration and candidate losses
    adaptive_bn: bool = True  # select with recomputed BatchNorm statistics (false: the model's own)
    alpha: float = 0.1  # initial adjustment rate
    update_every: int = 2  # rounds between prune/regrow adjustments (ΔR)
    end_round: Optional[int] = None  # last adjustment round [default: 3/4 of the rounds]
    # the part adjusted at a time, cycling from the output side: a prunable layer | a block (a
    # Conformer layer, the predictor, the joiner) | the entire model
    granularity: str = "block"
    start_round: int = 1  # the round that begins with the mask selection (dense training before)

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.candidates < 1 or self.phase_batches < 1 or self.update_every < 1:
            raise FedasrError(f"{p}candidates/phase_batches/update_every: must be at least 1")
        if self.end_round is not None and self.end_round < 1:
            raise FedasrError(f"{p}end_round: must be at least 1")
        if self.start_round < 1:
            raise FedasrError(f"{p}start_round: must be at least 1")
        if not 0 <= self.density_noise < 1:
            raise FedasrError(f"{p}density_noise: must be in [0, 1)")
        if not 0 < self.density_tolerance < 1:
            raise FedasrError(f"{p}density_tolerance: must be in (0, 1)")
        if not 0 <= self.alpha < 1:
            raise FedasrError(f"{p}alpha: must be in [0, 1)")
        if self.granularity not in GRANULARITIES:
            raise FedasrError(f"{p}granularity: unknown {self.granularity!r} ({', '.join(GRANULARITIES)})")
        if self.allocation not in LAYER_COUNTS:
            raise FedasrError(f"{p}allocation: unknown {self.allocation!r} ({', '.join(LAYER_COUNTS)})")

    def check_common(self, pruning, prefix: str) -> None:
        if pruning.target_sparsity <= 0:
            raise FedasrError(f"{prefix}: FedTiny needs pruning.target_sparsity > 0")


# ---------------------------------------------------------------------------- client side
class TopKHooks(GradientMeanHooks):
    """Masks as usual; accumulates the mean gradient (before masking) at the pruned
    positions of ``topk``'s layers and reports only its K largest magnitudes per layer."""

    def __init__(self, masks: Masks, topk: dict[str, int]):
        super().__init__(masks, topk)
        self.topk = topk

    def contribution(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return self.at_pruned(name, grad)  # pruned positions only

    def report(self) -> Report:
        out = {}
        for n, k in self.topk.items():
            if n not in self._sum:
                continue
            g = self.mean(n).reshape(-1).cpu()
            k = min(int(k), int((g != 0).sum()))
            idx = torch.topk(g.abs(), k).indices if k > 0 else torch.zeros(0, dtype=torch.long)
            out[f"{n}/idx"] = idx.to(torch.int32)
            out[f"{n}/val"] = g[idx].float()
        return Report(out)


class TopKAggregator:
    """Server side: weighted sums of the clients' sparse top-K reports, densely per layer."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes
        self.scores = {n: torch.zeros(int(torch.tensor(s).prod()), dtype=torch.float64) for n, s in shapes.items()}
        self.weight = 0.0

    def add(self, report: Report, weight: float) -> None:
        pairs = {}
        for n in self.scores:  # validate everything first: a rejected report adds nothing
            idx, val = report.tensors.get(f"{n}/idx"), report.tensors.get(f"{n}/val")
            if idx is None or val is None:
                continue
            if idx.shape != val.shape or idx.dim() != 1:
                raise ValueError(f"{n}: top-K indices and values do not match")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.scores[n].numel()):
                raise ValueError(f"{n}: top-K index out of range")
            if not bool(torch.isfinite(val).all()):
                raise ValueError(f"{n}: non-finite top-K values")
            pairs[n] = (idx, val)
        for n, (idx, val) in pairs.items():
            self.scores[n].index_add_(0, idx.long(), weight * val.double())
        self.weight += weight

    def result(self) -> dict[str, torch.Tensor]:
        return {n: (s / self.weight).view(self.shapes[n]) for n, s in self.scores.items()} if self.weight else {}


# ---------------------------------------------------------------------------- the method
@register
class FedTiny(PruningMethod):
    name = "fedtiny"
    Config = FedTinyConfig

    @classmethod
    def check_run(cls, run) -> None:
        if run.model.overrides.get("conv_norm") == "layernorm":
            raise FedasrError("pruning.method: fedtiny needs model.overrides.conv_norm: batchnorm "
                              "(its mask selection recomputes BatchNorm statistics)")

    @classmethod
    def whole_unit_masks(cls, cfg: FedTinyConfig) -> str | None:
        return "FedTiny's masks are unstructured"

    def __init__(self, cfg: FedTinyConfig, common, model: nn.Module, total_rounds: int, seed: int):
        super().__init__(cfg, common, model, total_rounds, seed)
        self.end_round = cfg.end_round if cfg.end_round is not None else max(1, (3 * total_rounds) // 4)
        self.units = self._adjustment_units(model)
        self.bn_names = [n for n, _ in batchnorms(model).items()]
        self.candidates: list[Masks] = []  # before selection
        self.bn_candidates: list[dict[str, torch.Tensor]] = []
        self.selected = False
        self.adjustments = 0

    # ---------------------------------------------------------------- candidates
    def _adjustment_units(self, model: nn.Module) -> list[list[str]]:
        """Groups of prunable names adjusted together, from the output side."""
        if self.cfg.granularity == "entire":
            return [list(self.names)]
        if self.cfg.granularity == "layer":
            return [[n] for n in reversed(self.names)]
        blocks: dict[str, list[str]] = {}
        for n in self.names:
            m = re.match(r"^(encoder\.layers\.\d+|predictor|joiner)\.", n)
            blocks.setdefault(m.group(1) if m else n, []).append(n)
        return list(reversed(list(blocks.values())))

    def draw_candidates(self, weights: dict[str, torch.Tensor]) -> list[Masks]:
        """``candidates`` masks: layer-wise magnitude pruning to noisy per-layer densities
        (around the ``allocation``'s) whose overall density is within the tolerance of the
        target."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + 17)
        d = 1.0 - self.common.target_sparsity
        sizes = torch.tensor([weights[n].numel() for n in self.names], dtype=torch.float64)
        if self.cfg.allocation == "uniform":
            base = torch.full_like(sizes, d)
        else:
            counts = layer_counts({n: tuple(weights[n].shape) for n in self.names}, d, self.cfg.allocation)
            base = torch.tensor([counts[n] for n in self.names], dtype=torch.float64) / sizes
        out = []
        for _ in range(self.cfg.candidates):
            for _attempt in range(10_000):
                u = (torch.rand(len(self.names), generator=gen, dtype=torch.float64) - 0.5) * 2 * self.cfg.density_noise
                dens = (base * (1 + u)).clamp(max=1.0)
                keep = torch.maximum((dens * sizes).floor(), torch.ones_like(sizes))
                if abs(float(keep.sum() / sizes.sum()) - d) <= self.cfg.density_tolerance * d:
                    break
            else:
                raise FedasrError("pruning.fedtiny: no candidate density draw met density_tolerance")
            masks = {}
            for n, k in zip(self.names, keep.long().tolist()):
                w = weights[n].reshape(-1).abs()
                m = torch.zeros(w.numel(), dtype=torch.bool)
                m[torch.topk(w, k).indices] = True
                masks[n] = m.view(weights[n].shape)
            out.append(masks)
        return out

    # ---------------------------------------------------------------- server
    def init(self, ctx: RoundContext) -> Masks:
        if ctx.masks:  # a pruned --init-from checkpoint: its masks, no selection
            self.selected = True
            return ctx.masks
        if self.cfg.start_round > 1:
            return {}  # dense rounds first; the candidates are drawn after round start_round - 1
        return self._draw(ctx.weights)

    def _draw(self, weights: dict[str, torch.Tensor]) -> Masks:
        """Draw the candidates; the masks of the coming round (with one candidate and no
        BatchNorm selection there is nothing to select: it is installed at once)."""
        self.candidates = self.draw_candidates(weights)
        if not self.phases(self.cfg.start_round):
            self.selected, masks, self.candidates = True, self.candidates[0], []
            return masks
        return self.candidates[0] if self.cfg.start_round <= 1 else {}

    def phases(self, rnd: int) -> list[str]:
        if self.selected or not self.candidates or (self.cfg.candidates == 1 and not self.cfg.adaptive_bn):
            return []
        return list(PHASES) if self.cfg.adaptive_bn else ["candidate_loss"]

    def _union(self) -> Masks:
        return {n: torch.stack([c[n] for c in self.candidates]).any(0) for n in self.names}

    def phase_instructions(self, phase: str, ctx: RoundContext) -> tuple[Instructions, Masks | None]:
        tensors = {f"c{i}/{n}": m for i, c in enumerate(self.candidates) for n, m in c.items()}
        if phase == "candidate_loss" and self.bn_candidates:
            tensors.update({f"c{i}/bn/{k}": v.float() for i, st in enumerate(self.bn_candidates)
                            for k, v in st.items()})
        meta = {"candidates": len(self.candidates), "batches": self.cfg.phase_batches}
        return Instructions(tensors, meta), self._union()  # weights travel masked by the union

    def phase_aggregator(self, phase: str, ctx: RoundContext):
        return MeanAggregator(pool_batchnorm=phase == "bn_stats")  # bn_stats: the pooled data's statistics

    def end_phase(self, phase: str, ctx: RoundContext, aggregator) -> MethodUpdate:
        res = aggregator.result()
        if phase == "bn_stats":
            self.bn_candidates = [{k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(f"c{i}/")}
                                  for i in range(len(self.candidates))]
            return MethodUpdate(ctx.masks)
        losses = res["loss"].tolist()
        chosen = min(range(len(losses)), key=lambda i: losses[i])
        masks = self.candidates[chosen]
        if self.bn_candidates:  # install the chosen candidate's pooled statistics
            for k, v in self.bn_candidates[chosen].items():
                ctx.weights[k].copy_(v.to(ctx.weights[k].dtype))
        self.candidates, self.bn_candidates, self.selected = [], [], True
        return MethodUpdate(masks, metrics={"mask_selection": {"losses": [round(x, 5) for x in losses],
                                                               "chosen": chosen}})

    def adjusting(self, rnd: int) -> bool:
        # (at end_round itself the cosine rate is 0: nothing would change)
        return self.selected and self.cfg.alpha > 0 and rnd % self.cfg.update_every == 0 and rnd < self.end_round

    def alpha_at(self, rnd: int) -> float:
        return self.cfg.alpha / 2 * (1 + math.cos(math.pi * rnd / self.end_round))

    def _topk_plan(self, ctx: RoundContext) -> dict[str, int]:
        names = self.units[self.adjustments % len(self.units)]
        a = self.alpha_at(ctx.rnd)
        return {n: math.ceil(a * int(ctx.masks[n].sum())) for n in names if n in ctx.masks}

    def configure(self, ctx: RoundContext) -> Instructions:
        if not self.adjusting(ctx.rnd):
            return Instructions()
        return Instructions(meta={"topk": self._topk_plan(ctx)})

    def report_aggregator(self, ctx: RoundContext):
        if not self.adjusting(ctx.rnd):
            return MeanAggregator()
        return TopKAggregator({n: ctx.masks[n].shape for n in self._topk_plan(ctx)})

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        if not self.selected and not self.candidates and ctx.rnd + 1 == self.cfg.start_round:
            return MethodUpdate(self._draw(ctx.weights))  # from the aggregated dense model
        if not self.adjusting(ctx.rnd):
            return MethodUpdate(ctx.masks)
        plan = self._topk_plan(ctx)
        scores = aggregator.result()
        masks = {n: m.clone() for n, m in ctx.masks.items()}
        reset: Masks = {}
        regrown = 0
        for n, k in plan.items():
            m = masks[n].view(-1)
            s = scores.get(n)
            if s is None:
                continue
            s = s.reshape(-1).abs().masked_fill(m, 0.0)  # candidates: pruned positions with a score
            k = min(k, int((s > 0).sum()), int(m.sum()) - 1)
            if k <= 0:
                continue
            grow = torch.topk(s, k).indices
            w = ctx.weights[n].reshape(-1).abs().double().masked_fill(~m, math.inf)
            drop = torch.topk(w, k, largest=False).indices  # the smallest live weights
            m[drop] = False
            m[grow] = True
            r = torch.zeros_like(m)
            r[grow] = True
            reset[n] = r.view(masks[n].shape)
            regrown += k
        self.adjustments += 1
        return MethodUpdate(masks, reset=reset, metrics={"regrown": regrown})

    def state_dict(self) -> dict:
        return {"selected": self.selected, "adjustments": self.adjustments, "candidates": self.candidates,
                "bn_candidates": self.bn_candidates}

    def load_state_dict(self, d: dict) -> None:
        self.selected = bool(d.get("selected", False))
        self.adjustments = int(d.get("adjustments", 0))
        self.candidates = list(d.get("candidates", []))
        self.bn_candidates = list(d.get("bn_candidates", []))

    # ---------------------------------------------------------------- client
    def client_phase(self, phase: str, model: nn.Module, weights: dict[str, torch.Tensor], masks: Masks,
                     batches: Callable, instructions: Instructions) -> Report:
        from fedasr.trainer import transducer_loss

        count = int(instructions.meta["candidates"])
        limit = int(instructions.meta["batches"])
        out: dict[str, torch.Tensor] = {}
        losses = []
        for i in range(count):
            model.load_state_dict(weights)
            cand = {n: instructions.tensors[f"c{i}/{n}"] for n in self.names}
            apply_masks(model, cand)
            data = itertools.islice(batches(), limit)  # only the batches used are loaded
            if phase == "bn_stats":
                recalibrate_batchnorm(model, data)
                state = model.state_dict()
                for bn in self.bn_names:
                    for stat in ("running_mean", "running_var"):
                        out[f"c{i}/{bn}.{stat}"] = state[f"{bn}.{stat}"].detach().cpu().clone()
            else:
                state = model.state_dict()
                with torch.no_grad():
                    for k, v in instructions.tensors.items():
                        if k.startswith(f"c{i}/bn/"):
                            state[k.split("/", 2)[2]].copy_(v)
                    model.eval()
                    total, n_utts = 0.0, 0
                    for batch in data:
                        loss, _ = transducer_loss(model, batch)
                        total += float(loss) * len(batch)
                        n_utts += len(batch)
                losses.append(total / max(1, n_utts))
        if phase == "candidate_loss":
            out["loss"] = torch.tensor(losses, dtype=torch.float64)
        return Report(out)

    def client_hooks(self, masks: Masks, instructions: Instructions) -> ClientHooks:
        topk = instructions.meta.get("topk")
        return TopKHooks(masks, topk) if topk else ClientHooks(masks)
